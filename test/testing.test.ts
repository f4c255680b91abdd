// The exported test harness (pgcoord/testing): reuse of a server already chosen, databases of their
// own, and an embedded server that leaves nothing running or on disk.
import { existsSync } from 'node:fs';
import postgres from 'postgres';
import { describe, expect, inject, it } from 'vitest';
import { createTestDatabase, setupTestServer, startEmbeddedPostgres, startTestServer } from '../src/testing/index.js';

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
  });

  it('an embedded server stops with nothing left running or on disk', async () => {
    const server = await startEmbeddedPostgres();
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
});
