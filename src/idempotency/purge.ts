// Retention: delete rows past `expires_at`, in batches, without blocking live traffic.

import { inTransaction, type Runner } from '../driver/index.js';
import { InvalidOptionError, sqlState } from '../errors.js';
import { IdempotencyNotMigratedError } from './errors.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, type IdempotencyTableNames } from './schema.js';

export interface PurgeOptions extends IdempotencyTableNames {
  /** Rows per batch (one short transaction each). Default 1000. */
  batchSize?: number;
  /** Stop after this many batches (e.g. to bound one cron run). Default: until nothing is left. */
  maxBatches?: number;
  signal?: AbortSignal;
}

/** What {@link purgeExpired} did. */
export interface PurgeResult {
  deleted: number;
  batches: number;
}

/**
 * Delete idempotency rows past their retention (`expires_at`, database clock), `batchSize` at a
 * time, each batch in its own short transaction, until a batch comes back short.
 *
 * Why it is safe next to live traffic: the batch is chosen with `FOR UPDATE SKIP LOCKED`, so a row
 * a claim is taking over right now (it holds the row lock) is skipped, not waited for, and a row
 * the purge has locked makes a concurrent claim wait and then insert afresh. A running row whose
 * lease is still live is never deleted, even past its retention.
 *
 * @example
 * const { deleted } = await purgeExpired(sql, { batchSize: 5000 }); // e.g. from a cron job
 */
export async function purgeExpired(runner: Runner, options: PurgeOptions = {}): Promise<PurgeResult> {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('purge options must be an object');
  const { batchSize = 1000, maxBatches = Number.POSITIVE_INFINITY, signal } = options;
  if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1_000_000)
    throw new InvalidOptionError(`batchSize must be an integer from 1 to 1000000, got ${String(batchSize)}`);
  if (maxBatches !== Number.POSITIVE_INFINITY && (!Number.isInteger(maxBatches) || maxBatches < 1))
    throw new InvalidOptionError(`maxBatches must be a positive integer, got ${String(maxBatches)}`);
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  let schema: string;
  let table: string;
  try {
    schema = checkIdentifier(options.schema ?? DEFAULT_SCHEMA, 'schema');
    table = checkIdentifier(options.table ?? DEFAULT_TABLE, 'table');
  } catch (err) {
    throw new InvalidOptionError((err as Error).message);
  }
  const t = `"${schema}"."${table}"`;
  const text = `delete from ${t} where (scope, key) in (
  select scope, key from ${t}
  where expires_at <= clock_timestamp() and not (state = 'running' and lease_expires_at > clock_timestamp())
  order by expires_at limit $1 for update skip locked)`;
  const result: PurgeResult = { deleted: 0, batches: 0 };
  while (result.batches < maxBatches) {
    if (signal?.aborted) break;
    let n: number;
    try {
      n = await inTransaction(runner, {}, async (scope) => {
        const [rows] = await scope.conn.send([
          { text: `with gone as (${text} returning 1) select count(*)::int as n from gone`, params: [batchSize] },
        ]);
        return Number(rows?.[0]?.n ?? 0);
      });
    } catch (err) {
      if (sqlState(err) === '42P01') throw new IdempotencyNotMigratedError(`${schema}.${table}`, { cause: err });
      throw err;
    }
    result.batches++;
    result.deleted += n;
    if (n < batchSize) break;
  }
  return result;
}
