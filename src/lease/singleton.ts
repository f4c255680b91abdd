// Singleton jobs: a named job runs once per schedule slot across every instance (the daily report
// on one of five instances). The slot is deduplicated by a `done` row in pgcoord.singleton_runs,
// not by how long a lock is held, so a run that finished early on one instance is not run again on
// another. Runs are serialised by a lease (per job, or per slot when overlap is allowed); every row
// is written in a transaction fenced by that lease, so a run whose term was taken over (a paused
// process) can record nothing. The instances that do not run either skip, or wait on the lease
// and receive the winner's stored result.

import { runStatement } from '../driver/index.js';
import type { Runner } from '../driver/types.js';
import { InvalidOptionError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { acquireLease, checkLeaseOptions, fenced, type Lease, type LeaseOptions, tryAcquireLease } from './lease.js';
import { LEASES, RUNS } from './schema.js';

/** What to do when the lease is held: `skip` returns at once, `wait` waits for it (and its result). */
export type BusyPolicy = 'skip' | 'wait';

/** Options of {@link runSingleton}. */
export interface SingletonOptions extends LeaseOptions {
  /** The job's name (1 to 100 characters). */
  job: string;
  /** The schedule slot it runs for, e.g. `2026-12-04` (1 to 100 characters). */
  slot: string;
  /** Another instance runs this slot: skip, or wait and receive its result. Default `wait`. */
  onBusy?: BusyPolicy;
  /**
   * The run of an earlier slot is still going: `skip` this slot, `wait` for that run to end, or
   * `allow` both at once (the lease is then per slot). Default `skip`.
   */
  overlap?: BusyPolicy | 'allow';
}

/** What {@link runSingleton} did. */
export type SingletonResult<T> =
  /** This call ran the job; `value` is its result as stored (JSON round trip). */
  | { status: 'ran'; value: T; fence: bigint }
  /** The slot was already done (here or elsewhere): the stored result, the job did not run. */
  | { status: 'done'; value: T }
  /** The job did not run: this slot is running elsewhere, or an earlier slot still runs. */
  | { status: 'skipped'; reason: 'running' | 'overlap' };

function checkPart(value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.length > 100)
    throw new InvalidOptionError(`singleton ${what} must be a string of 1 to 100 characters, got ${describe(value)}`);
  const problem = textProblem(value);
  if (problem) throw new InvalidOptionError(`singleton ${what} ${problem}`);
  return value;
}

function checkPolicy(value: unknown, what: string, allowed: readonly string[]): void {
  if (value !== undefined && !allowed.includes(value as string))
    throw new InvalidOptionError(`${what} must be one of ${allowed.join(', ')}, got ${describe(value)}`);
}

// The slot's state and, when its job's lease is held, the slot that term is running.
const LOOK = `select (select state from ${RUNS} where job = $1 and slot = $2) as state,
  (select result::text from ${RUNS} where job = $1 and slot = $2 and state = 'done') as result,
  (select r.slot from ${LEASES} l join ${RUNS} r on r.job = $1 and r.fence = l.fence and r.state = 'running'
    where l.name = $3 and l.expires_at > clock_timestamp()) as running`;

// Under the lease: mark the slot running with this term's fence, unless it was done meanwhile.
const START = `insert into ${RUNS} as r (job, slot, state, fence, started_at) values ($1, $2, 'running', $3::bigint, clock_timestamp())
  on conflict (job, slot) do update set state = 'running', fence = excluded.fence, started_at = excluded.started_at
    where r.state <> 'done'
  returning 1 as started`;

// (`::text::jsonb`: a driver that types the parameter as jsonb would encode the JSON text again)
const FINISH = `update ${RUNS} set state = 'done', result = $4::text::jsonb, finished_at = clock_timestamp()
  where job = $1 and slot = $2 and fence = $3::bigint`;

const DONE = `select result::text as result from ${RUNS} where job = $1 and slot = $2 and state = 'done'`;

/**
 * Run `fn` once for `slot` of `job` across every instance. The first caller takes the job's lease
 * and runs it; the others skip or wait, per `onBusy` (same slot) and `overlap` (an earlier slot
 * still running). A slot that is done is never run again; its stored result is returned. A run
 * that throws leaves the slot undone (the next caller runs it); a run that crashes is taken over
 * once its lease expires.
 *
 * `fn` gets the lease: stop on `lease.signal`, fence its writes with {@link withFence}. Its result
 * must be JSON (it is stored for the other instances).
 *
 * @example
 * const out = await runSingleton(sql, { job: 'daily-report', slot: today, ttlMs: 30_000 }, (lease) => buildReport(lease));
 * if (out.status !== 'skipped') mail(out.value);
 */
export async function runSingleton<T>(
  runner: Runner,
  options: SingletonOptions,
  fn: (lease: Lease) => Promise<T> | T,
): Promise<SingletonResult<T>> {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('singleton options must be an object');
  const { job, slot, onBusy = 'wait', overlap = 'skip', ...leaseOptions } = options;
  const j = checkPart(job, 'job');
  const s = checkPart(slot, 'slot');
  checkPolicy(onBusy, 'onBusy', ['skip', 'wait']);
  checkPolicy(overlap, 'overlap', ['skip', 'wait', 'allow']);
  if (typeof fn !== 'function') throw new InvalidOptionError('runSingleton needs a callback');
  // JSON keeps a job, or a job and a slot, apart from any other: no separator can be forged
  const name = `singleton ${JSON.stringify(overlap === 'allow' ? [j, s] : [j])}`;
  checkLeaseOptions(name, leaseOptions);

  const [look] = await runStatement(runner, { text: LOOK, params: [j, s, name] }, {}, true);
  if (look?.state === 'done') return { status: 'done', value: JSON.parse(String(look.result)) as T };
  let lease = await tryAcquireLease(runner, name, { ...leaseOptions, timeoutMs: 0 });
  if (!lease) {
    const running = typeof look?.running === 'string' ? look.running : undefined;
    const reason = running === undefined || running === s ? 'running' : 'overlap';
    if ((reason === 'running' ? onBusy : overlap) === 'skip') return { status: 'skipped', reason };
    lease = await acquireLease(runner, name, leaseOptions);
  }
  try {
    const started = await fenced(
      runner,
      lease,
      [{ text: START, params: [j, s, String(lease.fence)] }],
      async (_scope, [rows]) => rows?.length === 1,
    );
    if (!started) {
      const [done] = await runStatement(runner, { text: DONE, params: [j, s] }, {}, true);
      return { status: 'done', value: JSON.parse(String(done?.result)) as T };
    }
    const value = await fn(lease);
    let json: string;
    try {
      json = JSON.stringify(value === undefined ? null : value);
    } catch (err) {
      throw new InvalidOptionError(`singleton job ${JSON.stringify(j)} returned a result JSON cannot hold: ${(err as Error).message}`);
    }
    await fenced(runner, lease, [{ text: FINISH, params: [j, s, String(lease.fence), json] }], async () => undefined);
    return { status: 'ran', value: JSON.parse(json) as T, fence: lease.fence };
  } finally {
    await lease.release().catch(() => {});
  }
}
