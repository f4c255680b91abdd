// Looking at a queue and acting on its dead jobs: depth, oldest job, per-key lag (all ages on the
// database clock), and the two ways out of a dead job: run it again, or skip it.

import { inTransaction, type Row, type Runner, runStatement } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { describe } from '../text.js';
import { checkName } from './enqueue.js';
import { queueError } from './errors.js';
import { JOBS, KEYS, QUEUE_SCHEMA } from './schema.js';
import { checkClaimStatement, QUEUE_CHANNEL } from './statements.js';
import type { Job } from './worker.js';

/** A queue at a glance. */
export interface QueueStats {
  queue: string;
  /** Jobs queued (waiting, running or dead). */
  jobs: number;
  /** Keys with queued jobs. */
  keys: number;
  /** Keys a worker holds now. */
  running: number;
  /** Keys stopped at a dead job. */
  dead: number;
  /** Age of the oldest queued job, in ms (database clock); 0 when empty. */
  oldestMs: number;
}

const STATS = `select j.queue, count(*)::int as jobs, count(distinct j.key)::int as keys,
  (select count(*) from ${KEYS} k where k.queue = j.queue and k.holder is not null and k.ready_at > clock_timestamp())::int as running,
  count(*) filter (where j.state = 'dead')::int as dead,
  greatest(0, extract(epoch from clock_timestamp() - min(j.enqueued_at)) * 1000)::float8 as oldest_ms
from ${JOBS} j where ($1::text is null or j.queue = $1) group by j.queue order by j.queue`;

/**
 * Depth, keys, running and dead counts and the oldest job's age of each queue (or of `queue`).
 * @throws {@link QueueNotMigratedError} when the queue tables do not exist.
 */
export async function queueStats(runner: Runner, queue?: string): Promise<QueueStats[]> {
  if (queue !== undefined) checkName(queue, 'queue');
  const rows = await runStatement(runner, { text: STATS, params: [queue ?? null] }, {}, true).catch((err: unknown) => {
    throw queueError(err);
  });
  return rows.map((r) => ({
    queue: String(r.queue),
    jobs: Number(r.jobs),
    keys: Number(r.keys),
    running: Number(r.running),
    dead: Number(r.dead),
    oldestMs: Math.round(Number(r.oldest_ms)),
  }));
}

/** One key of a queue: its head job and how far behind it is. */
export interface QueueKeyInfo {
  key: string;
  /** `running` (a worker holds it), `ready` (its head can run), `waiting` (a retry or a delay), `dead`. */
  state: 'running' | 'ready' | 'waiting' | 'dead';
  /** Jobs queued on the key. */
  jobs: number;
  /** The head job's id. */
  headId: bigint;
  /** Attempts of the head job so far. */
  attempts: number;
  /** The head job's last error, if an attempt failed. */
  lastError: string | null;
  /** How long the head job has been queued, in ms (database clock): the key's lag. */
  lagMs: number;
  /** Who holds the key while running. */
  holder: string | null;
}

const KEYS_INFO = `select k.key, k.holder_label, (k.holder is not null and k.ready_at > clock_timestamp()) as held,
  h.id::text as head_id, h.state, h.attempts, h.last_error, (h.run_at > clock_timestamp()) as later,
  greatest(0, extract(epoch from clock_timestamp() - h.enqueued_at) * 1000)::float8 as lag_ms,
  (select count(*) from ${JOBS} c where c.queue = k.queue and c.key = k.key)::int as jobs
from ${KEYS} k
cross join lateral (select * from ${JOBS} j where j.queue = k.queue and j.key = k.key order by j.id limit 1) h
where k.queue = $1 and ($2::boolean is false or h.state = 'dead')
order by h.enqueued_at, k.key limit $3::int`;

function keyInfo(r: Row): QueueKeyInfo {
  const state = r.state === 'dead' ? 'dead' : r.held ? 'running' : r.later ? 'waiting' : 'ready';
  return {
    key: String(r.key),
    state,
    jobs: Number(r.jobs),
    headId: BigInt(String(r.head_id)),
    attempts: Number(r.attempts),
    lastError: r.last_error === null ? null : String(r.last_error),
    lagMs: Math.round(Number(r.lag_ms)),
    holder: state === 'running' && r.holder_label !== null ? String(r.holder_label) : null,
  };
}

