// Idempotency keys in one statement (guardedUpdate / updateVersioned with `idempotency`) and in
// two round trips (idempotent() with a { read, write } plan): on every runner kind, the first call
// applies once, a replay returns the stored outcome, another request with the same key is a 422,
// concurrent copies of one key apply exactly once, and guard-failed / not-found outcomes are
// stored and replayed; round trips counted on the wire (postgres.js socket writes).
import { describe, expect, it } from 'vitest';
import { inTransaction } from '../src/driver/index.js';
import {
  FinalFailure,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyMismatchError,
  IdempotencyNotMigratedError,
  IdempotencyScopeRequiredError,
  IdempotentFailureError,
  idempotent,
  migrate,
  purgeExpired,
} from '../src/idempotency/index.js';
import { guardedUpdate, InvalidOptionError, updateVersioned, VersionConflictError } from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(24);
const table = { schema: 'idem_os', table: 'keys' };
const T = '"idem_os"."keys"';
await migrate(db.sql, table);
await db.sql`create table os1_orders (id int primary key, total int not null, refunded int not null default 0, version int not null default 0)`;
await db.sql`create table os1_refunds (id bigserial primary key, request_id text not null, order_id int not null, amount int not null)`;
await db.sql`insert into os1_orders (id, total) select g, 300 from generate_series(1, 400) g`;

const refund = (id: number, amount: number, requestId: string) => ({
  table: 'os1_orders',
  key: { id },
  set: 'refunded = refunded + $1',
  guard: 'refunded + $1 <= total',
  params: [amount],
  insert: { into: 'os1_refunds', values: { request_id: requestId, amount }, fromRow: { order_id: 'id' } },
});
const keyed = (key: string, request: unknown = null, more: object = {}) => ({
  idempotency: { scope: 'shop-1', key, request, table, ...more },
});

const refundsOf = async (id: number) =>
  (await q(db.sql, 'select request_id, amount from os1_refunds where order_id = $1 order by id', [id])).map((r) => [
    r.request_id,
    r.amount,
  ]);
const orderOf = async (id: number) => (await q(db.sql, 'select total, refunded, version from os1_orders where id = $1', [id]))[0];
const keyRow = async (key: string) =>
  (
    await q(db.sql, `select state, attempts, convert_from(response_body, 'UTF8') as body from ${T} where scope = 'shop-1' and key = $1`, [
      key,
    ])
  )[0];

/** `fn` `n` times at once, each in a runner of `kind` of its own (its own transaction for the tx kinds). */
const copies = <T>(kind: (typeof db.runners)[number], n: number, fn: (runner: object) => Promise<T>) =>
  Promise.all(
    Array.from({ length: n }, () =>
      kind.use(fn).then(
        (value) => ({ value }),
        (error: unknown) => ({ error }),
      ),
    ),
  );

/**
 * Run `call` in a caller's transaction held open, then again on the pool while it is open; commit
 * the first once the second waits on a lock. Each outcome is its value or its error.
 */
async function raceBehindOpenClaim<V>(call: (runner: object) => Promise<V>): Promise<{ first: unknown; second: unknown }> {
  let release = () => {};
  const gate = new Promise<void>((r) => (release = r));
  let opened = (_v: unknown) => {};
  const claimed = new Promise<unknown>((r) => (opened = r));
  const holder = db.sql.begin(async (tx) => {
    opened(await call(tx).catch((e) => e));
    await gate;
  });
  const first = await claimed;
  const second = call(db.sql).catch((e) => e);
  for (let i = 0; ; i++) {
    const [w] =
      await db.sql`select count(*)::int as n from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`;
    if ((w?.n as number) > 0) break;
    if (i > 500) throw new Error('the second copy never waited');
    await sleep(5);
  }
  release();
  await holder;
  return { first, second: await second };
}

/** Run `call` while another transaction holds the rows `write` changed, uncommitted; then commit that. */
async function behindRowLock<V>(write: string, call: () => Promise<V>): Promise<{ value: unknown; waited: boolean }> {
  let release = () => {};
  const gate = new Promise<void>((r) => (release = r));
  let locked = () => {};
  const held = new Promise<void>((r) => (locked = r));
  const holder = db.sql.begin(async (tx) => {
    await tx.unsafe(write);
    locked();
    await gate;
  });
  await held;
  const pending = call().catch((e) => e);
  let waited = false;
  for (let i = 0; i < 500 && !waited; i++) {
    const [w] =
      await db.sql`select count(*)::int as n from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`;
    waited = (w?.n as number) > 0;
    if (!waited) await sleep(5);
  }
  release();
  await holder;
  return { value: await pending, waited };
}

