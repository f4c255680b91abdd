// Single-flight: a hot key expires, a thousand requests want it at once, and one of them computes
// it while the others wait and get its value.
//
// In one process, callers of a key share one promise (one read, one flight). Across processes,
// the computation runs under the key's flight lease (`flight ["key"]`): the one instance that takes
// it computes and stores the value in pgcoord.flight_values, fenced by the lease (a computation
// that outlived its lease stores nothing); the others sleep, without a connection, until the lease
// is released (LISTEN/NOTIFY) and read the value. A failed computation stores nothing: local
// callers of that flight get its error; waiting instances find no fresh value and the next one
// computes (one at a time), within their `waitMs`.
//
// Built on the lease table rather than the idempotency store: a value here is a cache entry with a
// freshness time, recomputed many times over its life, not an outcome recorded once per key.

import { performance } from 'node:perf_hooks';
import { type Runner, runStatement } from '../driver/index.js';
import { abortedBy } from '../driver/lifecycle.js';
import { InvalidOptionError, PgcoordError, sqlState } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { arm, joinWaiters } from '../wake.js';
import { LeasesNotMigratedError } from './errors.js';
import { fenced, type Lease, tryAcquireLease } from './lease.js';
import { FLIGHTS } from './schema.js';
import { RELEASE_CHANNEL } from './statements.js';

const MAX_MS = 2_147_483_647;

/** Options of {@link singleFlight}. */
export interface SingleFlightOptions {
  /** How long a computed value is served without computing again, in ms (1 to 2147483647). */
  ttlMs: number;
  /** How long one computation may hold the key's flight (its lease TTL; renewed while it runs). Default 30 000 ms. */
  computeTtlMs?: number;
  /** How long a caller waits for another's computation before giving up. Default 10 000 ms. */
  waitMs?: number;
  /** Aborts this caller's wait only ({@link AbortedError}); the computation goes on for the others. */
  signal?: AbortSignal;
}

/** What {@link singleFlight} resolves to. */
export interface SingleFlightResult<T> {
  /** The value (as stored: a JSON round trip). */
  value: T;
  /** `computed`: this process ran `compute`; `shared`: another instance did, just now; `cached`: it was fresh already. */
  source: 'computed' | 'shared' | 'cached';
}

/** No fresh value arrived within `waitMs`: another instance's computation runs long or keeps failing. */
export class SingleFlightTimeoutError extends PgcoordError {
  constructor(
    readonly key: string,
    readonly waitMs: number,
  ) {
    super('PGCOORD_SINGLE_FLIGHT_TIMEOUT', `single-flight ${JSON.stringify(key)}: no fresh value within ${waitMs} ms`);
  }
}

const READ = `select value::text as value from ${FLIGHTS} where key = $1 and fresh_until > clock_timestamp()`;

// (`::text::jsonb`: a driver that types the parameter as jsonb would encode the JSON text again)
const STORE = `insert into ${FLIGHTS} (key, value, fence, computed_at, fresh_until)
  values ($1, $2::text::jsonb, $3::bigint, clock_timestamp(), clock_timestamp() + $4::int * interval '1 millisecond')
  on conflict (key) do update set value = excluded.value, fence = excluded.fence,
    computed_at = excluded.computed_at, fresh_until = excluded.fresh_until`;

const isMs = (v: unknown, min: number): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= MAX_MS;

function check(key: unknown, compute: unknown, options: SingleFlightOptions) {
  if (typeof key !== 'string' || key.length === 0 || key.length > 200)
    throw new InvalidOptionError(`single-flight key must be a string of 1 to 200 characters, got ${describe(key)}`);
  const problem = textProblem(key);
  if (problem) throw new InvalidOptionError(`single-flight key ${problem}`);
  if (typeof compute !== 'function') throw new InvalidOptionError('singleFlight needs a compute function');
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('single-flight options must be an object with ttlMs');
  const { ttlMs, computeTtlMs = 30_000, waitMs = 10_000, signal } = options;
  if (!isMs(ttlMs, 1)) throw new InvalidOptionError(`ttlMs must be an integer from 1 to ${MAX_MS}, got ${describe(ttlMs)}`);
  if (!isMs(computeTtlMs, 100))
    throw new InvalidOptionError(`computeTtlMs must be an integer from 100 to ${MAX_MS}, got ${describe(computeTtlMs)}`);
  if (!isMs(waitMs, 0)) throw new InvalidOptionError(`waitMs must be an integer from 0 to ${MAX_MS}, got ${describe(waitMs)}`);
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  return { key, ttlMs, computeTtlMs, waitMs, signal, flight: `flight ${JSON.stringify([key])}` };
}

