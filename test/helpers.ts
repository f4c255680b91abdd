// Shared test setup: a database of its own per test file, and every runner kind pgcoord accepts,
// so one case suite runs through all of them. postgres.js is the driver under test (./pgjs.ts:
// 4.x, or 3.4.x with PGCOORD_PGJS=3).

import { spawn } from 'node:child_process';
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { drizzle as drizzlePgjs } from 'drizzle-orm/postgres-js';
import pg from 'pg';
import { afterAll, inject } from 'vitest';
import { countedSocket } from '../bench/db.js';
import { createTestDatabase, type TestDatabase } from '../src/testing/index.js';
import postgres from './pgjs.js';

// inject('databaseUrl') is typed by pgcoord/testing's own declaration (src/testing/index.ts)

/** A runner kind under test: `use` runs `fn` with a fresh runner of that kind (a caller's transaction for the tx kinds). */
export interface RunnerKind {
  name: string;
  /** True when the runner is a caller's transaction (locks last until it commits). */
  inTx: boolean;
  use<T>(fn: (runner: object) => Promise<T>): Promise<T>;
}

export interface TestDb {
  url: string;
  /** postgres.js pool on the test database. */
  sql: postgres.Sql;
  /** node-postgres pool on the test database. */
  pool: pg.Pool;
  runners: RunnerKind[];
  /** A new postgres.js pool (closed with the file). */
  newSql(options?: postgres.Options<Record<string, postgres.PostgresType>>): postgres.Sql;
  /** A new pg pool (closed with the file). */
  newPool(options?: pg.PoolConfig): pg.Pool;
  /** A one-connection postgres.js pool whose socket writes are counted (one write = one round trip). */
  countingSql(): { sql: postgres.Sql; writes: { count: number } };
}

/**
 * Create this file's database and pools; everything is closed and dropped after the file.
 * Call at module top level: `const db = await useTestDb()`. Pools hold at most `max` (8)
 * connections: two files run at once, each with three pools and more, under a server's default
 * max_connections of 100 (12 ran out on PostgreSQL 15).
 */
export async function useTestDb(max = 8): Promise<TestDb> {
  const database: TestDatabase = await createTestDatabase(inject('databaseUrl'));
  const sqls: postgres.Sql[] = [];
  const pools: pg.Pool[] = [];
  const newSql = (options: postgres.Options<Record<string, postgres.PostgresType>> = {}) => {
    const s = postgres(database.url, { max, onnotice: () => {}, ...options });
    sqls.push(s);
    return s;
  };
  const newPool = (options: pg.PoolConfig = {}) => {
    const p = new pg.Pool({ connectionString: database.url, max, ...options });
    p.on('error', () => {}); // idle clients killed by fault tests
    pools.push(p);
    return p;
  };
  const sql = newSql();
  const pool = newPool();
  // drizzle's postgres-js driver rewrites its client's date parsers: give it a pool of its own so
  // db.sql keeps postgres.js defaults.
  const dz = drizzlePgjs(newSql());
  const dzPg = drizzlePg(pool);
  const runners: RunnerKind[] = [
    { name: 'postgres.js sql', inTx: false, use: (fn) => fn(sql) },
    { name: 'postgres.js tx', inTx: true, use: (fn) => sql.begin((tx) => fn(tx)) as unknown as Promise<never> },
    { name: 'drizzle postgres-js db', inTx: false, use: (fn) => fn(dz) },
    { name: 'drizzle postgres-js tx', inTx: true, use: (fn) => dz.transaction((tx) => fn(tx)) },
    { name: 'pg Pool', inTx: false, use: (fn) => fn(pool) },
    {
      name: 'pg PoolClient in tx',
      inTx: true,
      async use(fn) {
        const client = await pool.connect();
        try {
          await client.query('begin');
          const out = await fn(client);
          await client.query('commit');
          return out;
        } catch (err) {
          await client.query('rollback').catch(() => {});
          throw err;
        } finally {
          client.release();
        }
      },
    },
    { name: 'drizzle node-postgres db', inTx: false, use: (fn) => fn(dzPg) },
    { name: 'drizzle node-postgres tx', inTx: true, use: (fn) => dzPg.transaction((tx) => fn(tx)) },
  ];
  afterAll(async () => {
    await Promise.all([...sqls.map((s) => s.end({ timeout: 1 })), ...pools.map((p) => p.end())]);
    await database.drop();
  });
  // one connection on a socket of ours whose writes are counted, as bench/db.ts does (bench/ stays
  // on 4.x; this one is the driver under test). Start-up writes are not counted.
  const countingSql = () => {
    const writes = { count: 0 };
    const options = { idle_timeout: 0, socket: countedSocket(database.url, writes) } as postgres.Options<
      Record<string, postgres.PostgresType>
    >;
    return { sql: newSql({ ...options, max: 1 }), writes };
  };
  return { url: database.url, sql, pool, runners, newSql, newPool, countingSql };
}

export { q } from './query.js';

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Run a TypeScript program (through tsx) in a process of its own and resolve with the last JSON
 * line it printed; rejects when it exits with another code than 0 (its stderr in the message), and
 * kills it after `timeoutMs`.
 */
export function runTs<T>(script: string, args: string[], options: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', script, ...args], {
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.stderr.on('data', (d) => {
      err += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code !== 0) reject(new Error(`${script} exited ${code}: ${err}`));
      else resolve(JSON.parse(out.trim().split('\n').pop() as string) as T);
    });
  });
}
