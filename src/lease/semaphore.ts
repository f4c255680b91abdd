// A counting semaphore: at most N holders of a key at once (N concurrent exports, N connections to
// a partner API). Each of the N permits is a lease of its own (`semaphore ["key"]#i`), so a permit
// is exclusive however many instances race, carries a fencing token, renews itself, tells its
// holder through its signal, and comes back by itself `ttlMs` after a crashed holder's last
// renewal (the database clock decides; nothing waits for the dead holder's session to end).

import type { Statement } from '../driver/index.js';
import type { Runner } from '../driver/types.js';
import { InvalidOptionError, PgcoordError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { checkLeaseOptions, type Lease, type LeaseOptions, take } from './lease.js';
import { FENCES, LEASES } from './schema.js';

/** Options of {@link acquirePermit}: a lease's, and how many permits the key has. */
export interface PermitOptions extends LeaseOptions {
  /** How many holders the key allows at once (1 to 1000). Every caller of a key must pass the same. */
  permits: number;
}

// One statement: pick a random free permit (by this statement's snapshot) and take it as the lease
// statement takes a name (the DO UPDATE rechecks that it is free under the row lock). Nothing free:
// when the first busy permit's term ends. A free one taken by a concurrent try in between: retry.
const ACQUIRE_PERMIT = `with slots as (
  select $1 || s.i as name from generate_series(0, $2::int - 1) s(i)
),
busy as (
  select l.name, l.expires_at from ${LEASES} l join slots using (name) where l.expires_at > clock_timestamp()
),
pick as (
  select name from slots where name not in (select name from busy) order by random() limit 1
),
taken as (
  insert into ${LEASES} as l (name, fence, holder, holder_label, acquired_at, renewed_at, expires_at)
  select name, nextval('${FENCES}'), $3::uuid, $4, clock_timestamp(), clock_timestamp(), clock_timestamp() + $5::int * interval '1 millisecond'
    from pick
  on conflict (name) do update
    set fence = nextval('${FENCES}'), holder = excluded.holder, holder_label = excluded.holder_label,
        acquired_at = clock_timestamp(), renewed_at = clock_timestamp(), expires_at = excluded.expires_at
    where l.expires_at <= clock_timestamp()
  returning l.name, l.fence
)
select name, fence::text as fence, null::float8 as expires_in_ms, false as retry from taken
union all
select null, null, greatest(0, extract(epoch from min(expires_at) - clock_timestamp()) * 1000)::float8, count(*) < $2::int
  from busy where not exists (select 1 from taken)`;

const ABANDON_BY_TOKEN = `update ${LEASES} set holder = null, expires_at = clock_timestamp()
  where holder = $1::uuid and expires_at > clock_timestamp()`;

function permitNames(key: unknown, permits: unknown): { prefix: string; names: string[] } {
  if (typeof key !== 'string' || key.length === 0 || key.length > 200)
    throw new InvalidOptionError(`semaphore key must be a string of 1 to 200 characters, got ${describe(key)}`);
  const problem = textProblem(key);
  if (problem) throw new InvalidOptionError(`semaphore key ${problem}`);
  if (typeof permits !== 'number' || !Number.isInteger(permits) || permits < 1 || permits > 1000)
    throw new InvalidOptionError(`permits must be an integer from 1 to 1000, got ${describe(permits)}`);
  const prefix = `semaphore ${JSON.stringify([key])}#`;
  if (prefix.length + String(permits - 1).length > 255) throw new InvalidOptionError('semaphore key is too long once escaped');
  return { prefix, names: Array.from({ length: permits }, (_, i) => `${prefix}${i}`) };
}

async function takePermit(runner: Runner, key: string, options: PermitOptions): Promise<Lease | PgcoordError> {
  if (options === null || typeof options !== 'object')
    throw new InvalidOptionError('permit options must be an object with permits and ttlMs');
  const { permits, ...leaseOptions } = options;
  const { prefix, names } = permitNames(key, permits);
  const opts = checkLeaseOptions(`${prefix}*`, leaseOptions);
  return take(runner, opts, {
    statement: (token): Statement => ({ text: ACQUIRE_PERMIT, params: [prefix, permits, token, opts.holder, opts.ttlMs] }),
    abandon: (token) => ({ text: ABANDON_BY_TOKEN, params: [token] }),
    wakeOn: names,
  });
}

/**
 * Take one of `permits` permits of `key`, waiting for one unless `timeoutMs` says otherwise. The
 * permit is a {@link Lease}: release it (or `await using` it), watch its `signal`, fence writes
 * with {@link withFence}. One statement per try.
 *
 * @throws {@link LeaseNotAcquiredError} (`timeoutMs: 0`), {@link LeaseTimeoutError},
 * {@link AbortedError}, {@link InvalidOptionError} (before anything is sent).
 * @example
 * await using permit = await acquirePermit(sql, 'partner-connections', { permits: 4, ttlMs: 30_000 });
 * await partner.export({ signal: permit.signal });
 */
export async function acquirePermit(runner: Runner, key: string, options: PermitOptions): Promise<Lease> {
  const got = await takePermit(runner, key, options);
  if (got instanceof PgcoordError) throw got;
  return got;
}

/** {@link acquirePermit} that resolves `undefined` when every permit is held (tries once unless `timeoutMs` is given). */
export async function tryAcquirePermit(runner: Runner, key: string, options: PermitOptions): Promise<Lease | undefined> {
  const got = await takePermit(runner, key, { timeoutMs: 0, ...options });
  return got instanceof PgcoordError ? undefined : got;
}

/**
 * Run `fn` holding a permit of `key`, and release it after (also when `fn` throws).
 *
 * @example
 * await withPermit(sql, 'exports', { permits: 3, ttlMs: 60_000 }, (permit) => runExport(permit.signal));
 */
export async function withPermit<T>(
  runner: Runner,
  key: string,
  options: PermitOptions,
  fn: (permit: Lease) => Promise<T> | T,
): Promise<T> {
  if (typeof fn !== 'function') throw new InvalidOptionError('withPermit needs a callback');
  const permit = await acquirePermit(runner, key, options);
  try {
    return await fn(permit);
  } finally {
    await permit.release().catch(() => {});
  }
}
