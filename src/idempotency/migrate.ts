// Deploy-time migrations of the idempotency table. The SQL is what drizzle-kit generated from
// schema.ts into `drizzle/` (shipped with the package); `migrate()` applies the missing ones,
// renamed for the configured schema and table, and records them in pgcoord.__migrations. There is
// no DDL anywhere on the request path.

import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { withLock } from '../advisory.js';
import { InvalidOptionError } from '../errors.js';
import { hashKey } from '../keys.js';
import { inTransaction, type Runner } from '../runner.js';
import { IdempotencyMigrationError } from './errors.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, type IdempotencyTableNames } from './schema.js';

/** One migration, ready to run for the chosen names. */
export interface Migration {
  /** drizzle-kit's tag, e.g. `0000_idempotency_keys`. */
  id: string;
  /** SHA-256 (hex) of the shipped file, before renaming; recorded so later edits are caught. */
  hash: string;
  statements: string[];
}

export interface MigrateOptions extends IdempotencyTableNames {
  /** Folder with drizzle-kit output (`meta/_journal.json` and the `.sql` files). Default: the package's `drizzle/`. */
  migrationsFolder?: string;
}

/** Result of {@link migrate}. */
export interface MigrateResult {
  /** Migrations applied by this call, in order. */
  applied: string[];
  /** Migrations that were already applied (by this or another process). */
  skipped: string[];
}

const MIGRATIONS_TABLE = 'pgcoord.__migrations';

function findFolder(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = join(dir, 'drizzle');
    if (existsSync(join(candidate, 'meta', '_journal.json'))) return candidate;
    dir = dirname(dir);
  }
  throw new IdempotencyMigrationError('cannot find the shipped drizzle/ migrations folder; pass migrationsFolder');
}

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
  const folder = options.migrationsFolder ?? findFolder();
  let journal: { entries: { idx: number; tag: string }[] };
  try {
    journal = JSON.parse(readFileSync(join(folder, 'meta', '_journal.json'), 'utf8'));
  } catch (err) {
    throw new IdempotencyMigrationError(`cannot read ${join(folder, 'meta', '_journal.json')}`, { cause: err });
  }
  return [...journal.entries]
    .sort((a, b) => a.idx - b.idx)
    .map((entry) => {
      const text = readFileSync(join(folder, `${entry.tag}.sql`), 'utf8');
      return {
        id: entry.tag,
        hash: createHash('sha256').update(text).digest('hex'),
        statements: renameSql(text, options)
          .split('--> statement-breakpoint')
          .map((s) => s.trim())
          .filter((s) => s.length > 0),
      };
    });
}

/**
 * The SQL that creates the idempotency table under the given names (all shipped migrations, in
 * order), e.g. for a CLI that prints or writes migrations for custom names.
 *
 * @example
 * idempotencySql({ schema: 'billing', table: 'idem' }) // 'CREATE SCHEMA IF NOT EXISTS "billing";\n...'
 */
export function idempotencySql(options: MigrateOptions = {}): string {
  return idempotencyMigrations(options)
    .flatMap((m) => m.statements)
    .map((s) => `${s.replace(/;\s*$/, '')};`)
    .join('\n\n');
}

/**
 * Apply the idempotency table's migrations that are not applied yet, at deploy time. Safe to run
 * from many processes at once: everything happens in one transaction holding a transaction-scoped
 * advisory lock (`hashKey('migrate', 'pgcoord')`), so a second deploy waits, then sees the first
 * one's rows in pgcoord.__migrations and applies nothing. DDL is transactional in Postgres: a
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
  return withLock(runner, hashKey('migrate', 'pgcoord'), (tx) =>
    // Join the locked transaction to send statements through pgcoord's connection view.
    inTransaction(tx as Runner, {}, async (scope) => {
      const [, , done] = await scope.conn.send([
        { text: 'create schema if not exists pgcoord' },
        {
          text: `create table if not exists ${MIGRATIONS_TABLE} (target text not null, id text not null, hash text not null, applied_at timestamptz not null default now(), primary key (target, id))`,
        },
        { text: `select id, hash from ${MIGRATIONS_TABLE} where target = $1`, params: [target] },
      ]);
      const applied = new Map((done ?? []).map((r) => [String(r.id), String(r.hash)]));
      const result: MigrateResult = { applied: [], skipped: [] };
      for (const m of migrations) {
        const hash = applied.get(m.id);
        if (hash !== undefined) {
          if (hash !== m.hash)
            throw new IdempotencyMigrationError(
              `migration ${m.id} of ${target} was applied with a different content (hash ${hash.slice(0, 12)}, shipped ${m.hash.slice(0, 12)}): shipped migrations must never be edited`,
            );
          result.skipped.push(m.id);
          continue;
        }
        await scope.conn.send([
          ...m.statements.map((text) => ({ text })),
          { text: `insert into ${MIGRATIONS_TABLE} (target, id, hash) values ($1, $2, $3)`, params: [target, m.id, m.hash] },
        ]);
        result.applied.push(m.id);
      }
      return result;
    }),
  );
}