/**
 * The keys of `queue` with queued jobs, most behind first (at most `limit`, default 100); with
 * `dead`, only the keys stopped at a dead job.
 */
export async function listQueueKeys(
  runner: Runner,
  queue: string,
  options: { dead?: boolean; limit?: number } = {},
): Promise<QueueKeyInfo[]> {
  checkName(queue, 'queue');
  const { dead = false, limit = 100 } = options;
  if (typeof dead !== 'boolean') throw new InvalidOptionError(`dead must be a boolean, got ${describe(dead)}`);
  if (!Number.isInteger(limit) || limit < 1 || limit > 100_000)
    throw new InvalidOptionError(`limit must be an integer from 1 to 100000, got ${describe(limit)}`);
  const rows = await runStatement(runner, { text: KEYS_INFO, params: [queue, dead, limit] }, {}, true).catch((err: unknown) => {
    throw queueError(err);
  });
  return rows.map(keyInfo);
}

const RETRY = `with j as (
  update ${JOBS} set state = 'ready', attempts = 0, run_at = clock_timestamp()
  where queue = $1 and key = $2 and state = 'dead'
  returning id
), k as (
  update ${KEYS} set ready_at = clock_timestamp()
  where queue = $1 and key = $2 and ready_at is null and exists (select 1 from j)
  returning 1
)
select j.id::text as id, (select count(pg_notify('${QUEUE_CHANNEL}', $1)) from k)::int as woke from j`;

/**
 * Run a key's dead job again, from attempt 1, ahead of the key's later jobs (order is kept).
 * Resolves the job's id when the key's head was dead and is now ready, undefined otherwise (as
 * {@link skipDeadJob} does).
 */
export async function retryDeadJob(runner: Runner, queue: string, key: string): Promise<bigint | undefined> {
  checkName(queue, 'queue');
  checkName(key, 'key');
  const rows = await runStatement(runner, { text: RETRY, params: [queue, key] }).catch((err: unknown) => {
    throw queueError(err);
  });
  const id = rows[0]?.id;
  return id === null || id === undefined ? undefined : BigInt(String(id));
}

/**
 * Drop a key's dead job (it never runs) and let the key go on with its next job. Resolves the
 * dropped job's id, or undefined when the key's head was not dead.
 */
export async function skipDeadJob(runner: Runner, queue: string, key: string): Promise<bigint | undefined> {
  checkName(queue, 'queue');
  checkName(key, 'key');
  const rows = await runStatement(runner, { text: `select ${QUEUE_SCHEMA}.queue_skip($1, $2)::text as id`, params: [queue, key] }).catch(
    (err: unknown) => {
      throw queueError(err);
    },
  );
  const id = rows[0]?.id;
  return id === null || id === undefined ? undefined : BigInt(String(id));
}

/**
 * Run `fn` in a transaction that commits only while `job`'s claim of its key is current: the check
 * holds the key's row (FOR SHARE) to the end, so no other worker can take the key over and run the
 * job again before this commits; after a takeover it fails with {@link JobClaimLostError} (exported
 * from the package root). Writes
 * made here and the job's completion are then never both done twice.
 */
export async function withJobFence<H, T>(
  runner: Runner,
  job: Pick<Job, 'queue' | 'key' | 'fence' | 'signal'>,
  fn: (tx: H) => Promise<T> | T,
): Promise<T> {
  if (job === null || typeof job !== 'object') throw new InvalidOptionError('withJobFence needs the job its handler was given');
  checkName(job.queue, 'queue');
  checkName(job.key, 'key');
  if (typeof job.fence !== 'bigint' || job.fence < 1n)
    throw new InvalidOptionError(`fence must be a positive bigint, got ${describe(job.fence)}`);
  if (typeof fn !== 'function') throw new InvalidOptionError('withJobFence needs a callback');
  if (job.signal?.aborted) throw job.signal.reason;
  return inTransaction<H, T>(runner, {}, async (scope) => {
    try {
      await scope.conn.send([checkClaimStatement(job.queue, job.key, job.fence)]);
    } catch (err) {
      throw queueError(err, job);
    }
    return scope.call(fn);
  });
}
