// Leases on every pool runner: exclusive terms, fences that only grow, renewal, expiry seen by the
// holder before anyone else can take over, release that wakes a waiter at once, and fenced writes
// refused by the database once a term is over, even against a takeover racing the write.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, inject, it } from 'vitest';
import { AbortedError, STALE_FENCE_SQLSTATE, sqlState, UnsupportedRunnerError } from '../src/index.js';
import { isLeaseLost, LeaseLostError, LeaseNotAcquiredError, LeasesNotMigratedError, LeaseTimeoutError } from '../src/lease/errors.js';
import { acquireLease, type Lease, tryAcquireLease, withFence, withLease } from '../src/lease/lease.js';
import { migrateLeases } from '../src/lease/migrate.js';
import { createTestDatabase } from '../src/testing/index.js';
import { arm, type Listener } from '../src/wake.js';
import { q, sleep, useTestDb } from './helpers.js';
import postgres from './pgjs.js';

const db = await useTestDb(6);
await migrateLeases(db.sql);
await db.sql`create table lease_orders (id int primary key, total int not null, refunded int not null default 0)`;
await db.sql`create table lease_refunds (order_id int not null, amount int not null, fence bigint not null)`;
const pools = db.runners.filter((r) => !r.inTx);

const aborted = (signal: AbortSignal) =>
  new Promise<unknown>((resolve) =>
    signal.aborted ? resolve(signal.reason) : signal.addEventListener('abort', () => resolve(signal.reason), { once: true }),
  );
const settle = <T>(p: Promise<T>) =>
  p.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );

