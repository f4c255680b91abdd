import { PgcoordError, sqlState } from '../errors.js';
import { STALE_FENCE_SQLSTATE } from '../lease/errors.js';

/** The queue tables are missing: run `migrateQueue(sql)` (or `pgcoord generate`) at deploy time. */
export class QueueNotMigratedError extends PgcoordError {
  constructor(options?: { cause?: unknown }) {
    super(
      'PGCOORD_QUEUE_NOT_MIGRATED',
      'the queue tables (pgcoord.queue_jobs, pgcoord.queue_keys, pgcoord.queue_order) do not exist: run migrateQueue(sql) or apply `pgcoord generate`',
      options,
    );
  }
}

/**
 * A worker's claim of a key is over: another worker took the key over (this one's claim ran out)
 * or no renewal was confirmed in time. The reason of a job's `signal`, and what a fenced write
 * under a claim that is not current fails with.
 */
export class JobClaimLostError extends PgcoordError {
  constructor(
    readonly queue: string,
    readonly key: string,
    readonly fence: bigint,
    readonly reason: 'lost' | 'lapsed',
    options?: { cause?: unknown },
  ) {
    super(
      'PGCOORD_JOB_CLAIM_LOST',
      reason === 'lapsed'
        ? `queue ${JSON.stringify(queue)} key ${JSON.stringify(key)} (claim ${fence}): no renewal confirmed in time; stop the job`
        : `queue ${JSON.stringify(queue)} key ${JSON.stringify(key)} (claim ${fence}) is no longer held: another worker took it over`,
      options,
    );
  }
}

/** A queue statement's failure: the tables missing is a deploy step not taken; a stale claim is lost. */
export function queueError(err: unknown, claim?: { queue: string; key: string; fence: bigint }): unknown {
  const state = sqlState(err);
  if (state === STALE_FENCE_SQLSTATE && claim) return new JobClaimLostError(claim.queue, claim.key, claim.fence, 'lost', { cause: err });
  if (state === '42P01' || state === '42883' || state === '3F000') return new QueueNotMigratedError({ cause: err });
  return err;
}
