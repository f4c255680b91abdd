// `pgcoord generate` through the real CLI: drizzle-kit sees nothing left to do afterwards, the
// migration creates exactly what pgcoord's own migrate(), migrateLeases(), migrateLimits() and
// migrateQueue() create (and idempotent(), pgcoord.check_fence and the queue work on it), the
// functions drizzle-kit does not model come last in their shipped order, a second run changes
// nothing, a folder made before leases or before the queue existed gets only the new objects, and
// bad identifiers (pgcoord's own relation names among them) are refused with exit 2.
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { drizzle } from 'drizzle-orm/postgres-js';
import { migrate as drizzleMigrate } from 'drizzle-orm/postgres-js/migrator';
import { afterAll, describe, expect, inject, it } from 'vitest';
import * as api from '../src/index.js';
import {
  enqueue,
  type IdempotencyTableNames,
  idempotencySql,
  idempotent,
  migrateIdempotency,
  migrateLeases,
  migrateLimits,
  migrateQueue,
  queueMigrations,
  queueStats,
} from '../src/index.js';
import { statementsSql } from '../src/migrations.js';
import { createTestDatabase, type TestDatabase } from '../src/testing/index.js';
import { ROOT, runCli, runDrizzleKit, tempProject } from './fixtures/cli-run.js';
import { useTestDb } from './helpers.js';
import postgres from './pgjs.js';