type Checked = ReturnType<typeof check>;

async function read(runner: Runner, key: string): Promise<{ value: unknown } | undefined> {
  try {
    const [row] = await runStatement(runner, { text: READ, params: [key] }, {}, true);
    return row ? { value: JSON.parse(String(row.value)) } : undefined;
  } catch (err) {
    throw leaseTables(err);
  }
}

const leaseTables = (err: unknown) => (sqlState(err) === '42P01' ? new LeasesNotMigratedError({ cause: err }) : err);

// One flight of this process for a key: read, compute under the lease or wait for another's.
async function fly(runner: Runner, c: Checked, compute: (lease: Lease) => unknown): Promise<SingleFlightResult<unknown>> {
  const cached = await read(runner, c.key);
  if (cached) return { value: cached.value, source: 'cached' };
  const until = performance.now() + c.waitMs;
  let waiting: Awaited<ReturnType<typeof joinWaiters>> | undefined;
  let waited = false;
  try {
    for (;;) {
      const armed = waiting ? arm(waiting.listener, [c.flight], `waiting for lease ${JSON.stringify(c.flight)}`) : undefined;
      try {
        const lease = await tryAcquireLease(runner, c.flight, { ttlMs: c.computeTtlMs });
        if (lease) {
          try {
            // a value stored between our read and our lease: serve it
            const fresh = await read(runner, c.key);
            if (fresh) return { value: fresh.value, source: waited ? 'shared' : 'cached' };
            const value = await compute(lease);
            const json = JSON.stringify(value === undefined ? null : value);
            if (json === undefined)
              throw new InvalidOptionError(`single-flight ${JSON.stringify(c.key)}: compute returned a value JSON cannot hold`);
            await fenced(runner, lease, [{ text: STORE, params: [c.key, json, String(lease.fence), c.ttlMs] }], async () => undefined);
            return { value: JSON.parse(json), source: 'computed' };
          } finally {
            await lease.release().catch(() => {});
          }
        }
        const left = until - performance.now();
        if (left <= 0) throw new SingleFlightTimeoutError(c.key, c.waitMs);
        if (!armed) {
          waiting = await joinWaiters(runner, RELEASE_CHANNEL);
        } else {
          await armed.sleep(undefined, left, undefined);
          waited = true;
        }
      } finally {
        armed?.disarm();
      }
      const value = await read(runner, c.key);
      if (value) return { value: value.value, source: 'shared' };
    }
  } finally {
    waiting?.leave();
  }
}

// Flights in progress in this process, by runner and key: local callers share one.
const inFlight = new WeakMap<object, Map<string, Promise<SingleFlightResult<unknown>>>>();

/**
 * Get `key`'s value, computing it at most once across every caller and instance at a time: a
 * fresh stored value is returned as it is; otherwise one caller runs `compute` (with the flight's
 * lease: `lease.signal` aborts if the flight is lost) and stores the value for `ttlMs`, and the
 * others wait for it. A caller's `signal` abandons its own wait, never the computation.
 *
 * @throws {@link SingleFlightTimeoutError}, {@link AbortedError}, the computation's own error (to
 * the callers in the process that ran it), {@link InvalidOptionError} (before anything is sent).
 * @example
 * const { value } = await singleFlight(sql, `product:${id}`, () => loadProductPage(id), { ttlMs: 60_000 });
 */
export function singleFlight<T>(
  runner: Runner,
  key: string,
  compute: (lease: Lease) => Promise<T> | T,
  options: SingleFlightOptions,
): Promise<SingleFlightResult<T>> {
  let c: Checked;
  try {
    c = check(key, compute, options);
    if (c.signal?.aborted) throw abortedBy(c.signal, `single-flight ${JSON.stringify(key)}`);
  } catch (err) {
    return Promise.reject(err);
  }
  const local = inFlight.get(runner) ?? new Map<string, Promise<SingleFlightResult<unknown>>>();
  inFlight.set(runner, local);
  let shared = local.get(c.key);
  let mine = false;
  if (!shared) {
    mine = true;
    shared = fly(runner, c, compute as (lease: Lease) => unknown).finally(() => local.delete(c.key));
    local.set(c.key, shared);
  }
  const result = (mine ? shared : shared.then((r) => ({ ...r, source: r.source === 'computed' ? 'shared' : r.source }))) as Promise<
    SingleFlightResult<T>
  >;
  const signal = c.signal;
  if (!signal) return result;
  // this caller stops waiting; the flight goes on for the others
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(abortedBy(signal, `single-flight ${JSON.stringify(key)}`));
    signal.addEventListener('abort', onAbort, { once: true });
    result.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}
