// `pgcoord purge`: delete expired idempotency rows in batches (the library's purgeExpired, one
// batch per call so progress can be shown), or count them first with --dry-run.

import { inTransaction, type Row, type Runner } from '../driver/index.js';
import { sqlState } from '../errors.js';
import { IdempotencyNotMigratedError } from '../idempotency/errors.js';
import { purgeExpired } from '../idempotency/purge.js';
import { DEFAULT_SCHEMA, DEFAULT_TABLE } from '../idempotency/schema.js';
import { describe } from '../text.js';
import { CliUsageError } from './errors.js';
import { checkName } from './generate.js';

/** Options of {@link purgeWithProgress}. */
export interface PurgeCliOptions {
  schema?: string;
  table?: string;
  /** Rows per batch. Default 1000. */
  batchSize?: number;
  /** Stop after this many batches. Default: until none is left. */
  maxBatches?: number;
  /** Only count what would be deleted. */
  dryRun?: boolean;
  /** Called after each batch with the running totals. */
  onBatch?: (progress: { batches: number; deleted: number; expired: number }) => void;
  signal?: AbortSignal;
}

/** What {@link purgeWithProgress} found and did. */
export interface PurgeCliResult {
  /** Rows purgeable when it started (past retention, and not a running attempt with a live lease). */
  expired: number;
  /** All rows of the table when it started. */
  total: number;
  deleted: number;
  batches: number;
  dryRun: boolean;
}

/**
 * Count the purgeable rows, then (unless `dryRun`) delete them in batches with `purgeExpired`,
 * reporting progress after each batch.
 *
 * @example
 * const r = await purgeWithProgress(sql, { dryRun: true }); // { expired: 1200, total: 5000, deleted: 0, ... }
 */
export async function purgeWithProgress(runner: Runner, options: PurgeCliOptions = {}): Promise<PurgeCliResult> {
  if (options === null || typeof options !== 'object') throw new CliUsageError(`options must be an object, got ${describe(options)}`);
  const schema = checkName(options.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkName(options.table ?? DEFAULT_TABLE, 'table');
  const batchSize = options.batchSize ?? 1000;
  if (typeof batchSize !== 'number' || !Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1_000_000)
    throw new CliUsageError(`invalid --batch-size ${describe(batchSize)}: use an integer from 1 to 1000000`);
  const maxBatches = options.maxBatches ?? Number.POSITIVE_INFINITY;
  if (maxBatches !== Number.POSITIVE_INFINITY && (typeof maxBatches !== 'number' || !Number.isInteger(maxBatches) || maxBatches < 1))
    throw new CliUsageError(`invalid --max-batches ${describe(maxBatches)}: use a positive integer`);
  const { dryRun, onBatch, signal } = options;
  if (dryRun !== undefined && typeof dryRun !== 'boolean') throw new CliUsageError(`dryRun must be a boolean, got ${describe(dryRun)}`);
  if (onBatch !== undefined && typeof onBatch !== 'function')
    throw new CliUsageError(`onBatch must be a function, got ${describe(onBatch)}`);
  if (signal !== undefined && !(signal instanceof AbortSignal))
    throw new CliUsageError(`signal must be an AbortSignal, got ${describe(signal)}`);
  const t = `"${schema}"."${table}"`;
  let counts: Row | undefined;
  try {
    counts = await inTransaction(runner, { readOnly: true }, async (scope) => {
      const [rows] = await scope.conn.send([
        {
          text: `select count(*)::int as total, (count(*) filter (where expires_at <= clock_timestamp()
            and not (state = 'running' and lease_expires_at > clock_timestamp())))::int as expired from ${t}`,
        },
      ]);
      return rows?.[0];
    });
  } catch (err) {
    if (sqlState(err) === '42P01') throw new IdempotencyNotMigratedError(`${schema}.${table}`, { cause: err });
    throw err;
  }
  const result: PurgeCliResult = {
    expired: Number(counts?.expired ?? 0),
    total: Number(counts?.total ?? 0),
    deleted: 0,
    batches: 0,
    dryRun: Boolean(options.dryRun),
  };
  if (options.dryRun) return result;
  while (result.batches < maxBatches && !options.signal?.aborted) {
    const r = await purgeExpired(runner, { schema, table, batchSize, maxBatches: 1 });
    result.batches += r.batches;
    result.deleted += r.deleted;
    options.onBatch?.({ batches: result.batches, deleted: result.deleted, expired: result.expired });
    if (r.deleted < batchSize) break;
  }
  return result;
}
