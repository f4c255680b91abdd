// What the postgres.js adapters rely on, pinned so that a driver release that changes it fails here
// first (src/driver/postgres-js-3.ts and postgres-js-4.ts say why each is needed). Both majors are
// tested whichever one the rest of the suite runs on.
import dc from 'node:diagnostics_channel';
import pg from 'pg';
import postgres4 from 'postgres';
import postgres3 from 'postgres3';
import { describe, expect, it } from 'vitest';
import { cancelPg } from '../src/driver/node-postgres-side.js';
import { isConnectionLost } from '../src/errors.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(2);
const until = async (check: () => boolean) => {
  for (let i = 0; i < 100 && !check(); i++) await new Promise((r) => setTimeout(r, 20));
};

describe('postgres.js 3.4 internals (onexecute, connection.onclose)', () => {
  it('calls onexecute with the connection, whose onclose runs when the backend dies', async () => {
    const sql = postgres3(db.url, { max: 1, onnotice: () => {} });
    try {
      const reserved = await sql.reserve();
      let connection: { onclose: unknown } | undefined;
      const onexecute = (c: { onclose: unknown }) => {
        connection = c;
        return true;
      };
      const [row] = await reserved.unsafe('select pg_backend_pid() as pid', [], { onexecute } as object);
      expect(typeof connection).toBe('object'); // the pool calls its `onclose` field, when set, as the socket closes
      let closed: unknown;
      (connection as { onclose: unknown }).onclose = (err: unknown) => {
        closed = err ?? true;
      };
      await db.sql`select pg_terminate_backend(${row?.pid as number})`;
      await until(() => closed !== undefined);
      expect(closed).toBeDefined();
    } finally {
      await sql.end({ timeout: 1 });
    }
  });
});

describe('postgres.js 4.x diagnostics channels', () => {
  it("gives a query's text and connection id on postgres:query, and that id on postgres:pool's close", async () => {
    const sql = postgres4(db.url, { max: 1, onnotice: () => {} });
    const contexts: { query: string | null; connection: number | null }[] = [];
    const closes: { event: string; connection: number | null; error?: unknown }[] = [];
    const onStart = (m: unknown) => void contexts.push(m as (typeof contexts)[number]);
    const onPool = (m: unknown) => void closes.push(m as (typeof closes)[number]);
    dc.subscribe('tracing:postgres:query:start', onStart);
    dc.subscribe('postgres:pool', onPool);
    try {
      const reserved = await sql.reserve();
      const text = 'select pg_backend_pid() as pid /* pgcoord internals test */';
      const [row] = await reserved.unsafe(text, [], { prepare: false });
      dc.unsubscribe('tracing:postgres:query:start', onStart);
      const mine = contexts.find((c) => c.query === text);
      expect(mine).toBeDefined();
      expect(typeof mine?.connection).toBe('number');
      await db.sql`select pg_terminate_backend(${row?.pid as number})`;
      await until(() => closes.some((e) => e.event === 'close'));
      const close = closes.find((e) => e.event === 'close');
      expect(close?.connection).toBe(mine?.connection);
      expect(
        (close?.error as { cause?: { code?: string } } | undefined)?.cause?.code ?? (close?.error as { code?: string })?.code,
      ).toBeTruthy();
      reserved.release();
    } finally {
      dc.unsubscribe('tracing:postgres:query:start', onStart);
      dc.unsubscribe('postgres:pool', onPool);
      await sql.end({ timeout: 1 });
    }
  });

  it('rejects a waiting reserve() when its signal aborts, without handing a connection over', async () => {
    const sql = postgres4(db.url, { max: 1, onnotice: () => {} });
    try {
      const first = await sql.reserve();
      const waiting = (sql.reserve() as unknown as { signal(s: AbortSignal): Promise<unknown> }).signal(AbortSignal.timeout(100));
      await expect(waiting).rejects.toMatchObject({ code: '57014' });
      first.release();
      expect((await sql`select 1 as one`)[0]?.one).toBe(1);
    } finally {
      await sql.end({ timeout: 1 });
    }
  });

  it('rejects a statement in flight on a reservation, and one sent after, with a connection error once the backend dies', async () => {
    const sql = postgres4(db.url, { max: 1, onnotice: () => {} });
    try {
      const reserved = await sql.reserve();
      const [row] = await reserved`select pg_backend_pid() as pid`;
      const inFlight = reserved`select pg_sleep(5)`.then(
        () => 'answered',
        (e: unknown) => e,
      );
      await db.sql`select pg_terminate_backend(${row?.pid as number})`;
      expect(isConnectionLost(await inFlight)).toBe(true);
      const after = await reserved`select 1`.then(
        () => 'answered',
        (e: unknown) => e,
      );
      expect(isConnectionLost(after)).toBe(true);
      reserved.release();
    } finally {
      await sql.end({ timeout: 1 });
    }
  });
});

describe('node-postgres internals (the running query, the cancel connection)', () => {
  it('has its socket on connection.stream, with unref (a LISTEN client must not keep the process alive)', async () => {
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      const stream = (client as unknown as { connection: { stream: { unref?: unknown; remotePort?: unknown } } }).connection.stream;
      expect(typeof stream.unref).toBe('function');
      expect(typeof (stream as { ref?: unknown }).ref).toBe('function');
      expect(typeof stream.remotePort).toBe('number');
    } finally {
      await client.end();
    }
  });

  it('reads the running query without the deprecated accessor, and cancels it on a connection of its own', async () => {
    const client = new pg.Client({ connectionString: db.url });
    const warnings: string[] = [];
    const onWarning = (w: Error) => void warnings.push(w.message);
    process.on('warning', onWarning);
    await client.connect();
    try {
      const c = client as unknown as { _getActiveQuery(): unknown; connection: { connect: unknown; cancel: unknown } };
      expect(typeof c._getActiveQuery).toBe('function');
      expect(c._getActiveQuery() ?? null).toBeNull();
      const running = client.query('select pg_sleep(30)').then(
        () => 'answered',
        (e: unknown) => e,
      );
      await until(() => (c._getActiveQuery() ?? null) !== null);
      expect(c._getActiveQuery() ?? null).not.toBeNull();
      await cancelPg(client as never);
      expect(await running).toMatchObject({ code: '57014' });
      await new Promise((r) => setImmediate(r));
      expect(warnings.filter((w) => w.includes('activeQuery'))).toEqual([]);
    } finally {
      process.off('warning', onWarning);
      await client.end();
    }
  });
});
