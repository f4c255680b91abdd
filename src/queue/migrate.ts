// Deploy-time migrations of the queue tables (pgcoord.queue_jobs, queue_keys, queue_order, their
// sequences and functions): the shipped drizzle-kit SQL whose tag ends with `_queue`, applied like
// every pgcoord table's (src/migrations.ts).

import type { Runner } from '../driver/index.js';
import { PgcoordError } from '../errors.js';
import { applyMigrations, type MigrateResult, type Migration, shippedMigrations, statementsSql } from '../migrations.js';
import { QUEUE_SCHEMA } from './schema.js';

/** A queue migration cannot be read, or was applied with other content than what ships now. */
export class QueueMigrationError extends PgcoordError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('PGCOORD_QUEUE_MIGRATION', message, options);
  }
}

const fail = (message: string, options?: { cause?: unknown }) => new QueueMigrationError(message, options);

/** The shipped queue migrations, in order. Reads the package's `drizzle/` folder; no database access. */
export function queueMigrations(): Migration[] {
  return shippedMigrations('queue', (text) => text, fail);
}

/** The SQL that creates the queue tables (the `pgcoord` schema first), for other migration tools. */
export function queueSql(): string {
  return statementsSql([`CREATE SCHEMA IF NOT EXISTS "${QUEUE_SCHEMA}"`, ...queueMigrations().flatMap((m) => m.statements)]);
}

/**
 * Create the queue tables and functions if they are not there yet, at deploy time. Safe to run from
 * many processes at once; a failed migration leaves nothing behind.
 *
 * @throws {@link QueueMigrationError} when an applied migration was edited after release.
 * @example
 * await migrateQueue(sql);
 */
export function migrateQueue(runner: Runner): Promise<MigrateResult> {
  try {
    return applyMigrations(runner, 'queue:pgcoord', queueMigrations(), fail);
  } catch (err) {
    return Promise.reject(err);
  }
}
