// A global rate limit: GCRA (the generic cell rate algorithm), one timestamp per key, one
// statement per decision, on the database clock.
//
// Each key keeps its theoretical arrival time (TAT). With T = per / rate (the emission interval)
// and a burst of B, a request of cost c at time `now` is allowed when
//   max(TAT, now) + c·T − now ≤ B·T,
// and then TAT becomes max(TAT, now) + c·T; a denied request writes nothing. The decision is an
// upsert: concurrent decisions on a key are serialised by its row lock, and each reads the TAT the
// previous one committed (ON CONFLICT DO UPDATE sees the latest row version), so no two instances
// can spend the same capacity. What it guarantees: over any span of length L, at most
// ceil(L / T) + B − 1 requests are allowed (with B = 1, never more than `rate` in any window of
// length `per`), counting each request at the time its statement reached the server.

import { performance } from 'node:perf_hooks';
import { type Runner, runStatement } from '../driver/index.js';
import { abortedBy } from '../driver/lifecycle.js';
import { InvalidOptionError, sqlState } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { type TraceContext, traced } from '../trace.js';
import { LimitsNotMigratedError, RateLimitTimeoutError } from './errors.js';
import { RATES } from './schema.js';

const MAX_PER_MS = 366 * 24 * 3600 * 1000;
const MAX_MS = 2_147_483_647;

/** Options of {@link limit}. */
export interface RateLimitOptions {
  /** Requests allowed per `per` (an integer from 1). */
  rate: number;
  /** The period in ms (an integer from 1 to 366 days). */
  per: number;
  /**
   * Requests that may pass at once after a quiet spell (default 1: smooth, and never more than
   * `rate` in any window of `per`). With B, a window of `per` may see `rate + B − 1`.
   */
  burst?: number;
  /** What this request costs (default 1, at most `burst`). */
  cost?: number;
}

/** Options of {@link waitForLimit}. */
export interface WaitForLimitOptions extends RateLimitOptions {
  /** Give up after this many ms ({@link RateLimitTimeoutError}); omitted waits as long as it takes. */
  timeoutMs?: number;
  /** Abort the wait ({@link AbortedError}). */
  signal?: AbortSignal;
}

/** A decision. */
export interface RateLimitDecision {
  allowed: boolean;
  /** Denied: ms until this request would be allowed. Allowed: 0. */
  retryAfterMs: number;
  /** Requests (of cost 1) that would still be allowed right now. */
  remaining: number;
  /** ms until the key is back to a full burst. */
  resetMs: number;
}

interface Checked {
  key: string;
  intervalUs: number;
  burstUs: number;
  costUs: number;
}

const isInt = (v: unknown, min: number, max: number): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max;

function check(key: unknown, options: RateLimitOptions): Checked {
  if (typeof key !== 'string' || key.length === 0 || key.length > 255)
    throw new InvalidOptionError(`rate limit key must be a string of 1 to 255 characters, got ${describe(key)}`);
  const problem = textProblem(key);
  if (problem) throw new InvalidOptionError(`rate limit key ${problem}`);
  if (options === null || typeof options !== 'object')
    throw new InvalidOptionError('rate limit options must be an object with rate and per');
  const { rate, per, burst = 1, cost = 1 } = options;
  if (!isInt(per, 1, MAX_PER_MS))
    throw new InvalidOptionError(`per must be an integer number of ms from 1 to ${MAX_PER_MS}, got ${describe(per)}`);
  if (!isInt(rate, 1, per * 1000))
    throw new InvalidOptionError(`rate must be an integer from 1 to ${per * 1000} (one per microsecond of per), got ${describe(rate)}`);
  if (!isInt(burst, 1, 1_000_000_000))
    throw new InvalidOptionError(`burst must be an integer from 1 to 1000000000, got ${describe(burst)}`);
  if (!isInt(cost, 1, burst)) throw new InvalidOptionError(`cost must be an integer from 1 to burst (${burst}), got ${describe(cost)}`);
  // the emission interval in whole microseconds (timestamptz's resolution), never 0
  const intervalUs = Math.max(1, Math.round((per * 1000) / rate));
  return { key, intervalUs, burstUs: burst * intervalUs, costUs: cost * intervalUs };
}

// One statement. `now` is statement_timestamp(): the database clock, the same at every use in the
// statement (the time the statement reached the server). An allowed request moves the TAT; a
// denied one only reads it (DO UPDATE ... WHERE false writes nothing) for its retry time.
const US = `* interval '1 microsecond'`;
const DECIDE = `with decided as (
  insert into ${RATES} as r (key, tat) values ($1, statement_timestamp() + $2::bigint ${US})
  on conflict (key) do update set tat = greatest(r.tat, statement_timestamp()) + $2::bigint ${US}
    where greatest(r.tat, statement_timestamp()) + $2::bigint ${US} <= statement_timestamp() + $3::bigint ${US}
  returning tat
)
select true as allowed, extract(epoch from tat - statement_timestamp())::float8 * 1000 as ahead_ms from decided
union all
select false, extract(epoch from r.tat - statement_timestamp())::float8 * 1000 from ${RATES} r
  where r.key = $1 and not exists (select 1 from decided)`;

