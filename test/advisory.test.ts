import { spawn } from 'node:child_process';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { fileURLToPath } from 'node:url';
import type postgres from 'postgres';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  AbortedError,
  decodeLockRow,
  hashKey,
  InvalidKeyError,
  InvalidOptionError,
  type LockEvent,
  LockNotAcquiredError,
  LockTimeoutError,
  lockKey,
  tryWithLock,
  UnsupportedRunnerError,
  withLock,
} from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(12);

beforeAll(async () => {
  await db.sql`create table visits (who int, key text, entered timestamptz, left_at timestamptz)`;
  await db.sql`create table orders (id int primary key, total int not null, refunded int not null default 0)`;
  await db.sql`create table refunds (order_id int, amount int)`;
});

// Intervals recorded with the database clock: each visit must leave before the next one enters.
async function overlaps(key: string): Promise<number> {
  const [row] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from (
      select entered, lag(left_at) over (order by entered) as prev_left from visits where key = ${key}
    ) v where entered < prev_left`;
  return row!.n;
}

const visit = (tx: unknown, key: string, who: number) =>
  q(tx, 'insert into visits select $1, $2, clock_timestamp(), null', [who, key])
    .then(() => q(tx, 'select pg_sleep(0.002)'))
    .then(() => q(tx, 'update visits set left_at = clock_timestamp() where who = $1 and key = $2', [who, key]));

describe('mutual exclusion: 50 callers on 12 connections, one key', () => {
  for (const kind of db.runners) {
    it(`never overlaps through ${kind.name}`, async () => {
      const key = `mutex:${kind.name}`;
      await Promise.all(Array.from({ length: 50 }, (_, who) => kind.use((runner) => withLock(runner, key, (tx) => visit(tx, key, who)))));
      const [row] = await db.sql<{ n: number }[]>`select count(*)::int as n from visits where key = ${key} and left_at is not null`;
      expect(row!.n).toBe(50);
      expect(await overlaps(key)).toBe(0);
    });
  }
});

describe('the refund race: three $200 refunds on a $200 order', () => {
  // Read, think (the window where the other requests read the same "refundable"), write.
  const refund = async (tx: unknown, id: number) => {
    const [o] = await q(tx, 'select total, refunded from orders where id = $1', [id]);
    await q(tx, 'select pg_sleep(0.05)');
    if (Number(o!.refunded) + 200 > Number(o!.total)) return false;
    await q(tx, 'update orders set refunded = refunded + 200 where id = $1', [id]);
    await q(tx, 'insert into refunds values ($1, 200)', [id]);
    return true;
  };

  it('refunds more than $200 without a lock (negative control)', async () => {
    await db.sql`insert into orders values (1, 200)`;
    await Promise.all([1, 2, 3].map(() => db.sql.begin((tx) => refund(tx, 1))));
    const [o] = await db.sql`select refunded from orders where id = 1`;
    expect(o!.refunded).toBeGreaterThan(200);
  });

  for (const kind of db.runners) {
    it(`refunds exactly $200 with withLock through ${kind.name}`, async () => {
      const id = 100 + db.runners.indexOf(kind);
      await db.sql`insert into orders values (${id}, 200)`;
      const applied = await Promise.all([1, 2, 3].map(() => kind.use((r) => withLock(r, `order:${id}`, (tx) => refund(tx, id)))));
      const [o] = await db.sql`select refunded from orders where id = ${id}`;
      const [s] = await db.sql`select coalesce(sum(amount), 0)::int as sum from refunds where order_id = ${id}`;
      expect(o!.refunded).toBe(200);
      expect(s!.sum).toBe(200);
      expect(applied.filter(Boolean)).toHaveLength(1);
    });
  }
});

describe('modes', () => {
  const hold = (key: Parameters<typeof withLock>[1], ms: number, mode: 'exclusive' | 'shared' = 'exclusive') => {
    let entered!: () => void;
    const inside = new Promise<void>((r) => {
      entered = r;
    });
    const done = withLock(
      db.sql,
      key,
      async () => {
        entered();
        await sleep(ms);
      },
      { mode },
    );
    return { inside, done };
  };

  it('try reports not acquired without running the callback, and withLock throws LockNotAcquiredError', async () => {
    const h = hold('busy', 300);
    await h.inside;
    let ran = false;
    expect(
      await tryWithLock(db.sql, 'busy', () => {
        ran = true;
      }),
    ).toEqual({ acquired: false });
    await expect(withLock(db.sql, 'busy', () => 1, { timeoutMs: 0 })).rejects.toBeInstanceOf(LockNotAcquiredError);
    expect(ran).toBe(false);
    await h.done;
    expect(await tryWithLock(db.sql, 'busy', () => 'free')).toEqual({ acquired: true, value: 'free' });
  });

  it('a timeout fires near its bound, on the server, even with a shorter statement_timeout', async () => {
    const h = hold('slow', 1500);
    await h.inside;
    const sql = db.newSql({ max: 2, connection: { statement_timeout: 100 } });
    const t0 = performance.now();
    const err = await withLock(sql, 'slow', () => 1, { timeoutMs: 400 }).catch((e) => e);
    const took = performance.now() - t0;
    expect(err).toBeInstanceOf(LockTimeoutError);
    expect(err.code).toBe('PGCOORD_LOCK_TIMEOUT');
    expect(took).toBeGreaterThanOrEqual(380);
    expect(took).toBeLessThan(1400);
    // the user's own statement_timeout is back in force inside the callback after the lock
    const inner = await withLock(sql, 'other-key', (tx) => q(tx, 'show statement_timeout'), { timeoutMs: 400 });
    expect(inner[0]!.statement_timeout).toBe('100ms');
    await h.done;
  });

  it('abort cancels the server-side wait and leaves no lock held or awaited', async () => {
    const h = hold('abortable', 800);
    await h.inside;
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 150);
    const t0 = performance.now();
    const err = await withLock(db.pool, 'abortable', () => 1, { signal: ac.signal }).catch((e) => e);
    expect(err).toBeInstanceOf(AbortedError);
    expect(err.code).toBe('PGCOORD_ABORTED');
    expect(performance.now() - t0).toBeLessThan(700);
    const waiting =
      await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and not granted`;
    expect(waiting[0]!.n).toBe(0);
    await h.done;
    const left =
      await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database())`;
    expect(left[0]!.n).toBe(0);
    // postgres.js too
    const h2 = hold('abortable', 500);
    await h2.inside;
    const ac2 = new AbortController();
    setTimeout(() => ac2.abort(), 100);
    await expect(withLock(db.sql, 'abortable', () => 1, { signal: ac2.signal })).rejects.toBeInstanceOf(AbortedError);
    await h2.done;
    await expect(withLock(db.sql, 'x', () => 1, { signal: AbortSignal.abort() })).rejects.toBeDefined();
  });

  it('shared holders coexist and exclude an exclusive one', async () => {
    const a = hold('rw', 400, 'shared');
    const b = hold('rw', 400, 'shared');
    await Promise.all([a.inside, b.inside]); // both inside at once
    expect(await tryWithLock(db.sql, 'rw', () => 1)).toEqual({ acquired: false });
    expect(await tryWithLock(db.sql, 'rw', () => 1, { mode: 'shared' })).toEqual({ acquired: true, value: 1 });
    await Promise.all([a.done, b.done]);
    expect(await tryWithLock(db.sql, 'rw', () => 1)).toEqual({ acquired: true, value: 1 });
  });

  it('several keys: opposite orders never deadlock, all or nothing', async () => {
    const results = await Promise.all(
      Array.from(
        { length: 40 },
        (_, i) =>
          (i % 2 ? db.pool : db.sql) &&
          withLock(i % 2 ? db.sql : db.pool, i % 2 ? ['ka', 'kb', [7, 8], 99n] : [99n, [7, 8], 'kb', 'ka', 'ka'], async (tx) => {
            await q(tx, 'select pg_sleep(0.003)');
            return i;
          }),
      ),
    );
    expect(results).toHaveLength(40);
    // all or nothing: with one of the keys taken, try fails and holds none of the others
    const h = hold('kb', 300);
    await h.inside;
    expect(await tryWithLock(db.sql, ['ka', 'kb', 'kc'], () => 1)).toEqual({ acquired: false });
    const held =
      await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and granted`;
    expect(held[0]!.n).toBe(1);
    await h.done;
  });

  it('inside a caller transaction a timeout leaves the transaction usable and holding nothing new', async () => {
    const h = hold('inner', 500);
    await h.inside;
    const out = await db.sql.begin(async (tx) => {
      await tx`insert into refunds values (999, 1)`;
      const err = await withLock(tx, ['inner-free', 'inner'], () => 1, { timeoutMs: 100 }).catch((e) => e);
      const mine =
        await tx`select count(*)::int as n from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and pid = pg_backend_pid()`;
      await tx`insert into refunds values (999, 2)`;
      return { err, mine: mine[0]!.n };
    });
    expect(out.err).toBeInstanceOf(LockTimeoutError);
    expect(out.mine).toBe(0);
    const rows = await db.sql`select amount from refunds where order_id = 999 order by amount`;
    expect(rows.map((r) => r.amount)).toEqual([1, 2]);
    await h.done;
  });

  it('the callback error rolls back the transaction and releases the lock', async () => {
    await expect(
      withLock(db.sql, 'rollback', async (tx) => {
        await tx`insert into refunds values (777, 1)`;
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await db.sql`select * from refunds where order_id = 777`).toHaveLength(0);
    expect(await tryWithLock(db.sql, 'rollback', () => 1)).toEqual({ acquired: true, value: 1 });
  });
});

