// `pgcoord generate`: write the migration that creates pgcoord's tables into the app's own
// migrations folder. The table definitions come from the drizzle schema the library uses at
// runtime (src/idempotency/schema.ts); there is no second copy of the DDL here.
//
// drizzle layout: the new snapshot is the folder's latest snapshot plus pgcoord's tables, and the
// SQL is drizzle-kit's own diff between the two, so `drizzle-kit generate` / `check` afterwards see
// nothing to do (as long as the drizzle schema exports pgcoord's table and, unless it is `public`,
// its pgSchema). Plain SQL: the statements pgcoord's `migrate()` runs for the same names.

import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { pgSchema } from 'drizzle-orm/pg-core';
import { idempotencySql } from '../idempotency/migrate.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, idempotencyTable } from '../idempotency/schema.js';
import { CliFailedError, CliUsageError } from './errors.js';

/** Options of {@link generateMigration}. */
export interface GenerateOptions {
  /** Migrations folder (created when missing). Default `drizzle` (drizzle format) or `migrations` (sql). */
  out?: string;
  /** `drizzle` (default): drizzle-kit's layout. `sql`: one plain SQL file for other migration tools. */
  format?: 'drizzle' | 'sql';
  /** Schema of the idempotency table. Default `pgcoord`. */
  schema?: string;
  /** Name of the idempotency table. Default `idempotency_keys`. */
  table?: string;
  /** Migration name: the tag suffix (drizzle) or the file name without `.sql` (sql). Default `pgcoord` / `pgcoord_<table>`. */
  name?: string;
  /** Where drizzle-kit is resolved from (the app's project). Default `process.cwd()`. */
  cwd?: string;
}

/** What {@link generateMigration} did. */
export interface GenerateResult {
  /** `written`: new files; `up-to-date`: the folder already creates these tables, nothing changed. */
  status: 'written' | 'up-to-date';
  /** Files written, or (up-to-date) the migration that already has the tables, when known. */
  files: string[];
  /** The SQL statements of the new migration (empty when up-to-date). */
  statements: string[];
  /** What the app's drizzle schema must export so drizzle-kit keeps seeing the tables (drizzle format). */
  schemaExports?: string;
}

const ORIGIN_UUID = '00000000-0000-0000-0000-000000000000';
const NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$/;

/** Snapshot JSON as drizzle-kit writes it (only the fields used here are typed). */
interface Snapshot {
  id: string;
  prevId: string;
  version: string;
  dialect: string;
  tables: Record<string, unknown>;
  schemas: Record<string, string>;
  _meta?: unknown;
  [k: string]: unknown;
}

interface Journal {
  version: string;
  dialect: string;
  entries: { idx: number; version: string; when: number; tag: string; breakpoints: boolean }[];
}

interface DrizzleKitApi {
  generateDrizzleJson(imports: Record<string, unknown>, prevId?: string): Snapshot;
  generateMigration(prev: Snapshot, cur: Snapshot): Promise<string[]>;
}

/**
 * Check a schema or table name for the generator: a plain lower-case identifier (letters, digits,
 * `_`), at most 63 bytes (40 for a table, so derived index names fit). Throws {@link CliUsageError}.
 */
export function checkName(value: unknown, what: 'schema' | 'table'): string {
  if (typeof value !== 'string' || value.length === 0) throw new CliUsageError(`invalid --${what}: the name is empty`);
  if (Buffer.byteLength(value) > 63)
    throw new CliUsageError(`invalid --${what} ${JSON.stringify(value)}: longer than 63 bytes (PostgreSQL's limit)`);
  try {
    return checkIdentifier(value, what);
  } catch {
    const max = what === 'table' ? 40 : 63;
    throw new CliUsageError(
      `invalid --${what} ${JSON.stringify(value)}: use lower-case letters, digits and _ (not first), at most ${max} characters`,
    );
  }
}

/**
 * Write the migration creating pgcoord's tables into `out`, or report that it is already there.
 *
 * @throws {@link CliUsageError} for invalid names; {@link CliFailedError} when drizzle-kit is missing
 * (drizzle format) or a file is in the way.
 * @example
 * const r = await generateMigration({ out: 'drizzle' });          // drizzle-kit layout
 * await generateMigration({ out: 'db/migrations', format: 'sql', schema: 'billing' });
 * if (r.status === 'up-to-date') console.log('nothing to do');
 */