async function decide(runner: Runner, c: Checked): Promise<RateLimitDecision> {
  let rows: Record<string, unknown>[];
  try {
    rows = await runStatement(runner, { text: DECIDE, params: [c.key, c.costUs, c.burstUs] });
  } catch (err) {
    const state = sqlState(err);
    throw state === '42P01' || state === '3F000' ? new LimitsNotMigratedError({ cause: err }) : err;
  }
  const [row] = rows;
  const T = c.intervalUs / 1000;
  // (no row: a concurrent first decision on a new key took it after this statement's snapshot)
  const aheadMs = Math.max(0, row ? Number(row.ahead_ms) : c.burstUs / 1000);
  const resetMs = aheadMs;
  const remaining = Math.max(0, Math.floor((c.burstUs / 1000 - aheadMs) / T + 1e-9));
  if (row?.allowed === true) return { allowed: true, retryAfterMs: 0, remaining, resetMs };
  const retryAfterMs = Math.max(1, aheadMs - (c.burstUs - c.costUs) / 1000);
  return { allowed: false, retryAfterMs, remaining, resetMs };
}

/**
 * One rate-limit decision for `key`, shared by every instance: allowed (and counted) or denied
 * (and not counted, with `retryAfterMs`). One statement, database clock (GCRA; see the module
 * comment for what it guarantees). Needs the limit table: run {@link migrateLimits} at deploy time.
 *
 * @throws {@link InvalidOptionError} (before anything is sent), {@link LimitsNotMigratedError}.
 * @example
 * const d = await limit(sql, 'partner-api', { rate: 100, per: 60_000 });
 * if (!d.allowed) return res.status(429).set('Retry-After', String(Math.ceil(d.retryAfterMs / 1000))).end();
 */
export function limit(runner: Runner, key: string, options: RateLimitOptions): Promise<RateLimitDecision> {
  return traced('limit', limitContext('limit', key), (ctx) => decided(decide(runner, check(key, options)), ctx));
}

const limitContext = (operation: string, key: unknown) => () => ({ operation, keys: typeof key === 'string' ? [key] : [] });

async function decided(decision: Promise<RateLimitDecision>, ctx: TraceContext | undefined): Promise<RateLimitDecision> {
  const d = await decision;
  if (ctx) ctx.outcome = d.allowed ? 'allowed' : 'denied';
  return d;
}

/**
 * Wait until `key` allows this request, then count it: for work that must go out, but no faster
 * than the shared quota (calls to a paid API from many instances). Sleeps without a connection
 * until the server says the next turn comes.
 *
 * @throws {@link RateLimitTimeoutError}, {@link AbortedError}, {@link InvalidOptionError}.
 * @example
 * await waitForLimit(sql, 'partner-api', { rate: 100, per: 60_000, signal });
 * await partner.call();
 */
export function waitForLimit(runner: Runner, key: string, options: WaitForLimitOptions): Promise<RateLimitDecision> {
  return traced('limit', limitContext('waitForLimit', key), (ctx) => decided(waitFor(runner, key, options), ctx));
}

async function waitFor(runner: Runner, key: string, options: WaitForLimitOptions): Promise<RateLimitDecision> {
  const c = check(key, options);
  const { timeoutMs, signal } = options;
  if (timeoutMs !== undefined && !isInt(timeoutMs, 0, MAX_MS))
    throw new InvalidOptionError(`timeoutMs must be an integer from 0 to ${MAX_MS}, got ${describe(timeoutMs)}`);
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  const until = timeoutMs === undefined ? Number.POSITIVE_INFINITY : performance.now() + timeoutMs;
  for (;;) {
    if (signal?.aborted) throw abortedBy(signal, `waiting for rate limit ${JSON.stringify(c.key)}`);
    const d = await decide(runner, c);
    if (d.allowed) return d;
    const left = until - performance.now();
    if (left < d.retryAfterMs) throw new RateLimitTimeoutError(c.key, timeoutMs as number, d.retryAfterMs);
    await sleep(d.retryAfterMs, signal, c.key);
  }
}

function sleep(ms: number, signal: AbortSignal | undefined, key: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortedBy(signal as AbortSignal, `waiting for rate limit ${JSON.stringify(key)}`));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, Math.ceil(ms));
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
