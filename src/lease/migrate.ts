// Deploy-time migrations of the lease tables (pgcoord.leases, its fence sequence,
// pgcoord.singleton_runs and the pgcoord.check_fence function): the shipped drizzle-kit SQL whose
// tag ends with `_leases`, applied like the idempotency table's (src/migrations.ts).

import type { Runner } from '../driver/index.js';
import { PgcoordError } from '../errors.js';
import { applyMigrations, type MigrateResult, type Migration, shippedMigrations, statementsSql } from '../migrations.js';
import { LEASE_SCHEMA } from './schema.js';

/** A lease migration cannot be read, or was applied with other content than what ships now. */
export class LeaseMigrationError extends PgcoordError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('PGCOORD_LEASE_MIGRATION', message, options);
  }
}

const fail = (message: string, options?: { cause?: unknown }) => new LeaseMigrationError(message, options);

/** The shipped lease migrations, in order. Reads the package's `drizzle/` folder; no database access. */
export function leaseMigrations(): Migration[] {
  return shippedMigrations('leases', (text) => text, fail);
}

/**
 * The SQL that creates the lease tables (the `pgcoord` schema if missing, then all shipped lease
 * migrations, in order), for other migration tools.
 *
 * @example
 * writeFileSync('migrations/V8__pgcoord_leases.sql', leaseSql());
 */
export function leaseSql(): string {
  // migrateLeases creates the schema itself (migrations.ts); a file for other tools must too.
  return statementsSql([`CREATE SCHEMA IF NOT EXISTS "${LEASE_SCHEMA}"`, ...leaseMigrations().flatMap((m) => m.statements)]);
}

/**
 * Create the lease tables (pgcoord.leases, pgcoord.singleton_runs, the fence sequence and
 * `pgcoord.check_fence`) if they are not there yet, at deploy time. Safe to run from many processes
 * at once; a failed migration leaves nothing behind.
 *
 * @throws {@link LeaseMigrationError} when an applied migration was edited after release.
 * @example
 * await migrateLeases(sql);
 */
export function migrateLeases(runner: Runner): Promise<MigrateResult> {
  try {
    return applyMigrations(runner, 'leases:pgcoord', leaseMigrations(), fail);
  } catch (err) {
    return Promise.reject(err);
  }
}