export async function generateMigration(options: GenerateOptions = {}): Promise<GenerateResult> {
  const format = options.format ?? 'drizzle';
  if (format !== 'drizzle' && format !== 'sql') throw new CliUsageError(`invalid --format ${JSON.stringify(format)}: use drizzle or sql`);
  const schema = checkName(options.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkName(options.table ?? DEFAULT_TABLE, 'table');
  if (options.name !== undefined && !NAME.test(options.name))
    throw new CliUsageError(`invalid --name ${JSON.stringify(options.name)}: use letters, digits, _, . and -`);
  const out = resolve(options.cwd ?? process.cwd(), options.out ?? (format === 'sql' ? 'migrations' : 'drizzle'));
  return format === 'sql'
    ? generateSql(out, schema, table, options.name ?? `pgcoord_${table}`)
    : generateDrizzle(out, schema, table, options.name ?? 'pgcoord', options.cwd ?? process.cwd());
}

function generateSql(out: string, schema: string, table: string, name: string): GenerateResult {
  const statements = idempotencySql({ schema, table })
    .split(/;\n\n/)
    .map((s) => s.replace(/;$/, ''));
  const text = `-- pgcoord: idempotency table "${schema}"."${table}" (written by \`pgcoord generate --format sql\`; apply once)\n\n${statements.map((s) => `${s};`).join('\n\n')}\n`;
  const file = join(out, `${name}.sql`);
  if (existsSync(file)) {
    if (readFileSync(file, 'utf8') === text) return { status: 'up-to-date', files: [file], statements: [] };
    throw new CliFailedError(`${file} exists with different content; remove it or choose another --name`);
  }
  const create = `CREATE TABLE "${schema}"."${table}" (`;
  for (const other of existsSync(out) ? readdirSync(out) : []) {
    if (other.endsWith('.sql') && readFileSync(join(out, other), 'utf8').includes(create))
      return { status: 'up-to-date', files: [join(out, other)], statements: [] };
  }
  mkdirSync(out, { recursive: true });
  writeAtomic(file, text);
  return { status: 'written', files: [file], statements };
}

async function loadDrizzleKit(cwd: string): Promise<DrizzleKitApi> {
  // The app's own drizzle-kit first (its snapshot format is the one its `drizzle-kit check` reads).
  try {
    const path = createRequire(join(resolve(cwd), 'package.json')).resolve('drizzle-kit/api');
    return (await import(pathToFileURL(path).href)) as DrizzleKitApi;
  } catch {
    try {
      return (await import('drizzle-kit/api' as string)) as DrizzleKitApi;
    } catch (err) {
      throw new CliFailedError(
        'drizzle-kit is not installed (the drizzle format needs it): npm install -D drizzle-kit, or use --format sql',
        {
          cause: err,
        },
      );
    }
  }
}

function readJson<T>(file: string): T {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as T;
  } catch (err) {
    throw new CliFailedError(`cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
}

function snapshotFile(out: string, tag: string): string {
  return join(out, 'meta', `${tag.split('_')[0]}_snapshot.json`);
}

async function generateDrizzle(out: string, schema: string, table: string, name: string, cwd: string): Promise<GenerateResult> {
  const kit = await loadDrizzleKit(cwd);
  const journalFile = join(out, 'meta', '_journal.json');
  const journal: Journal = existsSync(journalFile) ? readJson<Journal>(journalFile) : { version: '7', dialect: 'postgresql', entries: [] };
  if (journal.dialect !== 'postgresql') throw new CliFailedError(`${journalFile} is for ${journal.dialect}, not postgresql`);
  const last = [...journal.entries].sort((a, b) => a.idx - b.idx).at(-1);
  const prev: Snapshot = last ? readJson<Snapshot>(snapshotFile(out, last.tag)) : { ...kit.generateDrizzleJson({}), id: ORIGIN_UUID };
  if (last && prev.version !== '7')
    throw new CliFailedError(`${snapshotFile(out, last.tag)} is snapshot version ${prev.version}; run \`drizzle-kit up\` first`);
  const imports: Record<string, unknown> = { idempotencyKeys: idempotencyTable({ schema, table }) };
  if (schema !== 'public') imports.pgcoordSchema = pgSchema(schema);
  const ours = kit.generateDrizzleJson(imports, prev.id);
  const next: Snapshot = {
    ...prev,
    id: ours.id,
    prevId: prev.id,
    tables: { ...prev.tables, ...ours.tables },
    schemas: { ...prev.schemas, ...ours.schemas },
    _meta: { columns: {}, schemas: {}, tables: {} },
  };
  const schemaExports = exportsSnippet(schema, table);
  const statements = (await kit.generateMigration(prev, next)).map((s) =>
    s.trim().replace(/^CREATE SCHEMA "/, 'CREATE SCHEMA IF NOT EXISTS "'),
  );
  if (statements.length === 0) {
    const key = `${schema}.${table}`;
    const having = [...journal.entries]
      .sort((a, b) => a.idx - b.idx)
      .find((e) => existsSync(snapshotFile(out, e.tag)) && key in (readJson<Snapshot>(snapshotFile(out, e.tag)).tables ?? {}));
    return { status: 'up-to-date', files: having ? [join(out, `${having.tag}.sql`)] : [], statements, schemaExports };
  }
  const idx = last ? last.idx + 1 : 0;
  const tag = `${String(idx).padStart(4, '0')}_${name}`;
  if (journal.entries.some((e) => e.tag === tag) || existsSync(join(out, `${tag}.sql`)))
    throw new CliFailedError(`${join(out, `${tag}.sql`)} already exists; choose another --name`);
  mkdirSync(join(out, 'meta'), { recursive: true });
  const sqlFile = join(out, `${tag}.sql`);
  const snapFile = snapshotFile(out, tag);
  writeAtomic(sqlFile, statements.join('\n--> statement-breakpoint\n'));
  writeAtomic(snapFile, `${JSON.stringify(next, null, 2)}\n`);
  journal.entries.push({ idx, version: '7', when: Date.now(), tag, breakpoints: true });
  writeAtomic(journalFile, JSON.stringify(journal, null, 2)); // last: the journal makes the migration visible
  return { status: 'written', files: [sqlFile, snapFile, journalFile], statements, schemaExports };
}

function writeAtomic(file: string, text: string) {
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, text);
  renameSync(tmp, file);
}

/** The lines the app's drizzle schema needs so drizzle-kit keeps pgcoord's tables (and schema). */
export function exportsSnippet(schema: string, table: string): string {
  const lines =
    schema === DEFAULT_SCHEMA && table === DEFAULT_TABLE
      ? ["export { idempotencyKeys } from 'pgcoord';"]
      : [
          "import { idempotencyTable } from 'pgcoord';",
          `export const idempotencyKeys = idempotencyTable({ schema: '${schema}', table: '${table}' });`,
        ];
  if (schema !== 'public') {
    lines.unshift("import { pgSchema } from 'drizzle-orm/pg-core';");
    lines.push(`export const pgcoordSchema = pgSchema('${schema}'); // omit if your schema file already exports pgSchema('${schema}')`);
  }
  return lines.join('\n');
}
