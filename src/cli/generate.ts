// `pgcoord generate`: write the migration that creates pgcoord's tables into the app's own
// migrations folder: the idempotency table (under the names given) and the objects of the
// capabilities whose names are fixed in the `pgcoord` schema (FIXED below: the lease tables, the
// fence sequence and the pgcoord.check_fence function; the rate limit table; the queue tables, their
// two sequences and the queue_* and check_queue_fence functions). The definitions come
// from the drizzle schemas the library uses at runtime and from the shipped migrations; there is no
// second copy of the DDL here.
//
// drizzle layout: the new snapshot is the folder's latest snapshot plus pgcoord's tables and
// sequences, and the SQL is drizzle-kit's own diff between the two, so `drizzle-kit generate` /
// `check` afterwards see nothing to do (as long as the drizzle schema exports pgcoord's tables,
// sequences and their pgSchemas). drizzle-kit does not model functions: the shipped migrations'
// function statements are appended to the SQL file, unless a migration of the folder has them
// already. Plain SQL: the statements pgcoord's migrate functions run
// (`migrate()`, `migrateLeases()`, `migrateLimits()`, `migrateQueue()`), for the shipped migrations no file of the
// folder has yet.

import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { is } from 'drizzle-orm';
import { getTableConfig, isPgSequence, type PgSequence, PgTable, pgSchema } from 'drizzle-orm/pg-core';
import { idempotencyMigrations } from '../idempotency/migrate.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, idempotencyTable } from '../idempotency/schema.js';
import { leaseMigrations } from '../lease/migrate.js';
import * as leaseSchema from '../lease/schema.js';
import * as limitSchema from '../limit/schema.js';
import { type Migration, shippedMigrations, statementsSql } from '../migrations.js';
import { queueMigrations } from '../queue/migrate.js';
import * as queueSchema from '../queue/schema.js';
import { describe, textProblem } from '../text.js';
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
  /**
   * Migration name: the tag suffix (drizzle) or the file name without `.sql` (sql). Default
   * `pgcoord` / `pgcoord_<table>` (`pgcoord_<newest shipped migration>`, e.g. `pgcoord_0001_leases`,
   * when the folder has the idempotency table already).
   */
  name?: string;
  /** Where drizzle-kit is resolved from (the app's project). Default `process.cwd()`. */
  cwd?: string;
}

/** What {@link generateMigration} did. */
export interface GenerateResult {
  /** `written`: new files; `up-to-date`: the folder already creates all of pgcoord's tables, nothing changed. */
  status: 'written' | 'up-to-date';
  /** Files written, or (up-to-date) the migrations that already create the tables, when known. */
  files: string[];
  /** The SQL statements of the new migration (empty when up-to-date). */
  statements: string[];
  /** What the app's drizzle schema must export so drizzle-kit keeps seeing the tables and sequences (drizzle format). */
  schemaExports?: string;
}

const ORIGIN_UUID = '00000000-0000-0000-0000-000000000000';
const NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$/;

const failed = (message: string, options?: { cause?: unknown }) => new CliFailedError(message, options);

/**
 * The capabilities whose objects have fixed names: their drizzle schema module (the tables and
 * sequences it exports, under the names the package root exports them by, are what drizzle-kit's
 * snapshot knows) and their shipped migrations (what their migrate function runs, functions
 * included). A new capability is one line here.
 */
const FIXED: readonly { module: Record<string, unknown>; migrations: () => Migration[] }[] = [
  { module: leaseSchema, migrations: leaseMigrations },
  { module: limitSchema, migrations: () => shippedMigrations('limits', (text) => text, failed) },
  { module: queueSchema, migrations: queueMigrations },
];

/** The fixed capabilities' drizzle tables and sequences, by export name. */
function fixedObjects(): Record<string, PgTable | PgSequence> {
  const out: Record<string, PgTable | PgSequence> = {};
  for (const { module } of FIXED)
    for (const [name, value] of Object.entries(module)) if (is(value, PgTable) || isPgSequence(value)) out[name] = value;
  return out;
}

/** Schema and name of a drizzle table or sequence. */
function qualified(value: PgTable | PgSequence): { schema: string; name: string } {
  if (is(value, PgTable)) {
    const config = getTableConfig(value);
    return { schema: config.schema ?? 'public', name: config.name };
  }
  return { schema: value.schema ?? 'public', name: value.seqName ?? '' };
}

