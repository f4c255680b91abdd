// Deploy-time migrations of the limit tables (pgcoord.rate_limits): the shipped drizzle-kit SQL
// whose tag ends with `_limits`, applied like every pgcoord table's (src/migrations.ts).

import type { Runner } from '../driver/index.js';
import { PgcoordError } from '../errors.js';
import { applyMigrations, type MigrateResult, shippedMigrations, statementsSql } from '../migrations.js';
import { LIMIT_SCHEMA } from './schema.js';

/** A limit migration cannot be read, or was applied with other content than what ships now. */
export class LimitMigrationError extends PgcoordError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('PGCOORD_LIMIT_MIGRATION', message, options);
  }
}

const fail = (message: string, options?: { cause?: unknown }) => new LimitMigrationError(message, options);
const migrations = () => shippedMigrations('limits', (text) => text, fail);

/** The SQL that creates the limit tables, for other migration tools. */
export function limitSql(): string {
  // the schema first: migrateLimits creates it itself, other tools may run this on a bare database
  return statementsSql([`CREATE SCHEMA IF NOT EXISTS "${LIMIT_SCHEMA}"`, ...migrations().flatMap((m) => m.statements)]);
}

/**
 * Create the limit tables if they are not there yet, at deploy time. Safe to run from many
 * processes at once; a failed migration leaves nothing behind.
 *
 * @example
 * await migrateLimits(sql);
 */
export function migrateLimits(runner: Runner): Promise<MigrateResult> {
  try {
    return applyMigrations(runner, 'limits:pgcoord', migrations(), fail);
  } catch (err) {
    return Promise.reject(err);
  }
}