describe('across processes', () => {
  it('a second OS process is excluded while it holds the key', async () => {
    const script = fileURLToPath(new URL('./fixtures/hold-lock.ts', import.meta.url));
    const child = spawn(process.execPath, ['--import', 'tsx', script, db.url, 'cross-process', '800'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const exited = new Promise<number | null>((r) => child.on('exit', r));
    await new Promise<void>((resolve) => child.stdout.once('data', () => resolve())); // "held"
    expect(await tryWithLock(db.sql, 'cross-process', () => 1)).toEqual({ acquired: false });
    // entered after the child left, by the database clock
    const entered = await withLock(db.sql, 'cross-process', async (tx) => (await tx`select clock_timestamp()::text as t`)[0]!.t as string);
    expect(await exited).toBe(0);
    const [row] = await db.sql`select left_at <= ${entered}::timestamptz as ok from visits where key = 'cross-process'`;
    expect(row!.ok).toBe(true);
  });
});

describe('keys', () => {
  it('hashes strings to a stable signed 64-bit key and decodes pg_locks rows', async () => {
    expect(hashKey('order:42', 'refunds')).toBe(hashKey('order:42', 'refunds'));
    expect(hashKey('order:42', 'refunds')).not.toBe(hashKey('order:42'));
    // pinned value: the same in every process, version and platform
    expect(hashKey('order:42', 'refunds')).toBe(-39854525481817862n);
    const rows = await withLock(db.sql, [{ namespace: 'refunds', name: 'order:42' }, -5n, [3, -4], 2n ** 40n], (tx) =>
      q(
        tx,
        "select classid, objid, objsubid from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and pid = pg_backend_pid() order by objsubid, classid, objid",
      ),
    );
    const decoded = rows.map((r) => decodeLockRow(r as never));
    expect(decoded).toEqual(
      expect.arrayContaining([
        { space: 'int8', id: hashKey('order:42', 'refunds'), namespace: 'refunds', name: 'order:42' },
        { space: 'int8', id: -5n },
        { space: 'int8', id: 2n ** 40n },
        { space: 'pair', a: 3, b: -4 },
      ]),
    );
    expect(decodeLockRow({ classid: 0, objid: 7, objsubid: 1 }, [{ name: 'x' }])).toEqual({ space: 'int8', id: 7n });
  });

  it('rejects what is not a key with InvalidKeyError', () => {
    const bad: unknown[] = [
      '',
      Number.NaN,
      1.5,
      2 ** 60,
      Number.POSITIVE_INFINITY,
      2n ** 63n,
      -(2n ** 63n) - 1n,
      null,
      undefined,
      true,
      {},
      [1],
      [1, 2, 3],
      [2 ** 31, 0],
      [0, 1.5],
      { name: '' },
      { namespace: '', name: 'x' },
      { namespace: 5, name: 'x' },
      Symbol('k'),
    ];
    for (const key of bad) {
      expect(
        () => lockKey(key as never),
        String(typeof key === 'symbol' ? 'symbol' : JSON.stringify(key, (_, v) => (typeof v === 'bigint' ? `${v}n` : v))),
      ).toThrow(InvalidKeyError);
    }
    expect(lockKey(2n ** 63n - 1n)).toMatchObject({ space: 'int8' });
    expect(lockKey([-(2 ** 31), 2 ** 31 - 1])).toMatchObject({ space: 'pair' });
  });

  it('rejects bad keys, options, callbacks and runners with typed errors before touching the database', async () => {
    await expect(withLock(db.sql, '', () => 1)).rejects.toMatchObject({ code: 'PGCOORD_INVALID_KEY' });
    await expect(withLock(db.sql, [], () => 1)).rejects.toBeInstanceOf(InvalidKeyError);
    for (const options of [
      { timeoutMs: -1 },
      { timeoutMs: 1.5 },
      { timeoutMs: Number.NaN },
      { mode: 'both' },
      { signal: {} },
      { isolation: 'chaos' },
    ]) {
      await expect(withLock(db.sql, 'k', () => 1, options as never)).rejects.toBeInstanceOf(InvalidOptionError);
    }
    await expect(withLock(db.sql, 'k', 'not a function' as never)).rejects.toBeInstanceOf(InvalidOptionError);
    for (const runner of [null, 42, {}, { query: 1 }, () => 1]) {
      await expect(withLock(runner as never, 'k', () => 1)).rejects.toBeInstanceOf(UnsupportedRunnerError);
    }
    const reserved = await db.sql.reserve();
    await expect(withLock(reserved as never, 'k', () => 1)).rejects.toMatchObject({ code: 'PGCOORD_UNSUPPORTED_RUNNER' });
    reserved.release();
  });
});

describe('events', () => {
  it('publishes acquire and release with key, mode, wait and hold times and outcome', async () => {
    const seen: { name: string; e: LockEvent }[] = [];
    const onAcquire = (e: unknown) => seen.push({ name: 'acquire', e: e as LockEvent });
    const onRelease = (e: unknown) => seen.push({ name: 'release', e: e as LockEvent });
    subscribe('pgcoord:lock:acquire', onAcquire);
    subscribe('pgcoord:lock:release', onRelease);
    try {
      await withLock(db.sql, 'evt', () => sleep(20), { mode: 'shared' });
      const h = withLock(db.sql, 'evt2', () => sleep(200));
      await sleep(50);
      await tryWithLock(db.sql, 'evt2', () => 1);
      await withLock(db.sql, 'evt2', () => 1, { timeoutMs: 30 }).catch(() => {});
      await h;
    } finally {
      unsubscribe('pgcoord:lock:acquire', onAcquire);
      unsubscribe('pgcoord:lock:release', onRelease);
    }
    const evt = seen.filter((s) => s.e.keys[0] === '"evt"');
    expect(evt.map((s) => [s.name, s.e.outcome, s.e.mode, s.e.scope])).toEqual([
      ['acquire', 'acquired', 'shared', 'transaction'],
      ['release', 'released', 'shared', 'transaction'],
    ]);
    expect(evt[1]!.e.holdMs).toBeGreaterThanOrEqual(15);
    const outcomes = seen.filter((s) => s.e.keys[0] === '"evt2"' && s.name === 'acquire').map((s) => s.e.outcome);
    expect(outcomes).toEqual(['acquired', 'not-acquired', 'timeout']);
  });
});

describe('a { read, write } plan: [BEGIN, lock, read] then [writes, COMMIT]', () => {
  const plan = (id: number, amount: number) => ({
    read: (tx: unknown) => q(tx, 'select total, refunded from orders where id = $1', [id]),
    write: async (tx: unknown, rows: Record<string, unknown>[]) => {
      const o = rows[0]!;
      await sleep(5); // a gateway call, still under the lock
      if (Number(o.refunded) + amount > Number(o.total)) return [];
      const h = tx as { unsafe?: (t: string, p: unknown[]) => PromiseLike<unknown> };
      // postgres.js: unawaited queries in an array ride with COMMIT; other handles run them in order
      return typeof h.unsafe === 'function'
        ? [
            h.unsafe('update orders set refunded = refunded + $2 where id = $1', [id, amount]),
            h.unsafe('insert into refunds values ($1, $2)', [id, amount]),
          ]
        : [
            q(tx, 'update orders set refunded = refunded + $2 where id = $1', [id, amount]).then(() =>
              q(tx, 'insert into refunds values ($1, $2)', [id, amount]),
            ),
          ];
    },
  });

  for (const kind of db.runners) {
    it(`refunds exactly the total under a race through ${kind.name}`, async () => {
      const id = 300 + db.runners.indexOf(kind);
      await db.sql`insert into orders values (${id}, 200)`;
      const results = await Promise.all(Array.from({ length: 12 }, () => kind.use((r) => withLock(r, `plan:${id}`, plan(id, 50)))));
      const [o] = await db.sql`select refunded from orders where id = ${id}`;
      const [s] = await db.sql`select coalesce(sum(amount), 0)::int as sum from refunds where order_id = ${id}`;
      expect(o!.refunded).toBe(200);
      expect(s!.sum).toBe(200);
      expect(results.filter((r) => r.written.length > 0)).toHaveLength(4);
      expect(results.every((r) => Array.isArray(r.read))).toBe(true);
    });
  }

  it('takes two round trips on a postgres.js pool, and a failing write rolls everything back', async () => {
    const { sql: counting, writes } = db.countingSql();
    await db.sql`insert into orders values (399, 100)`;
    // tagged templates: prepared statements, so nothing waits for a Describe
    const pgjsPlan = {
      read: (tx: postgres.TransactionSql) => tx`select total, refunded from orders where id = 399`,
      write: async (tx: postgres.TransactionSql, rows: postgres.Row[]) =>
        rows[0]!.refunded + 10 > rows[0]!.total
          ? []
          : [tx`update orders set refunded = refunded + 10 where id = 399`, tx`insert into refunds values (399, 10)`],
    };
    await withLock(counting, 'plan:399', pgjsPlan); // warm-up: statements get prepared
    writes.count = 0;
    const r = await withLock(counting, 'plan:399', pgjsPlan);
    expect(r.written).toHaveLength(2);
    expect(writes.count).toBe(2);
    await expect(
      withLock(counting, 'plan:399', {
        read: (tx: postgres.TransactionSql) => tx`select 1`,
        write: (tx: postgres.TransactionSql) => [tx`update orders set refunded = refunded + 1 where id = 399`, tx`select 1/0`],
      }),
    ).rejects.toMatchObject({ code: '22012' });
    const [o] = await db.sql`select refunded from orders where id = 399`;
    expect(o!.refunded).toBe(20);
  });

  it('with the key taken, try reports not acquired and never calls write', async () => {
    let wrote = false;
    const holder = withLock(db.sql, 'plan-busy', () => sleep(300));
    await sleep(50);
    const out = await tryWithLock(db.sql, 'plan-busy', {
      read: (tx) => tx`select 1 as one`,
      write: () => {
        wrote = true;
        return [];
      },
    });
    expect(out).toEqual({ acquired: false });
    expect(wrote).toBe(false);
    await expect(withLock(db.sql, 'plan-busy', { read: (tx) => tx`select 1`, write: () => [] }, { timeoutMs: 50 })).rejects.toBeInstanceOf(
      LockTimeoutError,
    );
    await holder;
    await expect(withLock(db.sql, 'plan-x', { read: (tx) => tx`select 1`, write: () => 5 as never })).rejects.toBeInstanceOf(
      InvalidOptionError,
    );
  });
});