describe('guardedUpdate with an idempotency key, on every runner kind', () => {
  db.runners.forEach((kind, i) => {
    const id = 1 + i * 10;
    it(`applies once, replays the stored outcome, refuses another request (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        const first = await guardedUpdate(runner, refund(id, 100, `a${id}`), keyed(`a${id}`, { amount: 100 }));
        expect(first).toEqual({ status: 'applied', replayed: false, row: { id, total: 300, refunded: 100, version: 0 } });
        const again = await guardedUpdate(runner, refund(id, 100, `a${id}`), keyed(`a${id}`, { amount: 100 }));
        expect(again).toEqual({ status: 'applied', replayed: true });
        const other = await guardedUpdate(runner, refund(id, 50, `a${id}`), keyed(`a${id}`, { amount: 50 })).catch((e) => e);
        expect(other).toBeInstanceOf(IdempotencyMismatchError);
        expect(other.status).toBe(422);
      });
      expect(await refundsOf(id)).toEqual([[`a${id}`, 100]]);
      expect(await orderOf(id)).toMatchObject({ refunded: 100 });
      expect(await keyRow(`a${id}`)).toEqual({ state: 'completed', attempts: 1, body: '{"status":"applied"}' });
    });

    it(`stores and replays guard-failed and not-found (${kind.name})`, async () => {
      const missing = 1000 + id;
      await kind.use(async (runner) => {
        expect(await guardedUpdate(runner, refund(id + 1, 400, `g${id}`), keyed(`g${id}`))).toEqual({
          status: 'guard-failed',
          replayed: false,
        });
        expect(await guardedUpdate(runner, refund(missing, 1, `n${id}`), keyed(`n${id}`))).toEqual({
          status: 'not-found',
          replayed: false,
        });
        // the rows change so that both would now apply: the stored outcomes are what comes back
        await q(runner, 'update os1_orders set total = 1000 where id = $1', [id + 1]);
        await q(runner, 'insert into os1_orders (id, total) values ($1, 300)', [missing]);
        expect(await guardedUpdate(runner, refund(id + 1, 400, `g${id}`), keyed(`g${id}`))).toEqual({
          status: 'guard-failed',
          replayed: true,
        });
        expect(await guardedUpdate(runner, refund(missing, 1, `n${id}`), keyed(`n${id}`))).toEqual({ status: 'not-found', replayed: true });
      });
      expect(await refundsOf(id + 1)).toEqual([]);
      expect(await refundsOf(missing)).toEqual([]);
      expect(await orderOf(id + 1)).toMatchObject({ refunded: 0 });
      expect(await keyRow(`g${id}`)).toMatchObject({ body: '{"status":"guard-failed"}' });
      expect(await keyRow(`n${id}`)).toMatchObject({ body: '{"status":"not-found"}' });
    });

    it(`20 concurrent copies of one key apply exactly once (${kind.name})`, async () => {
      const results = await copies(kind, 20, (runner) =>
        guardedUpdate(runner, refund(id + 2, 30, `c${id}`), keyed(`c${id}`, { amount: 30 })),
      );
      expect(results.filter((r) => 'error' in r)).toEqual([]);
      const values = results.map((r) => (r as { value: { status: string; replayed: boolean } }).value);
      expect(values.filter((v) => !v.replayed)).toHaveLength(1);
      expect(values.every((v) => v.status === 'applied')).toBe(true);
      expect(await refundsOf(id + 2)).toEqual([[`c${id}`, 30]]);
      expect(await orderOf(id + 2)).toMatchObject({ refunded: 30 });
    });
  });

  it("a copy blocked behind the first one's uncommitted claim replays it once that commits", async () => {
    // the first copy's claim stays uncommitted in a caller's transaction; the second copy, in
    // autocommit, waits for it on the key's unique index, then finds the key taken by a row its
    // snapshot cannot show: it runs again and replays
    const { first, second } = await raceBehindOpenClaim((runner) => guardedUpdate(runner, refund(301, 10, 'ob1'), keyed('ob1', 1)));
    expect(first).toEqual({ status: 'applied', replayed: false, row: expect.objectContaining({ refunded: 10 }) });
    expect(second).toEqual({ status: 'applied', replayed: true });
    expect(await refundsOf(301)).toEqual([['ob1', 10]]);
  });

  it("a copy with another request and another target waits on the key's unique index, then gets the 422", async () => {
    let n = 0;
    const { first, second } = await raceBehindOpenClaim((runner) =>
      n++ === 0
        ? guardedUpdate(runner, refund(302, 10, 'ob2'), keyed('ob2', 'a'))
        : guardedUpdate(runner, refund(303, 10, 'ob2'), keyed('ob2', 'b')),
    );
    expect(first).toMatchObject({ status: 'applied', replayed: false });
    expect(second).toBeInstanceOf(IdempotencyMismatchError);
    expect(await refundsOf(302)).toEqual([['ob2', 10]]);
    expect(await refundsOf(303)).toEqual([]);
  });

  it('a guard that stops holding between the snapshot and the row lock: stored as guard-failed, nothing applied', async () => {
    // another transaction uses up the order while the call waits for its row lock: the call's
    // snapshot predicted "applied", the newest version says otherwise, so the statement rolls back
    // and runs again on a new snapshot
    const { value, waited } = await behindRowLock('update os1_orders set refunded = total where id = 306', () =>
      guardedUpdate(db.sql, refund(306, 10, 'gl1'), keyed('gl1')),
    );
    expect(waited).toBe(true);
    expect(value).toEqual({ status: 'guard-failed', replayed: false });
    expect(await keyRow('gl1')).toMatchObject({ body: '{"status":"guard-failed"}' });
    expect(await refundsOf(306)).toEqual([]);
  });

  for (const [n, kind] of db.runners.filter((k) => k.inTx).entries())
    it(`the same in a caller's transaction, which stays usable (${kind.name})`, async () => {
      const id = 310 + n;
      const { value, waited } = await behindRowLock(`update os1_orders set refunded = total where id = ${id}`, () =>
        kind.use(async (tx) => {
          const r = await guardedUpdate(tx, refund(id, 10, `gt${id}`), keyed(`gt${id}`));
          const [after] = await q(tx, 'select 1 as ok'); // the retry rolled back to its savepoint only
          return { r, after };
        }),
      );
      expect(waited).toBe(true);
      expect(value).toEqual({ r: { status: 'guard-failed', replayed: false }, after: { ok: 1 } });
      expect(await keyRow(`gt${id}`)).toMatchObject({ body: '{"status":"guard-failed"}' });
    });

  it('takes over a key whose last attempt (of idempotent(), same request) failed retryably', async () => {
    await expect(
      idempotent(db.sql, { ...opts('tk1', { n: 1 }), mode: 'phased' }, async () => {
        throw new Error('gateway down');
      }),
    ).rejects.toThrow('gateway down');
    expect(await keyRow('tk1')).toMatchObject({ state: 'failed_retryable', attempts: 1 });
    expect(await guardedUpdate(db.sql, refund(307, 10, 'tk1'), keyed('tk1', { n: 1 }))).toMatchObject({
      status: 'applied',
      replayed: false,
    });
    expect(await keyRow('tk1')).toEqual({ state: 'completed', attempts: 2, body: '{"status":"applied"}' });
    expect(await guardedUpdate(db.sql, refund(307, 10, 'tk1'), keyed('tk1', { n: 1 }))).toEqual({ status: 'applied', replayed: true });
    expect(await refundsOf(307)).toEqual([['tk1', 10]]);
  });

  it('concurrent copies of different keys on one order still respect the guard', async () => {
    const outcomes = await Promise.all(
      Array.from({ length: 40 }, (_, n) =>
        guardedUpdate(n % 2 ? db.sql : db.pool, refund(300, 7, `r${n % 30}`), keyed(`race-${n % 30}`, { n: n % 30 })),
      ),
    );
    const firsts = outcomes.filter((o) => !o.replayed);
    expect(firsts).toHaveLength(30);
    const applied = firsts.filter((o) => o.status === 'applied').length;
    expect(applied).toBe(Math.min(30, Math.floor(300 / 7)));
    expect(await orderOf(300)).toMatchObject({ refunded: applied * 7 });
    expect((await refundsOf(300)).length).toBe(applied);
  });
});

describe('updateVersioned with an idempotency key, on every runner kind', () => {
  db.runners.forEach((kind, i) => {
    const id = 100 + i * 10;
    const update = (expected: number, requestId: string, refunded = 50) => ({
      table: 'os1_orders',
      key: { id },
      set: { refunded },
      expected,
      insert: { into: 'os1_refunds', values: { request_id: requestId, amount: refunded }, fromRow: { order_id: 'id' } },
    });
    it(`applies once and replays; a conflict is not stored; not-found is (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        // a stale version: VersionConflictError with the current version, and the key stays free
        await q(runner, 'update os1_orders set version = 3 where id = $1', [id]);
        const stale = await updateVersioned(runner, update(0, `v${id}`), keyed(`v${id}`)).catch((e) => e);
        expect(stale).toBeInstanceOf(VersionConflictError);
        expect(stale).toMatchObject({ expected: 0, current: 3 });
        // the retry (after a re-read) with the same key applies
        const first = await updateVersioned(runner, update(3, `v${id}`), keyed(`v${id}`));
        expect(first).toEqual({ status: 'applied', replayed: false, row: { id, total: 300, refunded: 50, version: 4 } });
        expect(await updateVersioned(runner, update(3, `v${id}`), keyed(`v${id}`))).toEqual({ status: 'applied', replayed: true });
        await expect(updateVersioned(runner, update(4, `v${id}`, 60), keyed(`v${id}`, { other: true }))).rejects.toBeInstanceOf(
          IdempotencyMismatchError,
        );
        const gone = { ...update(0, `m${id}`), key: { id: 2000 + id } };
        expect(await updateVersioned(runner, gone, keyed(`m${id}`))).toEqual({ status: 'not-found', replayed: false });
        expect(await updateVersioned(runner, gone, keyed(`m${id}`))).toEqual({ status: 'not-found', replayed: true });
      });
      expect(await refundsOf(id)).toEqual([[`v${id}`, 50]]);
      expect(await orderOf(id)).toMatchObject({ refunded: 50, version: 4 });
      expect(await keyRow(`v${id}`)).toMatchObject({ state: 'completed', attempts: 1 });
    });

    if (i === 0)
      it("a copy blocked behind the first one's uncommitted claim replays it once that commits", async () => {
        const v = { table: 'os1_orders', key: { id: 304 }, set: { refunded: 5 }, expected: 0 };
        const { first, second } = await raceBehindOpenClaim((runner) => updateVersioned(runner, v, keyed('ob3')));
        expect(first).toMatchObject({ status: 'applied', replayed: false });
        expect(second).toEqual({ status: 'applied', replayed: true });
        // a retry after a re-read (another expected version) replays too
        expect(await updateVersioned(db.sql, { ...v, expected: 1 }, keyed('ob3'))).toEqual({ status: 'applied', replayed: true });
        expect(await orderOf(304)).toMatchObject({ refunded: 5, version: 1 });
      });

    if (i === 0)
      it('a version that moves between the snapshot and the row lock: VersionConflictError, nothing claimed', async () => {
        const v = { table: 'os1_orders', key: { id: 308 }, set: { refunded: 5 }, expected: 0 };
        const { value, waited } = await behindRowLock('update os1_orders set version = version + 1 where id = 308', () =>
          updateVersioned(db.sql, v, keyed('vl1')),
        );
        expect(waited).toBe(true);
        expect(value).toBeInstanceOf(VersionConflictError);
        expect(value).toMatchObject({ expected: 0, current: 1 });
        expect(await keyRow('vl1')).toBeUndefined();
        expect(await updateVersioned(db.sql, { ...v, expected: 1 }, keyed('vl1'))).toMatchObject({ status: 'applied', replayed: false });
      });

    it(`20 concurrent copies apply exactly once; the others replay or see the moved version (${kind.name})`, async () => {
      const results = await copies(kind, 20, (runner) =>
        updateVersioned(runner, { ...update(0, `w${id}`), key: { id: id + 1 } }, keyed(`w${id}`)),
      );
      const values = results.flatMap((r) => ('value' in r ? [r.value] : []));
      const errors = results.flatMap((r) => ('error' in r ? [r.error] : []));
      expect(values.filter((v) => !v.replayed)).toHaveLength(1);
      expect(values.every((v) => v.status === 'applied')).toBe(true);
      for (const e of errors) expect(e).toBeInstanceOf(VersionConflictError);
      // a copy that saw the conflict retries with the version it re-reads: it gets the replay
      expect(await updateVersioned(db.sql, { ...update(1, `w${id}`), key: { id: id + 1 } }, keyed(`w${id}`))).toEqual({
        status: 'applied',
        replayed: true,
      });
      expect(await refundsOf(id + 1)).toEqual([[`w${id}`, 50]]);
      expect(await orderOf(id + 1)).toMatchObject({ refunded: 50, version: 1 });
    });
  });
});

// A plan's read and writes through whatever handle it gets: postgres.js queries stay unsent until
// pgcoord sends them (with COMMIT); other handles run them as they are made.
const lazy = (tx: unknown, text: string, params: unknown[] = []) => {
  const h = tx as { unsafe?: (t: string, p: unknown[], o: object) => PromiseLike<unknown> };
  return typeof tx === 'function' && typeof h.unsafe === 'function' ? h.unsafe(text, params, { prepare: true }) : q(tx, text, params);
};

type Order = { total: number; refunded: number };
const planRefund = (id: number, amount: number, requestId: string, onWrite?: () => void) => ({
  read: (tx: unknown) => lazy(tx, 'select total, refunded from os1_orders where id = $1 for update', [id]) as PromiseLike<Order[]>,
  write: async (tx: unknown, [o]: Order[]) => {
    onWrite?.();
    if (!o || o.refunded + amount > o.total) return { value: { done: false } };
    return {
      value: { done: true },
      writes: [
        lazy(
          tx,
          'with u as (update os1_orders set refunded = refunded + $2 where id = $1 returning id) insert into os1_refunds (request_id, order_id, amount) select $3, id, $2 from u',
          [id, amount, requestId],
        ),
      ],
    };
  },
});
const opts = (key: string, request: unknown = null) => ({ scope: 'shop-1', key, request, table });

describe('idempotent() with a { read, write } plan, on every runner kind', () => {
  db.runners.forEach((kind, i) => {
    const id = 200 + i * 10;
    it(`applies once, replays, refuses another request, stores a final failure (${kind.name})`, async () => {
      let writes = 0;
      await kind.use(async (runner) => {
        const first = await idempotent(
          runner,
          opts(`p${id}`, { amount: 100 }),
          planRefund(id, 100, `p${id}`, () => writes++),
        );
        expect(first).toEqual({ value: { done: true }, replayed: false });
        const again = await idempotent(
          runner,
          opts(`p${id}`, { amount: 100 }),
          planRefund(id, 100, `p${id}`, () => writes++),
        );
        expect(again).toEqual({ value: { done: true }, replayed: true });
        const other = await idempotent(
          runner,
          opts(`p${id}`, { amount: 5 }),
          planRefund(id, 5, `p${id}`, () => writes++),
        ).catch((e) => e);
        expect(other).toBeInstanceOf(IdempotencyMismatchError);
        expect(other.status).toBe(422);
        // guard-failed is a value like any other: stored and replayed
        expect(
          await idempotent(
            runner,
            opts(`q${id}`),
            planRefund(id, 500, `q${id}`, () => writes++),
          ),
        ).toEqual({
          value: { done: false },
          replayed: false,
        });
        expect(
          await idempotent(
            runner,
            opts(`q${id}`),
            planRefund(id, 1, `q${id}`, () => writes++),
          ),
        ).toEqual({
          value: { done: false },
          replayed: true,
        });
        // a final failure is stored; a plain error leaves the key retryable
        const fail = { write: () => Promise.reject(new FinalFailure({ reason: 'closed' }, { status: 409 })) };
        const f1 = await idempotent(runner, opts(`f${id}`), fail).catch((e) => e);
        const f2 = await idempotent(runner, opts(`f${id}`), fail).catch((e) => e);
        expect(f1).toBeInstanceOf(IdempotentFailureError);
        expect([f1.status, f1.replayed, f2.status, f2.replayed, f2.body]).toEqual([409, false, 409, true, { reason: 'closed' }]);
        const thrown = await idempotent(runner, opts(`t${id}`), { write: () => Promise.reject(new Error('boom')) }).catch((e) => e);
        expect(thrown.message).toBe('boom');
        if (kind.inTx) return; // the caller's transaction: its own outcome is the caller's
        expect(await idempotent(runner, opts(`t${id}`), { write: () => ({ value: 7 }) })).toEqual({ value: 7, replayed: false });
      });
      expect(writes).toBe(2);
      expect(await refundsOf(id)).toEqual([[`p${id}`, 100]]);
    });

    if (i === 0)
      it("a copy blocked behind the first one's uncommitted claim waits for it, then replays", async () => {
        let writes = 0;
        const { first, second } = await raceBehindOpenClaim((runner) =>
          idempotent(
            runner,
            { ...opts('ob4'), waitMs: 30_000 },
            planRefund(305, 10, 'ob4', () => writes++),
          ),
        );
        expect(first).toEqual({ value: { done: true }, replayed: false });
        expect(second).toEqual({ value: { done: true }, replayed: true });
        expect(writes).toBe(1);
        expect(await refundsOf(305)).toEqual([['ob4', 10]]);
      });

    it(`20 concurrent copies of one key apply exactly once (${kind.name})`, async () => {
      let writes = 0;
      const results = await copies(kind, 20, (runner) =>
        idempotent(
          runner,
          { ...opts(`c${id}`, { amount: 30 }), waitMs: 30_000 },
          planRefund(id + 1, 30, `c${id}`, () => writes++),
        ),
      );
      expect(results.filter((r) => 'error' in r)).toEqual([]);
      const values = results.map((r) => (r as { value: { value: unknown; replayed: boolean } }).value);
      expect(values.filter((v) => !v.replayed)).toHaveLength(1);
      for (const v of values) expect(v.value).toEqual({ done: true });
      expect(writes).toBe(1);
      expect(await refundsOf(id + 1)).toEqual([[`c${id}`, 30]]);
    });
  });
});

describe('same table, same guarantees as idempotent()', () => {
  it("a one-statement row is idempotent()'s completed row: it replays there and is purged after its retention", async () => {
    await guardedUpdate(db.sql, refund(390, 10, 'x1'), keyed('x1', { n: 1 }));
    const replay = await idempotent(db.sql, opts('x1', { n: 1 }), () => 'never run');
    expect(replay).toEqual({ value: { status: 'applied' }, replayed: true });
    // past its retention the key is free: the same request applies again, and purge deletes rows
    await guardedUpdate(db.sql, refund(391, 10, 'x2'), keyed('x2', null, { retentionMs: 1 }));
    await sleep(20);
    expect(await guardedUpdate(db.sql, refund(391, 10, 'x2'), keyed('x2', null, { retentionMs: 1 }))).toMatchObject({
      status: 'applied',
      replayed: false,
    });
    expect(await refundsOf(391)).toEqual([
      ['x2', 10],
      ['x2', 10],
    ]);
    await sleep(20);
    const purged = await purgeExpired(db.sql, table);
    expect(purged.deleted).toBeGreaterThanOrEqual(1);
    expect(await keyRow('x2')).toBeUndefined();
  });

  it('a key held by a running attempt of idempotent() is in flight (409 after waitMs)', async () => {
    let release = () => {};
    const held = new Promise<void>((r) => (release = r));
    let started = () => {};
    const running = new Promise<void>((r) => (started = r));
    const job = idempotent(db.sql, { ...opts('busy'), mode: 'phased' }, async (ctx) => {
      started();
      await held;
      return ctx.phase('one', () => 1);
    });
    await running;
    const t0 = performance.now();
    const err = await guardedUpdate(db.sql, refund(392, 1, 'busy'), keyed('busy', null, { waitMs: 100 })).catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyInFlightError);
    expect(err.status).toBe(409);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(90);
    release();
    await job;
    // the key now holds idempotent()'s own result: another operation under this key is refused
    await expect(guardedUpdate(db.sql, refund(392, 1, 'busy'), keyed('busy'))).rejects.toBeInstanceOf(IdempotencyMismatchError);
    expect(await refundsOf(392)).toEqual([]);
  });

  it('checks scope, key and table names before sending anything', async () => {
    const sent: string[] = [];
    const sql = db.newSql({ max: 1, debug: (_c, text) => sent.push(text) });
    await expect(guardedUpdate(sql, refund(393, 1, 'v'), { idempotency: { key: 'k', table } })).rejects.toBeInstanceOf(
      IdempotencyScopeRequiredError,
    );
    await expect(guardedUpdate(sql, refund(393, 1, 'v'), keyed('bad\nkey'))).rejects.toBeInstanceOf(IdempotencyKeyInvalidError);
    await expect(guardedUpdate(sql, refund(393, 1, 'v'), keyed('k', undefined, { table: { table: 'Bad' } }))).rejects.toBeInstanceOf(
      InvalidOptionError,
    );
    await expect(
      updateVersioned(sql, { table: 'os1_orders', key: { id: 393 }, set: { refunded: 1 }, expected: 0 }, { idempotency: null as never }),
    ).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(idempotent(sql, opts('k'), { read: 'nope' } as never)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(idempotent(sql, { ...opts('k'), mode: 'phased' }, { write: () => ({ value: 1 }) })).rejects.toBeInstanceOf(
      InvalidOptionError,
    );
    expect(sent).toEqual([]);
    await expect(
      guardedUpdate(sql, refund(393, 1, 'v'), { idempotency: { scope: 's', key: 'k', table: { schema: 'nowhere', table: 'keys' } } }),
    ).rejects.toBeInstanceOf(IdempotencyNotMigratedError);
  });
});

describe('round trips on postgres.js (socket writes on one connection, statements already prepared)', () => {
  const { sql, writes } = db.countingSql();
  async function count<V>(fn: () => Promise<V>): Promise<{ value: V; answered: number; total: number }> {
    await sql`select 1 as idle`;
    const before = writes.count;
    const value = await fn();
    const answered = writes.count - before;
    await sql`select 1 as idle`; // queued until pgcoord gives the connection back
    return { value, answered, total: writes.count - before - 1 };
  }
  const handlerAlone = (id: number) => () =>
    inTransaction(sql, {}, async (scope) => {
      const plan = planRefund(id, 1, 'alone');
      const read = (await scope.conn.sendThen([], () => scope.call((tx) => plan.read(tx) as Promise<unknown>)))[0];
      const { writes: w } = await scope.call((tx) => plan.write(tx, read as Order[]));
      const { commitWith } = await import('../src/driver/index.js');
      return commitWith(scope.conn, w);
    });

  it('warms up every statement on the connection', async () => {
    await guardedUpdate(sql, refund(380, 1, 'w1'), keyed('w1'));
    await guardedUpdate(sql, refund(380, 1, 'w1'), keyed('w1'));
    await updateVersioned(sql, { table: 'os1_orders', key: { id: 381 }, set: { refunded: 1 }, expected: 0 }, keyed('w2'));
    await updateVersioned(sql, { table: 'os1_orders', key: { id: 381 }, set: { refunded: 1 }, expected: 0 }, keyed('w2'));
    await idempotent(sql, opts('w3'), planRefund(382, 1, 'w3'));
    await idempotent(sql, opts('w3'), planRefund(382, 1, 'w3'));
    await handlerAlone(382)();
  });

  it('guardedUpdate / updateVersioned with a key: one round trip for a first call, one for a replay', async () => {
    const first = await count(() => guardedUpdate(sql, refund(383, 1, 'rt1'), keyed('rt1')));
    expect(first).toMatchObject({ value: { status: 'applied', replayed: false }, answered: 1, total: 1 });
    const replay = await count(() => guardedUpdate(sql, refund(383, 1, 'rt1'), keyed('rt1')));
    expect(replay).toMatchObject({ value: { status: 'applied', replayed: true }, answered: 1, total: 1 });
    const v = { table: 'os1_orders', key: { id: 384 }, set: { refunded: 1 }, expected: 0 };
    expect(await count(() => updateVersioned(sql, v, keyed('rt2')))).toMatchObject({ answered: 1, total: 1 });
    expect(await count(() => updateVersioned(sql, v, keyed('rt2')))).toMatchObject({ value: { replayed: true }, answered: 1, total: 1 });
  });

  it('the plan form: two round trips for a first call (the handler alone: two), a replay answered after one', async () => {
    const alone = await count(handlerAlone(385));
    expect(alone).toMatchObject({ answered: 2, total: 2 });
    const first = await count(() => idempotent(sql, opts('rt3'), planRefund(385, 1, 'rt3')));
    expect(first).toMatchObject({ value: { value: { done: true }, replayed: false }, answered: 2, total: 2 });
    expect(first.total - alone.total).toBeLessThanOrEqual(1);
    const replay = await count(() => idempotent(sql, opts('rt3'), planRefund(385, 1, 'rt3')));
    // answered after [BEGIN, claim, read]; the COMMIT of that write-free transaction follows
    expect(replay).toMatchObject({ value: { value: { done: true }, replayed: true }, answered: 1, total: 2 });
  });
});
