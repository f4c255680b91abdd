// Deploy-time migrations of pgcoord's tables. The SQL is what drizzle-kit generated from the
// drizzle schemas into `drizzle/` (shipped with the package), one journal for every table; each
// capability applies its own entries (by tag) and records them in pgcoord.__migrations under a
// target name. There is no DDL anywhere on the request path.

import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { withLock } from './advisory.js';
import { inTransaction, type Runner } from './driver/index.js';
import type { PgcoordError } from './errors.js';
import { hashKey } from './keys.js';

/** One migration, ready to run. */
export interface Migration {
  /** drizzle-kit's tag, e.g. `0000_idempotency_keys`. */
  id: string;
  /** SHA-256 (hex) of the shipped file, before renaming; recorded so later edits are caught. */
  hash: string;
  statements: string[];
}

/** Result of a migrate function. */
export interface MigrateResult {
  /** Migrations applied by this call, in order. */
  applied: string[];
  /** Migrations that were already applied (by this or another process). */
  skipped: string[];
}

/** How a capability reports a shipped migration it cannot read, or one applied with other content. */
export type MigrationFailure = (message: string, options?: { cause?: unknown }) => PgcoordError;

const MIGRATIONS_TABLE = 'pgcoord.__migrations';

function findFolder(fail: MigrationFailure): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = join(dir, 'drizzle');
    if (existsSync(join(candidate, 'meta', '_journal.json'))) return candidate;
    dir = dirname(dir);
  }
  throw fail('cannot find the shipped drizzle/ migrations folder; pass migrationsFolder');
}

/**
 * The shipped migrations whose tag ends with `_<suffix>`, in order, each file passed through
 * `rename` and split into statements. Reads the folder; no database access.
 */
export function shippedMigrations(
  suffix: string,
  rename: (sql: string) => string,
  fail: MigrationFailure,
  folder = findFolder(fail),
): Migration[] {
  let journal: { entries: { idx: number; tag: string }[] };
  try {
    journal = JSON.parse(readFileSync(join(folder, 'meta', '_journal.json'), 'utf8'));
  } catch (err) {
    throw fail(`cannot read ${join(folder, 'meta', '_journal.json')}`, { cause: err });
  }
  return [...journal.entries]
    .filter((entry) => entry.tag.endsWith(`_${suffix}`))
    .sort((a, b) => a.idx - b.idx)
    .map((entry) => {
      const text = readFileSync(join(folder, `${entry.tag}.sql`), 'utf8');
      return {
        id: entry.tag,
        hash: createHash('sha256').update(text).digest('hex'),
        statements: rename(text)
          .split('--> statement-breakpoint')
          .map((s) => s.trim())
          .filter((s) => s.length > 0),
      };
    });
}

/** The statements of `migrations` as one SQL text (for a CLI, or other migration tools). */
export function migrationsSql(migrations: readonly Migration[]): string {
  return statementsSql(migrations.flatMap((m) => m.statements));
}

/**
 * Statements as one SQL text, each ended by `;` and separated by a blank line, for tools that run
 * a file of several statements (psql, Flyway). A statement is never split: a function body keeps
 * its own `;`.
 */
export function statementsSql(statements: readonly string[]): string {
  return statements.map((s) => `${s.replace(/;\s*$/, '')};`).join('\n\n');
}

/**
 * Apply the `migrations` of `target` that are not applied yet. Safe to run from many processes at
 * once: everything happens in one transaction holding a transaction-scoped advisory lock
 * (`hashKey('migrate', 'pgcoord')`), so a second deploy waits, then sees the first one's rows in
 * pgcoord.__migrations and applies nothing. DDL is transactional in Postgres: a failed migration
 * leaves nothing behind. Sends no NOTICE to the driver (`if not exists` on objects that exist
 * would print one per call with postgres.js's default `onnotice`).
 */
export function applyMigrations(
  runner: Runner,
  target: string,
  migrations: readonly Migration[],
  fail: MigrationFailure,
): Promise<MigrateResult> {
  return withLock(runner, hashKey('migrate', 'pgcoord'), (tx) =>
    // Join the locked transaction to send statements through pgcoord's connection view.
    inTransaction(tx as Runner, {}, async (scope) => {
      // `if not exists` answers with a NOTICE every time the object exists, which postgres.js
      // prints by default: hold client_min_messages at warning for this transaction's statements
      // (`set local`), and put the caller's value back at the end (in case this is their
      // transaction; in ours it ends with it anyway).
      const [before, , , , done] = await scope.conn.send([
        { text: `select current_setting('client_min_messages') as level` },
        { text: 'set local client_min_messages = warning' },
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
            throw fail(
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
      await scope.conn.send([
        { text: `select set_config('client_min_messages', $1, true)`, params: [String(before?.[0]?.level ?? 'notice')] },
      ]);
      return result;
    }),
  );
}
