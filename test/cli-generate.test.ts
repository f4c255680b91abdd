// `pgcoord generate` through the real CLI: drizzle-kit sees nothing left to do afterwards, the
// migration creates exactly the table pgcoord's own migrate() creates (and idempotent() works on
// it), a second run changes nothing, and bad identifiers are refused with exit 2.
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { drizzle } from 'drizzle-orm/postgres-js';
import { migrate as drizzleMigrate } from 'drizzle-orm/postgres-js/migrator';
import postgres from 'postgres';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { idempotent, migrateIdempotency } from '../src/index.js';
import { createTestDatabase, type TestDatabase } from '../src/testing/index.js';
import { ROOT, runCli, runDrizzleKit, tempProject } from './fixtures/cli-run.js';
import { useTestDb } from './helpers.js';

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

describe('pgcoord generate', () => {
  it('into an empty folder: drizzle-kit check and generate see no changes; the migration creates the runtime table', async () => {
    const dir = await project(
      `import { pgSchema } from 'drizzle-orm/pg-core';\nexport { idempotencyKeys } from ${SCHEMA_MODULE};\nexport const pgcoordSchema = pgSchema('pgcoord');\n`,
    );
    const gen = await runCli(['generate', '--out', 'migrations'], { cwd: dir });
    expect(gen.stderr).toBe('');
    expect(gen.code).toBe(0);
    expect(gen.stdout).toMatch(/wrote .*0000_pgcoord\.sql/);
    const sqlText = readFileSync(join(dir, 'migrations', '0000_pgcoord.sql'), 'utf8');
    expect(sqlText).toContain('--> statement-breakpoint');
    expect(sqlText).toContain('CREATE TABLE "pgcoord"."idempotency_keys"');
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

    // Applied with drizzle's own migrator, it gives exactly the table pgcoord's migrate() makes.
    const fresh = await freshDb();
    await drizzleMigrate(drizzle(fresh), { migrationsFolder: join(dir, 'migrations') });
    await migrateIdempotency(db.sql);
    expect(await describeTable(fresh, 'pgcoord', 'idempotency_keys')).toEqual(await describeTable(db.sql, 'pgcoord', 'idempotency_keys'));
    expect((await describeTable(fresh, 'pgcoord', 'idempotency_keys')).columns.length).toBeGreaterThan(10);
    await roundTrip(fresh);

    // A second run is a no-op and says so.
    const again = await runCli(['generate', '--out', 'migrations'], { cwd: dir });
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/up to date: .*0000_pgcoord\.sql.*nothing changed/);
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
    expect(result.statements.join('\n')).not.toMatch(/orders|pgcoord|idempotency_keys/);
    expect(result.statements[0]).toBe('CREATE SCHEMA IF NOT EXISTS "billing";');
    // The app's schema now also exports pgcoord's table (and its pgSchema), as the command says.
    writeFileSync(
      join(dir, 'schema.ts'),
      `${orders}import { pgSchema } from 'drizzle-orm/pg-core';\nimport { idempotencyTable } from ${SCHEMA_MODULE};\nexport const idem = idempotencyTable({ schema: 'billing', table: 'idem' });\nexport const billing = pgSchema('billing');\n`,
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
    await migrateIdempotency(db.sql, { schema: 'billing', table: 'idem' });
    expect(await describeTable(fresh, 'billing', 'idem')).toEqual(await describeTable(db.sql, 'billing', 'idem'));
    expect((await fresh`select to_regclass('public.orders')::text as t`)[0]?.t).toBe('orders');
    await roundTrip(fresh, { schema: 'billing', table: 'idem' });
  });

  it('--format sql: one plain SQL file that psql-style tools apply; re-run is a no-op', async () => {
    const dir = await project('export {};\n');
    const gen = await runCli(['generate', '--format', 'sql', '--out', 'db', '--schema', 'app', '--table', 'idem_keys'], { cwd: dir });
    expect(gen.code, gen.stderr).toBe(0);
    const file = join(dir, 'db', 'pgcoord_idem_keys.sql');
    const text = readFileSync(file, 'utf8');
    expect(text).not.toContain('statement-breakpoint');
    const fresh = await freshDb();
    await fresh.unsafe(text); // simple protocol, several statements: what psql -f does
    await migrateIdempotency(db.sql, { schema: 'app', table: 'idem_keys' });
    expect(await describeTable(fresh, 'app', 'idem_keys')).toEqual(await describeTable(db.sql, 'app', 'idem_keys'));
    await roundTrip(fresh, { schema: 'app', table: 'idem_keys' });
    const again = await runCli(['generate', '--format', 'sql', '--out', 'db', '--schema', 'app', '--table', 'idem_keys'], { cwd: dir });
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/up to date/);
    expect(readFileSync(file, 'utf8')).toBe(text);
  });

  it.each([
    ['--table', 'x; drop table y'],
    ['--table', ''],
    ['--schema', 'a'.repeat(64)],
    ['--table', 'é'.repeat(32)],
    ['--schema', 'Billing"'],
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
    for (const cmd of ['generate', 'locks', 'purge', 'doctor']) {
      const help = await runCli([cmd, '--help']);
      expect(help.code).toBe(0);
      expect(help.stdout).toMatch(/Examples:\n {2}\$ pgcoord /);
    }
  });
});
