import { describe, expect, it } from 'vitest';
import {
  AbortedError,
  acquireSessionLock,
  ConnectionLostError,
  InvalidOptionError,
  LockLostError,
  LockNotAcquiredError,
  LockTimeoutError,
  TransactionPoolingError,
  tryAcquireSessionLock,
  UnsupportedRunnerError,
  withLock,
} from '../src/index.js';
import { PGBOUNCER_MISSING, pgbouncerSuite, startPgBouncer } from './fixtures/pgbouncer.js';
import { sleep, useTestDb } from './helpers.js';
import postgres from './pgjs.js';

const db = await useTestDb(6);
const pools = db.runners.filter((r) => !r.inTx);

const aborted = (signal: AbortSignal) =>
  new Promise<void>((resolve) => (signal.aborted ? resolve() : signal.addEventListener('abort', () => resolve(), { once: true })));

const advisoryHolders = async () =>
  (
    await db.sql`select pid from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and granted order by pid`
  ).map((r) => r.pid as number);

describe('session locks', () => {
  for (const kind of pools) {
    it(`are exclusive across connections and released through ${kind.name}`, async () => {
      await kind.use(async (pool) => {
        const key = `session:${kind.name}`;
        const lock = await acquireSessionLock(pool, key);
        expect(lock.signal.aborted).toBe(false);
        expect(await tryAcquireSessionLock(pool, key)).toBeUndefined();
        expect(await advisoryHolders()).toEqual([lock.pid]);
        await lock.release();
        await lock.release(); // idempotent
        const again = await tryAcquireSessionLock(pool, key);
        expect(again).toBeDefined();
        await again!.release();
        expect(await advisoryHolders()).toEqual([]);
      });
    });
  }

  it('release with await using, and shared holders coexist', async () => {
    {
      await using a = await acquireSessionLock(db.sql, 'using', { mode: 'shared' });
      await using b = await acquireSessionLock(db.pool, 'using', { mode: 'shared' });
      expect(a.pid).not.toBe(b.pid);
      await expect(acquireSessionLock(db.sql, 'using', { timeoutMs: 0 })).rejects.toBeInstanceOf(LockNotAcquiredError);
    }
    expect(await advisoryHolders()).toEqual([]);
  });

  it('times out near the bound, and aborts a wait, leaving nothing held by the waiter', async () => {
    const holder = await acquireSessionLock(db.sql, 'wait');
    const t0 = performance.now();
    await expect(acquireSessionLock(db.pool, 'wait', { timeoutMs: 200 })).rejects.toBeInstanceOf(LockTimeoutError);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(180);
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 100);
    await expect(acquireSessionLock(db.sql, 'wait', { signal: ac.signal })).rejects.toBeInstanceOf(AbortedError);
    expect(await advisoryHolders()).toEqual([holder.pid]);
    const waiting =
      await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and not granted`;
    expect(waiting[0]!.n).toBe(0);
    await holder.release();
  });

  it('a killed holder backend aborts the signal within seconds and lets the next waiter in', async () => {
    for (const pool of [db.sql, db.pool]) {
      const lock = await acquireSessionLock(pool, 'killed', { keepaliveMs: 1000 });
      const waiter = acquireSessionLock(pool === db.sql ? db.pool : db.sql, 'killed', { timeoutMs: 10_000 });
      await sleep(100);
      const t0 = performance.now();
      await db.sql`select pg_terminate_backend(${lock.pid})`;
      await aborted(lock.signal);
      expect(performance.now() - t0).toBeLessThan(3000);
      expect(lock.signal.reason).toBeInstanceOf(LockLostError);
      expect(lock.signal.reason.code).toBe('PGCOORD_LOCK_LOST');
      const next = await waiter;
      expect(await advisoryHolders()).toEqual([next.pid]);
      await next.release();
      await lock.release(); // nothing to do, and no crash
      // the pool keeps serving
      expect(await withLock(pool, 'after-kill', () => 'ok')).toBe('ok');
    }
  });

  for (const [name, pool] of [
    ['postgres.js', db.sql],
    ['pg', db.pool],
  ] as const) {
    it(`a keepalive probe with no answer aborts the signal and drops the connection (${name})`, async () => {
      const lock = await acquireSessionLock(pool, `stalled-${name}`, { keepaliveMs: 300 });
      // the backend stops answering but its socket stays open (the server runs on this machine:
      // the embedded one, or DATABASE_URL's local PostgreSQL, both ours to signal as root)
      process.kill(lock.pid, 'SIGSTOP');
      try {
        await aborted(lock.signal);
        expect(lock.signal.reason).toBeInstanceOf(LockLostError);
      } finally {
        process.kill(lock.pid, 'SIGCONT');
      }
      // the connection was ended, not returned to the pool: its backend goes away and the lock with it
      for (let i = 0; i < 50 && (await advisoryHolders()).length; i++) await sleep(100);
      expect(await advisoryHolders()).toEqual([]);
      expect(await withLock(pool, 'after-stall', () => 'pool serves')).toBe('pool serves');
    });
  }

  it('refuses transactions, single clients and bad options with typed errors', async () => {
    await expect(db.sql.begin((tx) => acquireSessionLock(tx, 'x'))).rejects.toBeInstanceOf(UnsupportedRunnerError);
    const client = await db.pool.connect();
    await expect(acquireSessionLock(client, 'x')).rejects.toBeInstanceOf(UnsupportedRunnerError);
    client.release();
    await expect(acquireSessionLock(db.sql, 'x', { keepaliveMs: -5 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(acquireSessionLock(db.sql, '')).rejects.toMatchObject({ code: 'PGCOORD_INVALID_KEY' });
  });
});

describe('a transaction-scoped holder whose backend is killed', () => {
  for (const kind of pools) {
    it(`rolls back its writes and raises ConnectionLostError through ${kind.name}`, async () => {
      await kind.use(async (runner) => {
        await db.sql`create table if not exists killed_writes (who text)`;
        const err = await withLock(runner, 'tx-killed', async (tx) => {
          const h = tx as { unsafe?: unknown; query?: unknown; execute?: unknown };
          const run = (text: string) =>
            typeof h.unsafe === 'function'
              ? (tx as unknown as { unsafe(t: string): Promise<unknown> }).unsafe(text)
              : typeof (tx as { select?: unknown }).select === 'function'
                ? import('drizzle-orm').then(({ sql }) =>
                    (tx as unknown as { execute(s: unknown): Promise<unknown> }).execute(sql.raw(text)),
                  )
                : (tx as unknown as { query(t: string): Promise<unknown> }).query(text);
          await run(`insert into killed_writes values ('${kind.name}')`);
          await run('select pg_terminate_backend(pg_backend_pid())');
        }).catch((e) => e);
        expect(err).toBeInstanceOf(ConnectionLostError);
        const rows = await db.sql`select * from killed_writes where who = ${kind.name}`;
        expect(rows).toHaveLength(0);
        expect(await withLock(runner, 'tx-killed', () => 'next')).toBe('next');
      });
    });
  }
});

// A real PgBouncer in transaction mode. Its server_round_robin makes the client's consecutive
// transactions land on different servers, as on a busy PgBouncer (test/pgbouncer.test.ts has the
// rest: both drivers, concurrency, statement mode, and what is not detected yet).
describe.skipIf(PGBOUNCER_MISSING !== undefined)(pgbouncerSuite('behind a transaction-mode pooler'), () => {
  it('refuses session locks with TransactionPoolingError and holds nothing afterwards', async () => {
    const bouncer = await startPgBouncer(db.url, { poolSize: 2, roundRobin: true });
    const pooled = postgres(bouncer.url(db.url), { max: 1, ...bouncer.pgjsOptions, onnotice: () => {} });
    try {
      await bouncer.warm(db.url);
      const err = await acquireSessionLock(pooled, 'pooled').catch((e) => e);
      expect(err).toBeInstanceOf(TransactionPoolingError);
      expect(err.code).toBe('PGCOORD_TRANSACTION_POOLING');
      expect(await bouncer.servers(new URL(db.url).pathname.slice(1))).toBeGreaterThan(1);
      // transaction-scoped locks are the answer there, and they work
      expect(await withLock(pooled, 'pooled', () => 'ok')).toBe('ok');
      for (let i = 0; i < 20 && (await advisoryHolders()).length; i++) await sleep(100);
      expect(await advisoryHolders()).toEqual([]);
    } finally {
      await pooled.end({ timeout: 1 });
      await bouncer.stop();
    }
  });
});

describe('a session lock handle dropped without release()', () => {
  it('frees its lock once the handle is garbage collected', async () => {
    const { execFile } = await import('node:child_process');
    const { fileURLToPath } = await import('node:url');
    const fixture = fileURLToPath(new URL('./fixtures/abandoned-session-lock.ts', import.meta.url));
    const out = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, ['--expose-gc', '--import', 'tsx', fixture, db.url], { timeout: 30_000 }, (err, stdout) =>
        err ? reject(err) : resolve(stdout),
      ),
    );
    expect(JSON.parse(out.trim().split('\n').pop() as string)).toEqual({ heldBefore: 1, heldAfter: 0 });
  });
});
