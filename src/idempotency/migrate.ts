// Deploy-time migrations of the idempotency table. The SQL is what drizzle-kit generated from
// schema.ts into `drizzle/` (shipped with the package); `migrate()` applies the missing ones,
// renamed for the configured schema and table, and records them in pgcoord.__migrations. There is
// no DDL anywhere on the request path.

import type { Runner } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { applyMigrations, type MigrateResult, type Migration, migrationsSql, shippedMigrations } from '../migrations.js';
import { IdempotencyMigrationError } from './errors.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, type IdempotencyTableNames } from './schema.js';

export type { MigrateResult, Migration };

export interface MigrateOptions extends IdempotencyTableNames {
  /** Folder with drizzle-kit output (`meta/_journal.json` and the `.sql` files). Default: the package's `drizzle/`. */
  migrationsFolder?: string;
}

const fail = (message: string, options?: { cause?: unknown }) => new IdempotencyMigrationError(message, options);

function quote(name: string): string {
  return `"${name}"`;
}

/**
 * Rename drizzle-kit's SQL (written for `pgcoord.idempotency_keys`) to other names: the schema
 * identifier, and the table name as the prefix of every derived identifier (indexes, constraints).
 * `CREATE SCHEMA` becomes `CREATE SCHEMA IF NOT EXISTS` (the schema may be the app's own).
 */
export function renameSql(text: string, names: IdempotencyTableNames = {}): string {
  const schema = checkIdentifier(names.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkIdentifier(names.table ?? DEFAULT_TABLE, 'table');
  return text
    .replace(/CREATE SCHEMA "/g, 'CREATE SCHEMA IF NOT EXISTS "')
    .replace(new RegExp(`"${DEFAULT_SCHEMA}"`, 'g'), quote(schema))
    .replace(new RegExp(`"${DEFAULT_TABLE}(_[a-z0-9_]*)?"`, 'g'), (_m, suffix: string | undefined) => quote(`${table}${suffix ?? ''}`));
}

/**
 * The shipped migrations, renamed for `names`, in order. Reads the folder; no database access.
 *
 * @example
 * for (const m of idempotencyMigrations({ schema: 'billing' })) console.log(m.statements.join(';\n'));
 */
export function idempotencyMigrations(options: MigrateOptions = {}): Migration[] {
  return shippedMigrations(DEFAULT_TABLE, (text) => renameSql(text, options), fail, options.migrationsFolder);
}

/**
 * The SQL that creates the idempotency table under the given names (all shipped migrations, in
 * order), e.g. for a CLI that prints or writes migrations for custom names.
 *
 * @example
 * idempotencySql({ schema: 'billing', table: 'idem' }) // 'CREATE SCHEMA IF NOT EXISTS "billing";\n...'
 */
export function idempotencySql(options: MigrateOptions = {}): string {
  return migrationsSql(idempotencyMigrations(options));
}

/**
 * Apply the idempotency table's migrations that are not applied yet, at deploy time. Safe to run
 * from many processes at once (one transaction under an advisory lock: see migrations.ts); a
 * failed migration leaves nothing behind.
 *
 * @throws {@link IdempotencyMigrationError} when an applied migration was edited after release.
 * @example
 * await migrate(sql);                                   // pgcoord.idempotency_keys
 * await migrate(sql, { schema: 'billing', table: 'idem' });
 */
export async function migrate(runner: Runner, options: MigrateOptions = {}): Promise<MigrateResult> {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('migrate options must be an object');
  let migrations: Migration[];
  try {
    migrations = idempotencyMigrations(options);
  } catch (err) {
    if (err instanceof TypeError) throw new InvalidOptionError(err.message);
    throw err;
  }
  const target = `idempotency:${options.schema ?? DEFAULT_SCHEMA}.${options.table ?? DEFAULT_TABLE}`;
  return applyMigrations(runner, target, migrations, fail);
}