describe('leases', () => {
  for (const kind of pools) {
    it(`one holder at a time, a fence greater than every earlier one, release wakes a waiter (${kind.name})`, async () => {
      await kind.use(async (pool) => {
        const name = `exclusive:${kind.name}`;
        const a = await acquireLease(pool, name, { ttlMs: 30_000, holder: 'a' });
        expect(a.signal.aborted).toBe(false);
        expect(await tryAcquireLease(pool, name, { ttlMs: 30_000 })).toBeUndefined();
        const refused = await settle(acquireLease(pool, name, { ttlMs: 30_000, timeoutMs: 0 }));
        expect(refused.ok ? undefined : refused.error).toBeInstanceOf(LeaseNotAcquiredError);
        expect((refused as { error: LeaseNotAcquiredError }).error).toMatchObject({ code: 'PGCOORD_LEASE_NOT_ACQUIRED', holder: 'a' });
        expect((refused as { error: LeaseNotAcquiredError }).error.expiresInMs).toBeGreaterThan(20_000);
        // a waiter with a 30 s term ahead of it: only the release's notification can let it in within 10 s
        const waiting = acquireLease(pool, name, { ttlMs: 30_000, timeoutMs: 10_000, holder: 'b' });
        await sleep(200);
        expect(await a.release()).toBe(true);
        expect(a.signal.reason).toMatchObject({ code: 'PGCOORD_LEASE_LOST', reason: 'released' });
        const b = await waiting;
        expect(b.fence).toBeGreaterThan(a.fence);
        expect(await a.release()).toBe(true); // the same answer again, nothing sent
        await b.release();
        const c = await acquireLease(pool, name, { ttlMs: 30_000 });
        expect(c.fence).toBeGreaterThan(b.fence);
        await c.release();
      });
    });
  }

  for (const kind of pools.filter((k) => k.name === 'postgres.js sql' || k.name === 'pg Pool')) {
    it(`a waiter whose LISTEN connection is killed still sees the release (${kind.name})`, async () => {
      await kind.use(async (pool) => {
        const name = `listen-killed:${kind.name}`;
        const a = await acquireLease(db.sql, name, { ttlMs: 30_000 });
        const waiting = acquireLease(pool, name, { ttlMs: 30_000, timeoutMs: 10_000 });
        await sleep(300);
        const killed = await db.sql`select pg_terminate_backend(pid) as ok from pg_stat_activity
          where datname = current_database() and query ilike 'listen%' and pid <> pg_backend_pid()`;
        expect(killed.length).toBeGreaterThan(0);
        await sleep(300);
        await a.release();
        const b = await waiting;
        expect(b.fence).toBeGreaterThan(a.fence);
        await b.release();
      });
    });
  }

  it('a waiter times out with LeaseTimeoutError, and its signal aborts the wait', async () => {
    const held = await acquireLease(db.sql, 'busy', { ttlMs: 30_000 });
    try {
      const timedOut = await settle(acquireLease(db.pool, 'busy', { ttlMs: 1000, timeoutMs: 300 }));
      expect(timedOut.ok ? undefined : timedOut.error).toBeInstanceOf(LeaseTimeoutError);
      expect((timedOut as { error: LeaseTimeoutError }).error).toMatchObject({ code: 'PGCOORD_LEASE_TIMEOUT', timeoutMs: 300 });
      const abort = new AbortController();
      const waiting = settle(acquireLease(db.sql, 'busy', { ttlMs: 1000, signal: abort.signal }));
      await sleep(100);
      abort.abort();
      const out = await waiting;
      expect(out.ok ? undefined : out.error).toBeInstanceOf(AbortedError);
    } finally {
      await held.release();
    }
  });

  it('renews itself while held; without renewal the holder is told (lapsed) before another can take it', async () => {
    const kept = await acquireLease(db.sql, 'kept', { ttlMs: 300 });
    await sleep(900);
    expect(kept.signal.aborted).toBe(false);
    expect(await tryAcquireLease(db.pool, 'kept', { ttlMs: 300 })).toBeUndefined();
    await kept.release();

    const events: string[] = [];
    const lapsing = await acquireLease(db.sql, 'lapsing', { ttlMs: 300, renewEveryMs: false });
    void aborted(lapsing.signal).then(() => events.push('holder told'));
    let next: Lease | undefined;
    while (!next) {
      next = await tryAcquireLease(db.pool, 'lapsing', { ttlMs: 10_000 });
      if (!next) await sleep(5);
    }
    events.push('taken over');
    expect(events).toEqual(['holder told', 'taken over']);
    expect(lapsing.signal.reason).toMatchObject({ reason: 'lapsed' });
    expect(next.fence).toBeGreaterThan(lapsing.fence);
    await expect(lapsing.renew()).rejects.toBeInstanceOf(LeaseLostError);
    expect(await lapsing.release()).toBe(false);
    await next.release();
  });

  it('renew() after a takeover: LeaseLostError (lost), the signal aborts', async () => {
    const a = await acquireLease(db.sql, 'taken', { ttlMs: 200, renewEveryMs: false, marginMs: 0 });
    await sleep(250); // expired on the server; a's window (no margin) ran out too
    const b = await acquireLease(db.sql, 'taken', { ttlMs: 10_000 });
    await expect(a.renew()).rejects.toBeInstanceOf(LeaseLostError);
    expect(a.signal.aborted).toBe(true);
    await b.release();
  });

  it('withLease releases after the callback, also when it throws', async () => {
    const out = await withLease(db.sql, 'scoped', { ttlMs: 5000 }, async (lease) => {
      expect(await tryAcquireLease(db.pool, 'scoped', { ttlMs: 5000 })).toBeUndefined();
      return lease.fence;
    });
    expect(typeof out).toBe('bigint');
    await expect(
      withLease(db.sql, 'scoped', { ttlMs: 5000 }, () => {
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    const again = await tryAcquireLease(db.pool, 'scoped', { ttlMs: 5000 });
    expect(again).toBeDefined();
    await again?.release();
  });
});

describe('waking', () => {
  it('a release announced between a look and the sleep after it is not lost', async () => {
    const listener: Listener = { ready: Promise.resolve(true), live: true, waiters: new Map(), users: 1 };
    const armed = arm(listener, ['a', 'b'], 'waiting for lease "a"');
    // the release of b arrives while the look's answer is on its way
    for (const wake of listener.waiters.get('b') ?? []) wake();
    expect(armed.woken).toBe(true);
    const started = performance.now();
    await armed.sleep(60_000, 60_000, undefined); // returns at once
    expect(performance.now() - started).toBeLessThan(1000);
    expect(listener.waiters.size).toBe(0); // disarmed
  });

  it("a process with nothing but an idle pg pool waits its timeout out (the LISTEN is answered on a ref'd socket)", async () => {
    const held = await acquireLease(db.sql, 'idle-pool', { ttlMs: 30_000 });
    try {
      const out = spawnSync(
        process.execPath,
        ['--import', 'tsx', fileURLToPath(new URL('./fixtures/lease-idle-pool.ts', import.meta.url)), db.url, 'idle-pool'],
        {
          encoding: 'utf8',
          timeout: 30_000,
        },
      );
      expect(out.status, out.stderr).toBe(0); // 13 was an unsettled top-level await: the loop ran dry
      expect(JSON.parse(out.stdout.trim())).toEqual({ code: 'PGCOORD_LEASE_TIMEOUT' });
    } finally {
      await held.release();
    }
  });

  it("the errors keep their class's name (the lease's name is `lease`)", async () => {
    const held = await acquireLease(db.sql, 'named', { ttlMs: 5000 });
    const err = await acquireLease(db.pool, 'named', { ttlMs: 5000, timeoutMs: 0 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'LeaseNotAcquiredError', lease: 'named' });
    expect(String(err)).toMatch(/^LeaseNotAcquiredError: /);
    await held.release();
    expect(held.signal.reason).toMatchObject({ name: 'LeaseLostError', lease: 'named', reason: 'released' });
  });
});

describe('fenced writes', () => {
  it("the seed's failure done right: a holder paused past its TTL is refused by Postgres, the order is refunded once", async () => {
    await db.sql`insert into lease_orders (id, total) values (1, 200)`;
    const refund = (runner: object, lease: Lease) =>
      withFence(runner, { name: lease.name, fence: lease.fence }, async (tx: postgres.TransactionSql) => {
        const [order] = await tx`select total - refunded as left from lease_orders where id = 1 for update`;
        if ((order?.left as number) < 200) return 'nothing left';
        await tx`update lease_orders set refunded = refunded + 200 where id = 1`;
        await tx`insert into lease_refunds values (1, 200, ${String(lease.fence)})`;
        return 'refunded';
      });
    const a = await acquireLease(db.sql, 'order:1', { ttlMs: 200, renewEveryMs: false, marginMs: 0 });
    await sleep(400); // a "GC pause": a's term ends
    const b = await acquireLease(db.sql, 'order:1', { ttlMs: 10_000 });
    expect(await refund(db.sql, b)).toBe('refunded');
    // a wakes and writes with its old fence (its signal is ignored, as a paused process would)
    const late = await settle(refund(db.pool, a));
    expect(late.ok ? undefined : late.error).toBeInstanceOf(LeaseLostError);
    expect(isLeaseLost((late as { error: unknown }).error)).toBe(true);
    const [order] = await db.sql`select refunded from lease_orders where id = 1`;
    expect(order?.refunded).toBe(200);
    expect(await db.sql`select fence::text from lease_refunds`).toEqual([{ fence: String(b.fence) }]);
    await b.release();
  });

  it('a takeover waits for a fenced transaction that passed its check, and the write after it is refused', async () => {
    const a = await acquireLease(db.sql, 'share', { ttlMs: 300, renewEveryMs: false, marginMs: 0 });
    let takeover: Promise<Lease> | undefined;
    let tookOverBeforeCommit = false;
    await withFence(db.sql, a, async (tx: postgres.TransactionSql) => {
      await sleep(500); // a's term is over on the server, but this transaction holds the share lock
      takeover = acquireLease(db.pool, 'share', { ttlMs: 10_000, timeoutMs: 10_000 });
      void takeover.then(() => {
        tookOverBeforeCommit = true;
      });
      await sleep(500);
      expect(tookOverBeforeCommit).toBe(false);
      await tx`insert into lease_refunds values (2, 1, ${String(a.fence)})`;
    });
    const b = await (takeover as Promise<Lease>);
    expect(b.fence).toBeGreaterThan(a.fence);
    await expect(
      withFence(db.sql, a, (tx: postgres.TransactionSql) => tx`insert into lease_refunds values (2, 2, 0)`),
    ).rejects.toBeInstanceOf(LeaseLostError);
    expect(await db.sql`select amount from lease_refunds where order_id = 2`).toEqual([{ amount: 1 }]);
    await b.release();
  });

  for (const kind of db.runners) {
    it(`joins a caller's transaction or opens one: a current fence writes, a stale one rolls back (${kind.name})`, async () => {
      const name = `fence-runner:${kind.name}`;
      const lease = await acquireLease(db.sql, name, { ttlMs: 10_000 });
      const id = 100 + db.runners.indexOf(kind);
      await kind.use((runner) => withFence(runner, lease, (tx: object) => q(tx, `insert into lease_refunds values (${id}, 1, 0)`)));
      await lease.release();
      const stale = await settle(
        kind.use((runner) =>
          withFence(runner, { name, fence: lease.fence }, (tx: object) => q(tx, `insert into lease_refunds values (${id}, 2, 0)`)),
        ),
      );
      expect(stale.ok ? undefined : stale.error).toBeInstanceOf(LeaseLostError);
      expect(await db.sql`select amount from lease_refunds where order_id = ${id}`).toEqual([{ amount: 1 }]);
    });
  }

  it('in raw SQL: pgcoord.check_fence raises PGF01 for a stale fence (isLeaseLost sees it through drizzle too)', async () => {
    const lease = await acquireLease(db.sql, 'raw', { ttlMs: 10_000 });
    await db.sql.begin((tx) => [
      tx`select pgcoord.check_fence(${lease.name}, ${String(lease.fence)})`,
      tx`insert into lease_refunds values (3, 1, 0)`,
    ]);
    await lease.release();
    const err = await db.sql
      .begin((tx) => [
        tx`select pgcoord.check_fence(${lease.name}, ${String(lease.fence)})`,
        tx`insert into lease_refunds values (3, 2, 0)`,
      ])
      .catch((e: unknown) => e);
    expect(isLeaseLost(err)).toBe(true);
    expect(sqlState(err)).toBe(STALE_FENCE_SQLSTATE);
    expect(isLeaseLost(new Error('other'))).toBe(false);
    expect(await db.sql`select amount from lease_refunds where order_id = 3`).toEqual([{ amount: 1 }]);
  });
});

describe('bad input, refused before anything is sent', () => {
  const counting = db.countingSql();
  const bad: [string, () => Promise<unknown>][] = [
    ['ttlMs 0', () => acquireLease(counting.sql, 'x', { ttlMs: 0 })],
    ['ttlMs negative', () => acquireLease(counting.sql, 'x', { ttlMs: -1 })],
    ['ttlMs NaN', () => acquireLease(counting.sql, 'x', { ttlMs: Number.NaN })],
    ['ttlMs above 2^31-1', () => acquireLease(counting.sql, 'x', { ttlMs: 2 ** 31 })],
    ['ttlMs fractional', () => acquireLease(counting.sql, 'x', { ttlMs: 1000.5 })],
    ['ttlMs below 100', () => acquireLease(counting.sql, 'x', { ttlMs: 99 })],
    ['ttlMs missing', () => acquireLease(counting.sql, 'x', {} as never)],
    ['options null', () => acquireLease(counting.sql, 'x', null as never)],
    ['timeoutMs negative', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, timeoutMs: -5 })],
    ['timeoutMs Infinity', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, timeoutMs: Number.POSITIVE_INFINITY })],
    ['marginMs half of ttl', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, marginMs: 500 })],
    ['renewEveryMs past the window', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, renewEveryMs: 900 })],
    ['renewEveryMs 0', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, renewEveryMs: 0 })],
    ['signal not a signal', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, signal: {} as never })],
    ['empty name', () => acquireLease(counting.sql, '', { ttlMs: 1000 })],
    ['name of 256 characters', () => acquireLease(counting.sql, 'n'.repeat(256), { ttlMs: 1000 })],
    ['name with NUL', () => acquireLease(counting.sql, 'a\0b', { ttlMs: 1000 })],
    ['name with a lone surrogate', () => acquireLease(counting.sql, 'a\uD800', { ttlMs: 1000 })],
    ['name not a string', () => acquireLease(counting.sql, 42 as never, { ttlMs: 1000 })],
    ['huge name', () => acquireLease(counting.sql, 'n'.repeat(10_000_000), { ttlMs: 1000 })],
    ['holder empty', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, holder: '' })],
    ['holder with NUL', () => acquireLease(counting.sql, 'x', { ttlMs: 1000, holder: 'h\0' })],
    ['withFence fence not a bigint', () => withFence(counting.sql, { name: 'x', fence: 5 as never }, () => 1)],
    ['withFence fence 0', () => withFence(counting.sql, { name: 'x', fence: 0n }, () => 1)],
    ['withFence fence above int8', () => withFence(counting.sql, { name: 'x', fence: 2n ** 63n }, () => 1)],
    ['withFence lease null', () => withFence(counting.sql, null as never, () => 1)],
    ['withFence no callback', () => withFence(counting.sql, { name: 'x', fence: 1n }, undefined as never)],
    ['withLease no callback', () => withLease(counting.sql, 'x', { ttlMs: 1000 }, undefined as never)],
  ];
  for (const [what, call] of bad) {
    it(`${what}: InvalidOptionError`, async () => {
      const before = counting.writes.count;
      await expect(call()).rejects.toMatchObject({ code: 'PGCOORD_INVALID_OPTION' });
      expect(counting.writes.count).toBe(before);
    });
  }

  it('a transaction runner: UnsupportedRunnerError (a lease outlives it)', async () => {
    await db.sql.begin(async (tx) => {
      await expect(acquireLease(tx, 'x', { ttlMs: 1000 })).rejects.toBeInstanceOf(UnsupportedRunnerError);
    });
  });

  it('an aborted lease refuses withFence before anything is sent', async () => {
    const lease = await acquireLease(counting.sql, 'aborted-fence', { ttlMs: 5000 });
    await lease.release();
    const before = counting.writes.count;
    await expect(withFence(counting.sql, lease, () => 1)).rejects.toBeInstanceOf(LeaseLostError);
    expect(counting.writes.count).toBe(before);
  });
});

describe('without the lease table', () => {
  it('LeasesNotMigratedError, for acquire and for withFence', async () => {
    const bare = await createTestDatabase(inject('databaseUrl'));
    const sql = postgres(bare.url, { max: 2, onnotice: () => {} });
    try {
      await expect(acquireLease(sql, 'x', { ttlMs: 1000 })).rejects.toBeInstanceOf(LeasesNotMigratedError);
      await expect(withFence(sql, { name: 'x', fence: 1n }, () => 1)).rejects.toBeInstanceOf(LeasesNotMigratedError);
    } finally {
      await sql.end({ timeout: 1 });
      await bare.drop();
    }
  });
});