const db = await useTestDb(4);
const extra: TestDatabase[] = [];
const pools: postgres.Sql[] = [];
const dirs: string[] = [];
afterAll(async () => {
  await Promise.all(pools.map((p) => p.end({ timeout: 1 })));
  await Promise.all(extra.map((d) => d.drop()));
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

async function freshDb(): Promise<postgres.Sql> {
  const d = await createTestDatabase(inject('databaseUrl'), 'pgcoord_cli');
  extra.push(d);
  const sql = postgres(d.url, { max: 2, onnotice: () => {} });
  pools.push(sql);
  return sql;
}

async function project(schemaTs: string): Promise<string> {
  const dir = await tempProject();
  dirs.push(dir);
  writeFileSync(join(dir, 'drizzle.config.ts'), "export default { dialect: 'postgresql', schema: './schema.ts', out: './migrations' };\n");
  writeFileSync(join(dir, 'schema.ts'), schemaTs);
  return dir;
}

const SCHEMA_MODULE = JSON.stringify(join(ROOT, 'src', 'idempotency', 'schema.ts'));
const exportsOf = (modules: string[]) =>
  modules.map((m) => `export * from ${JSON.stringify(join(ROOT, 'src', m, 'schema.ts'))};\n`).join('');
/** What an app's drizzle schema exports for pgcoord's fixed-name tables and sequences (`pgcoord generate` prints it). */
const FIXED_EXPORTS = exportsOf(['lease', 'limit', 'queue']);
/** The same before the queue existed. */
const PRE_QUEUE_EXPORTS = exportsOf(['lease', 'limit']);
/** The shipped migrations' tags, in order. */
const SHIPPED: string[] = JSON.parse(readFileSync(join(ROOT, 'drizzle', 'meta', '_journal.json'), 'utf8')).entries.map(
  (e: { tag: string }) => e.tag,
);
/** The newest shipped migration of pgcoord's fixed-name objects (not the idempotency table's). */
const NEWEST_FIXED = SHIPPED.filter((tag) => !tag.endsWith('_idempotency_keys')).at(-1) as string;
/** The shipped statements of pgcoord's fixed-name objects before the queue (leases, limits, single flight). */
const PRE_QUEUE_STATEMENTS = SHIPPED.filter((tag) => !tag.endsWith('_idempotency_keys') && !tag.endsWith('_queue')).flatMap((tag) =>
  readFileSync(join(ROOT, 'drizzle', `${tag}.sql`), 'utf8')
    .split('--> statement-breakpoint')
    .map((st) => st.trim())
    .filter((st) => st.length > 0),
);
/** The CREATE FUNCTION statement of pgcoord.check_fence, as shipped (what a pre-queue `pgcoord generate` appended). */
const CHECK_FENCE = PRE_QUEUE_STATEMENTS.find((st) => st.startsWith('CREATE FUNCTION "pgcoord"."check_fence"')) as string;
/** The functions drizzle-kit does not model, in the order pgcoord's migrations create them. */
const FUNCTIONS = [
  'check_fence',
  'queue_settle',
  'queue_claim',
  'queue_hold',
  'queue_complete',
  'queue_fail',
  'queue_skip',
  'check_queue_fence',
];
/** The queue's objects drizzle-kit creates, as the first line of each statement, in its order. */
const QUEUE_OBJECTS = [
  'CREATE SEQUENCE "pgcoord"."queue_fence" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;',
  'CREATE SEQUENCE "pgcoord"."queue_job_id" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;',
  'CREATE TABLE "pgcoord"."queue_jobs" (',
  'CREATE TABLE "pgcoord"."queue_keys" (',
  'CREATE TABLE "pgcoord"."queue_order" (',
  'CREATE UNIQUE INDEX "queue_jobs_key_idx" ON "pgcoord"."queue_jobs" USING btree ("queue","key","id");',
  'CREATE UNIQUE INDEX "queue_jobs_dedupe_idx" ON "pgcoord"."queue_jobs" USING btree ("queue","dedupe_key") WHERE "pgcoord"."queue_jobs"."dedupe_key" is not null;',
  'CREATE INDEX "queue_keys_ready_idx" ON "pgcoord"."queue_keys" USING btree ("queue","ready_at");',
];
/** The names of the functions `statements` create, in order. */
const functionsOf = (statements: readonly string[]) =>
  statements.flatMap((st) => {
    const m = /^CREATE FUNCTION "pgcoord"\."(\w+)"\(/.exec(st);
    return m ? [m[1]] : [];
  });
/** The first line of each statement (a statement's head names what it creates). */
const headsOf = (statements: readonly string[]) => statements.map((st) => (st.split('\n')[0] ?? '').trim());

/** What pgcoord's own migrate functions create, on the test database (`db.sql`). */
async function migrateAll(names?: IdempotencyTableNames) {
  await migrateIdempotency(db.sql, names);
  await migrateLeases(db.sql);
  await migrateLimits(db.sql);
  await migrateQueue(db.sql);
}
const DEFAULT_EXPORTS = `import { pgSchema } from 'drizzle-orm/pg-core';\nexport { idempotencyKeys } from ${SCHEMA_MODULE};\nexport const pgcoordSchema = pgSchema('pgcoord');\n`;

/** Columns, constraints and indexes of one table, as the catalog sees them. */
async function describeTable(sql: postgres.Sql, schema: string, table: string) {
  const columns = await sql`select column_name, data_type, is_nullable, column_default from information_schema.columns
    where table_schema = ${schema} and table_name = ${table} order by ordinal_position`;
  const constraints = await sql`select conname, pg_get_constraintdef(c.oid) as def from pg_constraint c
    where conrelid = to_regclass(${`"${schema}"."${table}"`}) order by conname`;
  const indexes =
    await sql`select indexname, indexdef from pg_indexes where schemaname = ${schema} and tablename = ${table} order by indexname`;
  return { columns: [...columns], constraints: [...constraints], indexes: [...indexes] };
}

/**
 * pgcoord's fixed-name objects: every relation in the pgcoord schema but the default idempotency
 * table (compared on its own) and pgcoord.__migrations (which the migrate functions keep for
 * themselves), the lease and queue tables' columns and constraints, the sequences and the
 * functions (with their bodies).
 */
async function describePgcoord(sql: postgres.Sql) {
  const relations = await sql`select relname, relkind from pg_class where relnamespace = 'pgcoord'::regnamespace
    and relname not like '\\_\\_migrations%' and relname not like 'idempotency\\_keys%' order by relname`;
  const sequences = await sql`select sequencename, data_type::text, start_value, min_value, max_value, increment_by, cycle, cache_size
    from pg_sequences where schemaname = 'pgcoord' order by sequencename`;
  const functions = await sql`select p.oid::regprocedure::text as signature, pg_get_functiondef(p.oid) as def from pg_proc p
    where p.pronamespace = 'pgcoord'::regnamespace order by 1`;
  return {
    relations: [...relations],
    sequences: [...sequences],
    functions: [...functions],
    leases: await describeTable(sql, 'pgcoord', 'leases'),
    singletonRuns: await describeTable(sql, 'pgcoord', 'singleton_runs'),
    queueJobs: await describeTable(sql, 'pgcoord', 'queue_jobs'),
    queueKeys: await describeTable(sql, 'pgcoord', 'queue_keys'),
    queueOrder: await describeTable(sql, 'pgcoord', 'queue_order'),
  };
}

/** The lease objects work: check_fence passes the current fence and refuses a stale one. */
async function fenceWorks(sql: postgres.Sql) {
  const [row] = await sql`insert into pgcoord.leases (name, fence, holder, holder_label, acquired_at, renewed_at, expires_at)
    values ('cli', nextval('pgcoord.lease_fence'), gen_random_uuid(), 'test', now(), now(), clock_timestamp() + interval '1 minute')
    returning fence::text as fence`;
  const fence = String(row?.fence);
  expect((await sql`select pgcoord.check_fence('cli', ${fence}::bigint) as ok`)[0]?.ok).toBe(true);
  await expect(sql`select pgcoord.check_fence('cli', ${fence}::bigint - 1)`).rejects.toMatchObject({ code: 'PGF01' });
}

/**
 * The queue objects work: two jobs of one key are queued, a claim takes the key with its first job
 * (one job per key at a time: a second claim gets nothing), check_queue_fence passes that claim's
 * fence and refuses an older one, and queueStats sees it all.
 */
async function queueWorks(sql: postgres.Sql) {
  const first = await enqueue(sql, 'cli', 'k', { n: 1 });
  const second = await enqueue(sql, 'cli', 'k', { n: 2 });
  expect(first.enqueued && second.enqueued).toBe(true);
  expect((second.id as bigint) > (first.id as bigint)).toBe(true);
  const claim = () =>
    sql`select claimed_key, claim_fence::text as fence, job_id::text as job from pgcoord.queue_claim('cli', gen_random_uuid(), 'test', 10, 60000)
      where claimed_key is not null`;
  const [claimed] = await claim();
  expect(claimed).toMatchObject({ claimed_key: 'k', job: String(first.id) });
  expect(await claim()).toHaveLength(0);
  const fence = String(claimed?.fence);
  expect((await sql`select pgcoord.check_queue_fence('cli', 'k', ${fence}::bigint) as ok`)[0]?.ok).toBe(true);
  await expect(sql`select pgcoord.check_queue_fence('cli', 'k', ${fence}::bigint - 1)`).rejects.toMatchObject({ code: 'PGF01' });
  expect(await queueStats(sql, 'cli')).toEqual([{ queue: 'cli', jobs: 2, keys: 1, running: 1, dead: 0, oldestMs: expect.any(Number) }]);
}

function snapshotOf(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const f of readdirSync(d)) {
      const p = join(d, f);
      if (statSync(p).isDirectory()) walk(p);
      else out[p] = readFileSync(p, 'utf8');
    }
  };
  walk(dir);
  return out;
}

async function roundTrip(sql: postgres.Sql, table?: { schema: string; table: string }) {
  const run = () => idempotent(sql, { scope: 'cli', key: 'k1', request: { amount: 5 }, ...(table ? { table } : {}) }, () => ({ ok: 1 }));
  const first = await run();
  const second = await run();
  expect(first.replayed).toBe(false);
  expect(second.replayed).toBe(true);
  expect(second.value).toEqual({ ok: 1 });
}

// Each case runs the CLI and drizzle-kit as processes (tsx start-up each time): minutes on a loaded host.
describe('pgcoord generate', { timeout: 240_000 }, () => {
  it('into an empty folder: drizzle-kit check and generate see no changes; the migration creates the runtime table', async () => {
    const dir = await project(DEFAULT_EXPORTS + FIXED_EXPORTS);
    const gen = await runCli(['generate', '--out', 'migrations'], { cwd: dir });
    expect(gen.stderr).toBe('');
    expect(gen.code).toBe(0);
    expect(gen.stdout).toMatch(/wrote .*0000_pgcoord\.sql/);
    expect(gen.stdout).toContain(
      "export { idempotencyKeys, flightValues, leaseFence, leases, queueFence, queueJobId, queueJobs, queueKeys, queueOrder, rateLimits, singletonRuns } from 'pgcoord';",
    );
    // Every name the printed lines import from 'pgcoord' is exported by the package root.
    const named = [...gen.stdout.matchAll(/(?:export|import) \{ ([^}]+) \} from 'pgcoord'/g)].flatMap((m) => (m[1] ?? '').split(', '));
    expect(named.filter((n) => !(n in api))).toEqual([]);
    const sqlText = readFileSync(join(dir, 'migrations', '0000_pgcoord.sql'), 'utf8');
    expect(sqlText).toContain('--> statement-breakpoint');
    expect(sqlText).toContain('CREATE TABLE "pgcoord"."idempotency_keys"');
    expect(sqlText).toContain('CREATE TABLE "pgcoord"."leases"');
    expect(sqlText).toContain('CREATE SEQUENCE "pgcoord"."lease_fence"');
    expect(sqlText).toContain('CREATE TABLE "pgcoord"."singleton_runs"');
    expect(sqlText).toContain('CREATE TABLE "pgcoord"."rate_limits"');
    const statements = sqlText.split('--> statement-breakpoint').map((st) => st.trim());
    expect(headsOf(statements)).toEqual(expect.arrayContaining(QUEUE_OBJECTS));
    // The functions drizzle-kit does not model come last, in their shipped order, each one
    // statement (their bodies have `;`).
    const tail = statements.slice(-FUNCTIONS.length);
    expect(functionsOf(tail)).toEqual(FUNCTIONS);
    expect(functionsOf(statements)).toEqual(FUNCTIONS);
    for (const st of tail) expect(st).toMatch(/^CREATE FUNCTION "pgcoord"\."\w+"\([^)]*\)[\s\S]*END \$\$;$/);
    expect(tail[0]).toMatch(/^CREATE FUNCTION "pgcoord"\."check_fence"\(lease text, fence bigint\)/);
    const journal = JSON.parse(readFileSync(join(dir, 'migrations', 'meta', '_journal.json'), 'utf8'));
    expect(journal.entries.map((e: { tag: string }) => e.tag)).toEqual(['0000_pgcoord']);

    const check = await runDrizzleKit(['check'], dir);
    expect(check.code, check.stderr + check.stdout).toBe(0);
    expect(check.stdout).toMatch(/Everything's fine/);
    const before = snapshotOf(join(dir, 'migrations'));
    const kitGen = await runDrizzleKit(['generate'], dir);
    expect(kitGen.code, kitGen.stderr).toBe(0);
    expect(kitGen.stdout).toMatch(/No schema changes/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);

    // Applied with drizzle's own migrator, it gives exactly what pgcoord's migrate functions make.
    const fresh = await freshDb();
    await drizzleMigrate(drizzle(fresh), { migrationsFolder: join(dir, 'migrations') });
    await migrateAll();
    expect(await describeTable(fresh, 'pgcoord', 'idempotency_keys')).toEqual(await describeTable(db.sql, 'pgcoord', 'idempotency_keys'));
    expect((await describeTable(fresh, 'pgcoord', 'idempotency_keys')).columns.length).toBeGreaterThan(10);
    const objects = await describePgcoord(fresh);
    expect(objects).toEqual(await describePgcoord(db.sql));
    expect(objects.relations.map((r) => r.relname)).toEqual(
      expect.arrayContaining([
        'lease_fence',
        'leases',
        'leases_pkey',
        'rate_limits',
        'singleton_runs',
        'queue_fence',
        'queue_job_id',
        'queue_jobs',
        'queue_jobs_pkey',
        'queue_jobs_key_idx',
        'queue_jobs_dedupe_idx',
        'queue_keys',
        'queue_keys_queue_key_pk',
        'queue_keys_ready_idx',
        'queue_order',
        'queue_order_queue_key_pk',
      ]),
    );
    expect(objects.functions.map((f) => /^pgcoord\.(\w+)\(/.exec(f.signature)?.[1])).toEqual([...FUNCTIONS].sort());
    expect(objects.functions.map((f) => f.signature)).toContain('pgcoord.check_fence(text,bigint)');
    await roundTrip(fresh);
    await fenceWorks(fresh);
    await queueWorks(fresh);

    // A second run is a no-op and says so.
    const again = await runCli(['generate', '--out', 'migrations'], { cwd: dir });
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/up to date: .*0000_pgcoord\.sql.*nothing changed/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);
  });

  it('a folder made before leases: only the lease and queue objects are added; a folder without the functions gets only them', async () => {
    // What `pgcoord generate` wrote before leases existed: the idempotency table alone.
    const dir = await project(DEFAULT_EXPORTS);
    expect((await runDrizzleKit(['generate', '--name', 'pgcoord'], dir)).code).toBe(0);
    const gen = await runCli(['generate', '--out', 'migrations', '--json'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const result = JSON.parse(gen.stdout);
    expect(result.status).toBe('written');
    expect(result.files[0]).toMatch(/0001_pgcoord\.sql$/);
    const heads = result.statements.map((s: string) => (s.split(/[(\n]/)[0] ?? '').trim());
    expect(heads).toEqual(
      expect.arrayContaining([
        'CREATE SEQUENCE "pgcoord"."lease_fence" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;',
        'CREATE TABLE "pgcoord"."leases"',
        'CREATE TABLE "pgcoord"."singleton_runs"',
        'CREATE TABLE "pgcoord"."rate_limits"',
        'CREATE TABLE "pgcoord"."queue_jobs"',
        'CREATE TABLE "pgcoord"."queue_keys"',
        'CREATE TABLE "pgcoord"."queue_order"',
        'CREATE SEQUENCE "pgcoord"."queue_fence" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;',
        'CREATE SEQUENCE "pgcoord"."queue_job_id" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;',
      ]),
    );
    // The functions last, in order.
    expect(heads.slice(-FUNCTIONS.length)).toEqual(FUNCTIONS.map((f) => `CREATE FUNCTION "pgcoord"."${f}"`));
    expect(functionsOf(result.statements)).toEqual(FUNCTIONS);
    expect(result.statements.join('\n')).not.toMatch(/idempotency_keys|CREATE SCHEMA/);
    writeFileSync(join(dir, 'schema.ts'), DEFAULT_EXPORTS + FIXED_EXPORTS);
    const check = await runDrizzleKit(['check'], dir);
    expect(check.code, check.stderr + check.stdout).toBe(0);
    const before = snapshotOf(join(dir, 'migrations'));
    expect((await runDrizzleKit(['generate'], dir)).stdout).toMatch(/No schema changes/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);
    const fresh = await freshDb();
    await drizzleMigrate(drizzle(fresh), { migrationsFolder: join(dir, 'migrations') });
    await migrateAll();
    expect(await describePgcoord(fresh)).toEqual(await describePgcoord(db.sql));
    await fenceWorks(fresh);
    await queueWorks(fresh);
    const again = await runCli(['generate', '--out', 'migrations'], { cwd: dir });
    expect(again.stdout).toMatch(/up to date: .*0000_pgcoord\.sql, .*0001_pgcoord\.sql already create pgcoord's tables/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);

    // An app that exported pgcoord's tables and ran drizzle-kit itself has everything but the
    // functions: the new migration is the functions alone, in order, with an unchanged snapshot.
    const own = await project(DEFAULT_EXPORTS + FIXED_EXPORTS);
    expect((await runDrizzleKit(['generate', '--name', 'app'], own)).code).toBe(0);
    const fn = await runCli(['generate', '--out', 'migrations', '--json'], { cwd: own });
    expect(fn.code, fn.stderr).toBe(0);
    const fnResult = JSON.parse(fn.stdout);
    expect(fnResult.statements).toHaveLength(FUNCTIONS.length);
    expect(functionsOf(fnResult.statements)).toEqual(FUNCTIONS);
    const snapshots = JSON.parse(readFileSync(join(own, 'migrations', 'meta', '0001_snapshot.json'), 'utf8'));
    const previous = JSON.parse(readFileSync(join(own, 'migrations', 'meta', '0000_snapshot.json'), 'utf8'));
    expect({ ...snapshots, id: previous.id, prevId: previous.prevId }).toEqual(previous);
    expect((await runDrizzleKit(['check'], own)).code).toBe(0);
    expect((await runDrizzleKit(['generate'], own)).stdout).toMatch(/No schema changes/);
    const ownDb = await freshDb();
    await drizzleMigrate(drizzle(ownDb), { migrationsFolder: join(own, 'migrations') });
    expect(await describePgcoord(ownDb)).toEqual(await describePgcoord(db.sql));
    await queueWorks(ownDb);
    const ownBefore = snapshotOf(join(own, 'migrations'));
    expect((await runCli(['generate', '--out', 'migrations'], { cwd: own })).stdout).toMatch(/up to date/);
    expect(snapshotOf(join(own, 'migrations'))).toEqual(ownBefore);
  });

  it('a folder made before the queue: the new migration is exactly the shipped queue migration', async () => {
    // What `pgcoord generate` wrote before the queue existed: drizzle-kit's tables and sequences of
    // the idempotency table, leases and limits, with check_fence appended.
    const dir = await project(DEFAULT_EXPORTS + PRE_QUEUE_EXPORTS);
    expect((await runDrizzleKit(['generate', '--name', 'pgcoord'], dir)).code).toBe(0);
    const oldFile = join(dir, 'migrations', '0000_pgcoord.sql');
    writeFileSync(oldFile, `${readFileSync(oldFile, 'utf8')}\n--> statement-breakpoint\n${CHECK_FENCE}`);
    const oldSnapshot = JSON.parse(readFileSync(join(dir, 'migrations', 'meta', '0000_snapshot.json'), 'utf8'));
    expect(Object.keys(oldSnapshot.tables)).not.toContain('pgcoord.queue_jobs');
    const oldDb = await freshDb();
    await drizzleMigrate(drizzle(oldDb), { migrationsFolder: join(dir, 'migrations') });
    await fenceWorks(oldDb);

    const gen = await runCli(['generate', '--out', 'migrations', '--json'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const result = JSON.parse(gen.stdout);
    expect(result.status).toBe('written');
    expect(result.files[0]).toMatch(/0001_pgcoord\.sql$/);
    // Nothing of leases, limits, the idempotency table or check_fence again: the queue's sequences,
    // tables and indexes (drizzle-kit's diff), then its functions in order; statement for statement
    // what migrateQueue() runs.
    expect(result.statements).toEqual(queueMigrations().flatMap((m) => m.statements));
    expect(headsOf(result.statements.slice(0, QUEUE_OBJECTS.length))).toEqual(QUEUE_OBJECTS);
    expect(functionsOf(result.statements)).toEqual(FUNCTIONS.slice(1));
    expect(result.statements.join('\n')).not.toMatch(/idempotency_keys|"leases"|rate_limits|check_fence"|CREATE SCHEMA/);

    // With the queue's tables exported too, drizzle-kit sees nothing to do.
    writeFileSync(join(dir, 'schema.ts'), DEFAULT_EXPORTS + FIXED_EXPORTS);
    const check = await runDrizzleKit(['check'], dir);
    expect(check.code, check.stderr + check.stdout).toBe(0);
    const before = snapshotOf(join(dir, 'migrations'));
    expect((await runDrizzleKit(['generate'], dir)).stdout).toMatch(/No schema changes/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);

    // Applied on the database the old folder made, and on a fresh one: what the migrate functions make.
    await drizzleMigrate(drizzle(oldDb), { migrationsFolder: join(dir, 'migrations') });
    const fresh = await freshDb();
    await drizzleMigrate(drizzle(fresh), { migrationsFolder: join(dir, 'migrations') });
    await migrateAll();
    const expected = await describePgcoord(db.sql);
    expect(await describePgcoord(oldDb)).toEqual(expected);
    expect(await describePgcoord(fresh)).toEqual(expected);
    await queueWorks(oldDb);
    await queueWorks(fresh);

    // A re-run is a no-op and names both files.
    const again = await runCli(['generate', '--out', 'migrations'], { cwd: dir });
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toMatch(/up to date: .*0000_pgcoord\.sql, .*0001_pgcoord\.sql already create pgcoord's tables/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);
  });

  it("on top of the app's own migrations, with custom names", async () => {
    const orders = `import { pgTable, serial, text } from 'drizzle-orm/pg-core';\nexport const orders = pgTable('orders', { id: serial('id').primaryKey(), note: text('note') });\n`;
    const dir = await project(orders);
    const own = await runDrizzleKit(['generate', '--name', 'orders'], dir);
    expect(own.code, own.stderr).toBe(0);
    const gen = await runCli(['generate', '--out', 'migrations', '--schema', 'billing', '--table', 'idem', '--json'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const result = JSON.parse(gen.stdout);
    expect(result.status).toBe('written');
    expect(result.statements.join('\n')).not.toMatch(/orders|idempotency_keys/);
    expect(result.statements.slice(0, 2).sort()).toEqual([
      'CREATE SCHEMA IF NOT EXISTS "billing";',
      'CREATE SCHEMA IF NOT EXISTS "pgcoord";',
    ]);
    expect(result.statements.join('\n')).toContain('CREATE TABLE "billing"."idem"');
    expect(result.statements.join('\n')).toContain('CREATE TABLE "pgcoord"."leases"');
    expect(headsOf(result.statements)).toEqual(expect.arrayContaining(QUEUE_OBJECTS));
    expect(functionsOf(result.statements.slice(-FUNCTIONS.length))).toEqual(FUNCTIONS);
    expect(result.schemaExports).toContain("export const idempotencySchema = pgSchema('billing');");
    expect(result.schemaExports).toContain("export const pgcoordSchema = pgSchema('pgcoord');");
    // The app's schema now also exports pgcoord's tables (and their pgSchemas), as the command says.
    writeFileSync(
      join(dir, 'schema.ts'),
      `${orders}import { pgSchema } from 'drizzle-orm/pg-core';\nimport { idempotencyTable } from ${SCHEMA_MODULE};\nexport const idem = idempotencyTable({ schema: 'billing', table: 'idem' });\nexport const billing = pgSchema('billing');\nexport const pgcoord = pgSchema('pgcoord');\n${FIXED_EXPORTS}`,
    );
    expect((await runDrizzleKit(['check'], dir)).code).toBe(0);
    const before = snapshotOf(join(dir, 'migrations'));
    const kitGen = await runDrizzleKit(['generate'], dir);
    expect(kitGen.stdout).toMatch(/No schema changes/);
    expect(snapshotOf(join(dir, 'migrations'))).toEqual(before);
    expect((await runCli(['generate', '--out', 'migrations', '--schema', 'billing', '--table', 'idem'], { cwd: dir })).stdout).toMatch(
      /up to date/,
    );

    const fresh = await freshDb();
    await drizzleMigrate(drizzle(fresh), { migrationsFolder: join(dir, 'migrations') });
    await migrateAll({ schema: 'billing', table: 'idem' });
    expect(await describeTable(fresh, 'billing', 'idem')).toEqual(await describeTable(db.sql, 'billing', 'idem'));
    expect((await fresh`select to_regclass('public.orders')::text as t`)[0]?.t).toBe('orders');
    await roundTrip(fresh, { schema: 'billing', table: 'idem' });
    // pgcoord's schema holds only pgcoord's fixed-name objects here.
    expect(await describePgcoord(fresh)).toEqual(await describePgcoord(db.sql));
    expect((await fresh`select to_regclass('pgcoord.idempotency_keys')::text as t`)[0]?.t).toBe(null);
    await fenceWorks(fresh);
    await queueWorks(fresh);
  });

  it('--format sql: one plain SQL file that psql-style tools apply; re-run is a no-op', async () => {
    const dir = await project('export {};\n');
    const gen = await runCli(['generate', '--format', 'sql', '--out', 'db', '--schema', 'app', '--table', 'idem_keys'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const file = join(dir, 'db', 'pgcoord_idem_keys.sql');
    const text = readFileSync(file, 'utf8');
    expect(text).not.toContain('statement-breakpoint');
    expect(text).toContain('CREATE SCHEMA IF NOT EXISTS "pgcoord";');
    expect(text).toContain('CREATE TABLE "pgcoord"."leases"');
    expect(text).toContain('CREATE FUNCTION "pgcoord"."check_fence"');
    for (const head of QUEUE_OBJECTS) expect(text).toContain(head);
    // Each function once, in the shipped order (the migrations' order, check_fence's first).
    expect([...text.matchAll(/^CREATE FUNCTION "pgcoord"\."(\w+)"\(/gm)].map((m) => m[1])).toEqual(FUNCTIONS);
    const fresh = await freshDb();
    await fresh.unsafe(text); // simple protocol, several statements: what psql -f does
    await migrateAll({ schema: 'app', table: 'idem_keys' });
    expect(await describeTable(fresh, 'app', 'idem_keys')).toEqual(await describeTable(db.sql, 'app', 'idem_keys'));
    await roundTrip(fresh, { schema: 'app', table: 'idem_keys' });
    expect(await describePgcoord(fresh)).toEqual(await describePgcoord(db.sql));
    await fenceWorks(fresh);
    await queueWorks(fresh);
    const again = await runCli(['generate', '--format', 'sql', '--out', 'db', '--schema', 'app', '--table', 'idem_keys'], { cwd: dir });
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/up to date/);
    expect(readFileSync(file, 'utf8')).toBe(text);
  });

  it('--format sql on a folder made before leases: a second file with only the new objects', async () => {
    const dir = await project('export {};\n');
    const old = `-- pgcoord: idempotency table "pgcoord"."idempotency_keys" (written by \`pgcoord generate --format sql\`; apply once)\n\n${idempotencySql()}\n`;
    mkdirSync(join(dir, 'db'));
    writeFileSync(join(dir, 'db', 'pgcoord_idempotency_keys.sql'), old);
    const gen = await runCli(['generate', '--format', 'sql', '--out', 'db', '--json'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const added = `pgcoord_${NEWEST_FIXED}.sql`;
    expect(JSON.parse(gen.stdout).files).toEqual([join(dir, 'db', added)]);
    const text = readFileSync(join(dir, 'db', added), 'utf8');
    expect(text).not.toContain('idempotency_keys');
    expect(text).toMatch(
      /^-- pgcoord: sequence pgcoord\.lease_fence, pgcoord\.leases, .*function pgcoord\.check_fence, .*pgcoord\.queue_jobs, .*function pgcoord\.check_queue_fence \(migrations 0001_leases, 0002_limits, 0003_single_flight_leases, 0004_queue\)/,
    );
    const fresh = await freshDb();
    await fresh.unsafe(old);
    await fresh.unsafe(text);
    await migrateAll();
    expect(await describePgcoord(fresh)).toEqual(await describePgcoord(db.sql));
    await fenceWorks(fresh);
    await queueWorks(fresh);
    const again = await runCli(['generate', '--format', 'sql', '--out', 'db'], { cwd: dir });
    expect(again.stdout).toContain(`up to date: ${join(dir, 'db', 'pgcoord_idempotency_keys.sql')}, ${join(dir, 'db', added)}`);
    expect(readdirSync(join(dir, 'db')).sort()).toEqual([added, 'pgcoord_idempotency_keys.sql'].sort());
  });

  it('--format sql on a folder made before the queue: a third file with the queue migration alone', async () => {
    // What `pgcoord generate --format sql` wrote before the queue: the idempotency table, then the
    // lease, limit and single-flight objects in a file named after the newest of their migrations.
    const dir = await project('export {};\n');
    mkdirSync(join(dir, 'db'));
    const idem = `-- pgcoord: idempotency table "pgcoord"."idempotency_keys" (written by \`pgcoord generate --format sql\`; apply once)\n\n${idempotencySql()}\n`;
    const preQueueTag = SHIPPED.filter((tag) => !tag.endsWith('_idempotency_keys') && !tag.endsWith('_queue')).at(-1);
    const preQueue = `-- pgcoord: leases, limits (written by \`pgcoord generate --format sql\`; apply once)\n\n${statementsSql(['CREATE SCHEMA IF NOT EXISTS "pgcoord"', ...PRE_QUEUE_STATEMENTS])}\n`;
    writeFileSync(join(dir, 'db', 'pgcoord_idempotency_keys.sql'), idem);
    writeFileSync(join(dir, 'db', `pgcoord_${preQueueTag}.sql`), preQueue);
    const gen = await runCli(['generate', '--format', 'sql', '--out', 'db', '--json'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const result = JSON.parse(gen.stdout);
    const queueTag = SHIPPED.find((tag) => tag.endsWith('_queue'));
    expect(result.files).toEqual([join(dir, 'db', `pgcoord_${queueTag}.sql`)]);
    // The schema (the migration assumes it), then what migrateQueue() runs, statement for statement.
    const queueStatements = queueMigrations().flatMap((m) => m.statements.map((st) => st.replace(/;\s*$/, '')));
    expect(result.statements).toEqual(['CREATE SCHEMA IF NOT EXISTS "pgcoord"', ...queueStatements]);
    const text = readFileSync(result.files[0], 'utf8');
    expect(text.split('\n')[0]).toBe(
      `-- pgcoord: sequence pgcoord.queue_fence, sequence pgcoord.queue_job_id, pgcoord.queue_jobs, pgcoord.queue_keys, pgcoord.queue_order, ${FUNCTIONS.slice(
        1,
      )
        .map((f) => `function pgcoord.${f}`)
        .join(', ')} (migrations ${queueTag}) (written by \`pgcoord generate --format sql\`; apply once)`,
    );
    expect(text).not.toMatch(/idempotency_keys|"leases"|rate_limits|"check_fence"/);

    const fresh = await freshDb();
    for (const sqlText of [idem, preQueue, text]) await fresh.unsafe(sqlText);
    await migrateAll();
    expect(await describePgcoord(fresh)).toEqual(await describePgcoord(db.sql));
    await fenceWorks(fresh);
    await queueWorks(fresh);

    const again = await runCli(['generate', '--format', 'sql', '--out', 'db'], { cwd: dir });
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toMatch(
      /^up to date: .*pgcoord_idempotency_keys\.sql, .*pgcoord_0003_single_flight_leases\.sql, .*pgcoord_0004_queue\.sql already create/,
    );
    expect(readFileSync(result.files[0], 'utf8')).toBe(text);
    expect(readdirSync(join(dir, 'db')).length).toBe(3);
  });

  it.each([
    ['--table', 'x; drop table y'],
    ['--table', ''],
    ['--schema', 'a'.repeat(64)],
    ['--table', 'é'.repeat(32)],
    ['--schema', 'Billing"'],
    ['--table', 'leases'],
    ['--table', 'lease_fence'],
    ['--table', 'singleton_runs'],
    ['--table', 'rate_limits'],
    ['--table', 'queue_jobs'],
    ['--table', 'queue_fence'],
    ['--table', 'queue_job_id'],
    ['--table', 'queue_keys_ready_idx'],
    ['--table', 'queue_jobs_dedupe_idx'],
    // drizzle-kit's names of the queue tables' composite primary keys: indexes too
    ['--table', 'queue_keys_queue_key_pk'],
    ['--table', 'queue_order_queue_key_pk'],
  ])('refuses %s %j with exit 2, one line, nothing written', async (flag, value) => {
    const dir = await project('export {};\n');
    const r = await runCli(['generate', '--out', 'migrations', flag, value], { cwd: dir });
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(new RegExp(`^pgcoord: invalid ${flag}`));
    expect(r.stderr).not.toMatch(/\bat .*\.ts:\d+/);
    expect(readdirSync(dir).sort()).toEqual(['drizzle.config.ts', 'node_modules', 'schema.ts']);
  });

  it('bad usage exits 2; --verbose adds the stack; a missing database URL is a usage error', async () => {
    expect((await runCli(['generate', '--format', 'yaml'])).code).toBe(2);
    expect((await runCli(['nope'])).code).toBe(2);
    const verbose = await runCli(['generate', '--table', 'x;y', '--verbose', '--out', '/nonexistent-pgcoord']);
    expect(verbose.code).toBe(2);
    expect(verbose.stderr).toMatch(/CliUsageError/);
    const noUrl = await runCli(['locks'], { env: { DATABASE_URL: undefined } });
    expect(noUrl.code).toBe(2);
    expect(noUrl.stderr.trim()).toBe('pgcoord: no database: pass --url postgres://... or set DATABASE_URL');
    for (const cmd of ['generate', 'locks', 'leases', 'queue', 'purge', 'doctor']) {
      const help = await runCli([cmd, '--help']);
      expect(help.code).toBe(0);
      expect(help.stdout).toMatch(/Examples:\n {2}\$ pgcoord /);
    }
  });
});