/** The schemas the fixed capabilities' objects live in (`pgcoord`). */
function fixedSchemas(): string[] {
  return unique(Object.values(fixedObjects()).map((v) => qualified(v).schema));
}

const FUNCTION = /^CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+("[^"]+"\."[^"]+")\s*\(/i;

/** The shipped statements drizzle-kit's snapshot does not model: CREATE FUNCTION, in order. */
function functionStatements(migrations: readonly Migration[]): string[] {
  return migrations.flatMap((m) => m.statements).filter((s) => FUNCTION.test(s));
}

/** Snapshot JSON as drizzle-kit writes it (only the fields used here are typed). */
interface Snapshot {
  id: string;
  prevId: string;
  version: string;
  dialect: string;
  tables: Record<string, unknown>;
  schemas: Record<string, string>;
  sequences?: Record<string, unknown>;
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
  if (typeof value !== 'string') throw new CliUsageError(`invalid --${what}: expected a name, got ${describe(value)}`);
  if (value.length === 0) throw new CliUsageError(`invalid --${what}: the name is empty`);
  if (value.length > 63 || Buffer.byteLength(value) > 63)
    throw new CliUsageError(`invalid --${what} ${describe(value)}: longer than 63 bytes (PostgreSQL's limit)`);
  try {
    return checkIdentifier(value, what);
  } catch {
    const max = what === 'table' ? 40 : 63;
    throw new CliUsageError(
      `invalid --${what} ${describe(value)}: use lower-case letters, digits and _ (not first), at most ${max} characters`,
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
  if (options === null || typeof options !== 'object') throw new CliUsageError(`options must be an object, got ${describe(options)}`);
  const format = options.format ?? 'drizzle';
  if (format !== 'drizzle' && format !== 'sql') throw new CliUsageError(`invalid --format ${describe(format)}: use drizzle or sql`);
  const schema = checkName(options.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkName(options.table ?? DEFAULT_TABLE, 'table');
  if (options.name !== undefined && (typeof options.name !== 'string' || !NAME.test(options.name)))
    throw new CliUsageError(`invalid --name ${describe(options.name)}: use letters, digits, _, . and -`);
  checkNotPgcoords(schema, table);
  const cwd = checkPath(options.cwd, 'cwd') ?? process.cwd();
  const out = resolve(cwd, checkPath(options.out, 'out') ?? (format === 'sql' ? 'migrations' : 'drizzle'));
  return format === 'sql'
    ? generateSql(out, schema, table, options.name)
    : generateDrizzle(out, schema, table, options.name ?? 'pgcoord', cwd);
}

// The relations pgcoord creates besides the idempotency table (the fixed capabilities' tables,
// their indexes, their sequences, and pgcoord.__migrations), as `schema.name`. An idempotency table
// may not take one of these names, for itself or for its indexes: the migration would fail halfway.
// A table's indexes include those behind its constraints: a one-column primary key's `<table>_pkey`,
// and drizzle-kit's names for composite primary keys and unique constraints (`queue_keys_queue_key_pk`).
function pgcoordRelations(): Set<string> {
  const names = [`${DEFAULT_SCHEMA}.__migrations`, `${DEFAULT_SCHEMA}.__migrations_pkey`];
  for (const value of Object.values(fixedObjects())) {
    const { schema, name } = qualified(value);
    names.push(`${schema}.${name}`);
    if (is(value, PgTable)) {
      const config = getTableConfig(value);
      names.push(
        `${schema}.${name}_pkey`,
        ...config.indexes.map((i) => `${schema}.${i.config.name}`),
        ...config.primaryKeys.map((pk) => `${schema}.${pk.getName()}`),
        ...config.uniqueConstraints.map((u) => `${schema}.${u.getName()}`),
      );
    }
  }
  return new Set(names);
}

function checkNotPgcoords(schema: string, table: string) {
  const taken = pgcoordRelations();
  const clash = [table, `${table}_pkey`, `${table}_running_lease_idx`, `${table}_expires_idx`].find((n) => taken.has(`${schema}.${n}`));
  if (clash !== undefined)
    throw new CliUsageError(
      `invalid --table ${describe(table)}: ${schema}.${clash} is one of pgcoord's own relations; choose another table name or --schema`,
    );
}

// A folder given by the caller: a non-empty string the file system takes as written (no NUL, no
// lone surrogate, which would name another file), at most 4096 characters.
function checkPath(value: unknown, what: 'out' | 'cwd'): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || value.length === 0 || value.length > 4096)
    throw new CliUsageError(`invalid --${what}: expected a folder path, got ${describe(value)}`);
  const problem = textProblem(value);
  if (problem !== undefined) throw new CliUsageError(`invalid --${what} ${describe(value)}: the path ${problem}`);
  return value;
}

// A shipped migration some file of the folder has already (written by an earlier run, maybe
// renamed): one that contains its first statement after any CREATE SCHEMA.
function markerOf(m: Migration): string {
  return (m.statements.find((st) => !/^CREATE SCHEMA/i.test(st)) ?? m.statements[0] ?? '').replace(/;\s*$/, '');
}

/** `sequence pgcoord.lease_fence, pgcoord.leases, function pgcoord.check_fence`: what statements create. */
function created(statements: readonly string[]): string {
  const objects = statements.flatMap((st) => {
    const m = /^CREATE\s+(?:OR\s+REPLACE\s+)?(TABLE|SEQUENCE|FUNCTION|VIEW)\s+"([^"]+)"\."([^"]+)"/i.exec(st);
    return m ? [`${m[1]?.toUpperCase() === 'TABLE' ? '' : `${m[1]?.toLowerCase()} `}${m[2]}.${m[3]}`] : [];
  });
  return objects.join(', ');
}

function generateSql(out: string, schema: string, table: string, name: string | undefined): GenerateResult {
  const idempotency = idempotencyMigrations({ schema, table });
  // In the shipped order (the tags start with the journal's index), whichever capability they are of.
  const fixed = FIXED.flatMap((part) => part.migrations()).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const existing = existsSync(out)
    ? readdirSync(out)
        .filter((f) => f.endsWith('.sql'))
        .sort()
        .map((f) => ({ file: join(out, f), text: readFileSync(join(out, f), 'utf8') }))
    : [];
  const having = (m: Migration) => existing.find((e) => e.text.includes(markerOf(m)))?.file;
  const missingIdempotency = idempotency.filter((m) => having(m) === undefined);
  const missingFixed = fixed.filter((m) => having(m) === undefined);
  if (missingIdempotency.length === 0 && missingFixed.length === 0)
    return { status: 'up-to-date', files: unique([...idempotency, ...fixed].map(having)), statements: [] };
  // The fixed capabilities' migrations assume their schema exists (their migrate function makes it).
  const fixedStatements = missingFixed.length
    ? [...fixedSchemas().map((s) => `CREATE SCHEMA IF NOT EXISTS "${s}"`), ...missingFixed.flatMap((m) => m.statements)]
    : [];
  const statements = unique([...missingIdempotency.flatMap((m) => m.statements), ...fixedStatements].map((s) => s.replace(/;\s*$/, '')));
  const what = [
    ...(missingIdempotency.length ? [`idempotency table "${schema}"."${table}"`] : []),
    ...(missingFixed.length ? [`${created(fixedStatements)} (migrations ${missingFixed.map((m) => m.id).join(', ')})`] : []),
  ];
  const text = `-- pgcoord: ${what.join('; ')} (written by \`pgcoord generate --format sql\`; apply once)\n\n${statementsSql(statements)}\n`;
  const newest = missingFixed.at(-1)?.id;
  const file = join(out, `${name ?? (missingIdempotency.length || newest === undefined ? `pgcoord_${table}` : `pgcoord_${newest}`)}.sql`);
  if (existsSync(file)) {
    if (readFileSync(file, 'utf8') === text) return { status: 'up-to-date', files: [file], statements: [] };
    throw new CliFailedError(`${file} exists with different content; remove it or choose another --name`);
  }
  mkdirSync(out, { recursive: true });
  writeAtomic(file, text);
  return { status: 'written', files: [file], statements };
}

/** The defined values of `values`, first occurrence kept, in order. */
function unique<T>(values: readonly (T | undefined)[]): T[] {
  return [...new Set(values.filter((v): v is T => v !== undefined))];
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
  const entries = [...journal.entries].sort((a, b) => a.idx - b.idx);
  const last = entries.at(-1);
  const prev: Snapshot = last ? readJson<Snapshot>(snapshotFile(out, last.tag)) : { ...kit.generateDrizzleJson({}), id: ORIGIN_UUID };
  if (last && prev.version !== '7')
    throw new CliFailedError(`${snapshotFile(out, last.tag)} is snapshot version ${prev.version}; run \`drizzle-kit up\` first`);
  const imports: Record<string, unknown> = { ...fixedObjects(), idempotencyKeys: idempotencyTable({ schema, table }) };
  for (const name of unique([...(schema === 'public' ? [] : [schema]), ...fixedSchemas()])) imports[`schema:${name}`] = pgSchema(name);
  const ours = kit.generateDrizzleJson(imports, prev.id);
  const next: Snapshot = {
    ...prev,
    id: ours.id,
    prevId: prev.id,
    tables: { ...prev.tables, ...ours.tables },
    schemas: { ...prev.schemas, ...ours.schemas },
    sequences: { ...prev.sequences, ...ours.sequences },
    _meta: { columns: {}, schemas: {}, tables: {} },
  };
  const schemaExports = exportsSnippet(schema, table);
  // The shipped function statements no migration of the folder has yet (drizzle-kit's snapshots do not know functions).
  const sqlOf = (tag: string) => (existsSync(join(out, `${tag}.sql`)) ? readFileSync(join(out, `${tag}.sql`), 'utf8') : '');
  const functionIn = (statement: string) => entries.find((e) => createsFunction(sqlOf(e.tag), statement));
  const shippedFunctions = functionStatements(FIXED.flatMap((part) => part.migrations()));
  const functions = shippedFunctions.filter((s) => functionIn(s) === undefined);
  const statements = [
    ...(await kit.generateMigration(prev, next)).map((s) => s.trim().replace(/^CREATE SCHEMA "/, 'CREATE SCHEMA IF NOT EXISTS "')),
    ...functions,
  ];
  if (statements.length === 0) {
    const snapshots = new Map<string, Snapshot>();
    const snapshotOf = (tag: string) => {
      if (!snapshots.has(tag) && existsSync(snapshotFile(out, tag))) snapshots.set(tag, readJson<Snapshot>(snapshotFile(out, tag)));
      return snapshots.get(tag);
    };
    const having = [
      ...Object.keys(ours.tables).map((key) => entries.find((e) => key in (snapshotOf(e.tag)?.tables ?? {}))),
      ...shippedFunctions.map(functionIn),
    ];
    return {
      status: 'up-to-date',
      files: unique(having.map((e) => e?.tag))
        .sort()
        .map((tag) => join(out, `${tag}.sql`)),
      statements,
      schemaExports,
    };
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

/**
 * True when `sql` (a migration of the folder) already does what `statement` does: has its exact
 * text, or, for a plain CREATE FUNCTION (which would fail if run twice), creates a function of that
 * name. A later shipped CREATE OR REPLACE (a new body) is found only by its own text.
 */
function createsFunction(sql: string, statement: string): boolean {
  if (sql.includes(statement.replace(/;\s*$/, ''))) return true;
  const match = FUNCTION.exec(statement);
  if (match?.[1] === undefined || /^CREATE\s+OR\s+REPLACE/i.test(statement)) return false;
  const quoted = match[1].replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(`CREATE\\s+(?:OR\\s+REPLACE\\s+)?FUNCTION\\s+${quoted}\\s*\\(`, 'i').test(sql);
}

function writeAtomic(file: string, text: string) {
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, text);
  renameSync(tmp, file);
}

/** The lines the app's drizzle schema needs so drizzle-kit keeps pgcoord's tables, sequences and schemas. */
export function exportsSnippet(schema: string, table: string): string {
  const fixed = Object.keys(fixedObjects()).sort();
  const lines = ["import { pgSchema } from 'drizzle-orm/pg-core';"];
  if (schema === DEFAULT_SCHEMA && table === DEFAULT_TABLE)
    lines.push(`export { ${['idempotencyKeys', ...fixed].join(', ')} } from 'pgcoord';`);
  else
    lines.push(
      "import { idempotencyTable } from 'pgcoord';",
      `export { ${fixed.join(', ')} } from 'pgcoord';`,
      `export const idempotencyKeys = idempotencyTable({ schema: '${schema}', table: '${table}' });`,
    );
  const schemas = unique([...(schema === 'public' ? [] : [schema]), ...fixedSchemas()]);
  for (const name of schemas) {
    const variable = name === DEFAULT_SCHEMA ? 'pgcoordSchema' : name === schema ? 'idempotencySchema' : `${name}Schema`;
    lines.push(`export const ${variable} = pgSchema('${name}'); // omit if your schema file already exports pgSchema('${name}')`);
  }
  return lines.join('\n');
}
