// The exported test harness (pgcoord/testing): reuse of a server already chosen, databases of their
// own, and an embedded server that leaves nothing running or on disk.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { describe, expect, inject, it } from 'vitest';
import { createTestDatabase, setupTestServer, startEmbeddedPostgres, startTestServer } from '../src/testing/index.js';
import postgres from './pgjs.js';

describe('pgcoord/testing', () => {
  it('reuses the server of DATABASE_URL (what the global setup placed there) and never stops it', async () => {
    const url = inject('databaseUrl');
    expect(process.env.DATABASE_URL).toBe(url);
    const server = await startTestServer();
    expect(server).toMatchObject({ url, source: 'env' });
    await server.stop();
    const provided: Record<string, unknown> = {};
    const teardown = await setupTestServer({
      provide: (k, v) => {
        provided[k] = v;
      },
    });
    expect(provided).toEqual({ databaseUrl: url });
    await teardown();
    const sql = postgres(url, { max: 1 });
    expect((await sql`select 1 as one`)[0]!.one).toBe(1); // still up
    await sql.end();
  });

  it('creates a database of its own and drops it, even with a connection left open', async () => {
    const url = inject('databaseUrl');
    const db = await createTestDatabase(url, 'pgcoord_harness');
    expect(db.name).toMatch(/^pgcoord_harness_[0-9a-f]{12}$/);
    const inside = postgres(db.url, { max: 1 });
    expect((await inside`select current_database() as d`)[0]!.d).toBe(db.name);
    await db.drop(); // terminates `inside`'s session
    await inside.end({ timeout: 1 }).catch(() => {});
    const admin = postgres(url, { max: 1 });
    expect(await admin`select 1 from pg_database where datname = ${db.name}`).toHaveLength(0);
    await admin.end();
    await expect(createTestDatabase(url, 'bad prefix; drop')).rejects.toThrow(/invalid test database prefix/);
    // without a URL: DATABASE_URL, which the global setup set
    const byEnv = await createTestDatabase();
    expect(byEnv.url.startsWith(url.slice(0, url.lastIndexOf('/')))).toBe(true);
    await byEnv.drop();
  });

  it('an embedded server stops with nothing left running or on disk, and outlives its start-up timeout (and a restart)', async () => {
    const server = await startEmbeddedPostgres({ startTimeoutMs: 5_000 });
    await server.restart();
    await new Promise((r) => setTimeout(r, 6_000)); // past both start-up timers: neither may kill it
    const sql = postgres(server.url, { max: 1 });
    const [row] = await sql`select pg_postmaster_start_time() is not null as up, current_setting('data_directory') as dir`;
    expect(row!.up).toBe(true);
    await sql.end();
    expect(existsSync(server.dataDir)).toBe(true);
    await server.stop();
    expect(existsSync(server.dataDir)).toBe(false);
    const again = postgres(server.url, { max: 1, connect_timeout: 2 });
    await expect(again`select 1`).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    await again.end();
  });

  it('a folder left by a killed run is swept once an hour old with no live server in it; Ctrl-C removes the server and its folder', async () => {
    const old = Date.now() / 1000 - 7200;
    const folder = (name: string, pid?: number, mtime = old) => {
      const root = join(tmpdir(), `pgcoord-pg-test${name}`);
      mkdirSync(join(root, 'data'), { recursive: true });
      if (pid !== undefined) writeFileSync(join(root, 'data', 'postmaster.pid'), `${pid}\n/data\n`);
      utimesSync(root, mtime, mtime);
      return root;
    };
    const dead = folder('dead', 2 ** 22 + 17); // above Linux's default pid_max: never a live process
    const bare = folder('bare');
    const live = folder('live', process.pid);
    const fresh = folder('fresh', undefined, Date.now() / 1000);
    try {
      const server = await startEmbeddedPostgres();
      await server.stop();
      expect([existsSync(dead), existsSync(bare), existsSync(live), existsSync(fresh)]).toEqual([false, false, true, true]);
    } finally {
      for (const root of [dead, bare, live, fresh]) rmSync(root, { recursive: true, force: true });
    }

    const child = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'fixtures', 'embedded-sigint.ts')], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const started = await new Promise<{ dataDir: string; url: string }>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d) => {
        out += d;
        if (out.includes('\n')) resolve(JSON.parse(out.split('\n')[0] as string));
      });
      child.once('exit', (code) => reject(new Error(`exited with ${code} before starting`)));
    });
    expect(existsSync(started.dataDir)).toBe(true);
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGINT');
    await exited;
    expect(existsSync(dirname(started.dataDir))).toBe(false);
    const gone = postgres(started.url, { max: 1, connect_timeout: 2 });
    await expect(gone`select 1`).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    await gone.end();
  });
});
