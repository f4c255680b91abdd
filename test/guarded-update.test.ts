import { beforeAll, describe, expect, it } from 'vitest';
import { AbortedError, guardedUpdate, InvalidIdentifierError, InvalidOptionError } from '../src/index.js';
import { ShapeCache, type ShapeNode } from '../src/sql-target.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb();

beforeAll(async () => {
  await db.sql`create schema billing`;
  await db.sql`create table billing.gu_orders (id int primary key, total int not null, refunded int not null default 0, note text)`;
  await db.sql`insert into billing.gu_orders (id, total) select g, 300 from generate_series(1, 50) g`;
});

const refund = (id: number, amount: number) => ({
  table: 'billing.gu_orders',
  key: { id },
  set: 'refunded = refunded + $1',
  guard: 'refunded + $1 <= total',
  params: [amount],
});

/** Another connection: lock row `id`, run `sql` on it, commit when the returned function is called. */
async function holdAndChange(id: number, text: string): Promise<() => Promise<void>> {
  const client = await db.pool.connect();
  await client.query('begin');
  await client.query('select 1 from billing.gu_orders where id = $1 for update', [id]);
  await client.query(text, [id]);
  return async () => {
    await client.query('commit');
    client.release();
  };
}

describe('guardedUpdate on every runner kind', () => {
  db.runners.forEach((kind, i) => {
    const id = i + 1;
    it(`tells applied from guard-failed from not-found (${kind.name})`, async () => {
      const results = await kind.use(async (runner) => [
        await guardedUpdate(runner, refund(id, 200)),
        await guardedUpdate(runner, refund(id, 200)),
        await guardedUpdate(runner, refund(id, 100)),
        await guardedUpdate(runner, refund(1000 + id, 1)),
        await guardedUpdate(runner, {
          table: 'billing.gu_orders',
          key: { id },
          set: { note: `by ${kind.name}` },
          guard: 'refunded = total',
        }),
      ]);
      expect(results).toEqual([
        { status: 'applied', row: { id, total: 300, refunded: 200, note: null } },
        { status: 'guard-failed' },
        { status: 'applied', row: { id, total: 300, refunded: 300, note: null } },
        { status: 'not-found' },
        { status: 'applied', row: { id, total: 300, refunded: 300, note: `by ${kind.name}` } },
      ]);
    });
  });
});

describe('guardedUpdate against a concurrent writer', () => {
  it('waits for the row, then reports a row deleted meanwhile as not found', async () => {
    const commit = await holdAndChange(20, 'delete from billing.gu_orders where id = $1');
    const pending = guardedUpdate(db.sql, refund(20, 10));
    await sleep(50);
    await commit();
    expect(await pending).toEqual({ status: 'not-found' });
  });

  it('evaluates the guard and the SET on the newest version (guard now false)', async () => {
    const commit = await holdAndChange(21, 'update billing.gu_orders set refunded = 250 where id = $1');
    const pending = guardedUpdate(db.sql, refund(21, 100));
    await sleep(50);
    await commit();
    expect(await pending).toEqual({ status: 'guard-failed' });
  });

  it('evaluates the guard and the SET on the newest version (guard now true)', async () => {
    await db.sql`update billing.gu_orders set refunded = 300 where id = 22`;
    const commit = await holdAndChange(22, 'update billing.gu_orders set total = 500 where id = $1');
    const pending = guardedUpdate(db.pool, refund(22, 150));
    await sleep(50);
    await commit();
    expect(await pending).toEqual({ status: 'applied', row: { id: 22, total: 500, refunded: 450, note: null } });
  });

  it('fails under SERIALIZABLE when the row changed since the snapshot (retryable 40001)', async () => {
    const commit = await holdAndChange(23, 'update billing.gu_orders set refunded = 1 where id = $1');
    const pending = guardedUpdate(db.sql, refund(23, 100), { isolation: 'serializable' }).catch((e: unknown) => e);
    await sleep(50);
    await commit();
    expect((await pending) as { code?: string }).toMatchObject({ code: '40001' });
  });

  it('cancels the wait on abort', async () => {
    const commit = await holdAndChange(24, 'select $1::int');
    try {
      const ac = new AbortController();
      setTimeout(() => ac.abort(), 50);
      await expect(guardedUpdate(db.pool, refund(24, 1), { signal: ac.signal })).rejects.toBeInstanceOf(AbortedError);
    } finally {
      await commit();
    }
    // in a caller's transaction the cancelled statement is rolled back to a savepoint
    const commit2 = await holdAndChange(24, 'select $1::int');
    try {
      const ac = new AbortController();
      setTimeout(() => ac.abort(), 50);
      const after = await db.sql.begin(async (tx) => {
        await expect(guardedUpdate(tx, refund(24, 1), { signal: ac.signal })).rejects.toBeInstanceOf(AbortedError);
        return tx`select 1 as one`;
      });
      expect(after[0]?.one).toBe(1);
    } finally {
      await commit2();
    }
    const [row] = await q(db.sql, 'select refunded from billing.gu_orders where id = 24');
    expect(row!.refunded).toBe(0);
  });
});

describe('guardedUpdate bad input', () => {
  it('rejects bad identifiers and options with typed errors', async () => {
    const base = refund(1, 1);
    await expect(guardedUpdate(db.sql, { ...base, table: 'gu_orders where 1=1' })).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(guardedUpdate(db.sql, { ...base, key: { 'id"': 1 } })).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(guardedUpdate(db.sql, { ...base, set: { 'refunded = 0 --': 1 } })).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(guardedUpdate(db.sql, { ...base, key: {} })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, { ...base, guard: ' ' })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, { ...base, set: {} })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, { ...base, params: 'x' as unknown as [] })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, base, { signal: 'x' as unknown as AbortSignal })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, base, { isolation: 'snapshot' as 'serializable' })).rejects.toBeInstanceOf(InvalidOptionError);
    const before = await q(db.sql, 'select refunded, note from billing.gu_orders where id = 1');
    await expect(guardedUpdate(db.sql, base, { readOnly: 'no' as unknown as boolean })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, { ...base, params: [undefined] })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, { ...base, set: { note: undefined } })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(guardedUpdate(db.sql, base, { signal: AbortSignal.abort() })).rejects.toBeInstanceOf(AbortedError);
    expect(await q(db.sql, 'select refunded, note from billing.gu_orders where id = 1')).toEqual(before); // nothing above ran
  });
});

describe('guardedUpdate statement shapes (each text built once, each call with its own values)', () => {
  it('keeps shapes apart that differ only in a null key, a set form, a param count or an insert', async () => {
    await db.sql`create table billing.gu_log (order_id int, note text)`;
    const table = 'billing.gu_orders';
    // same shape as a later call, but a null key: `id is null` matches nothing
    expect(await guardedUpdate(db.sql, { table, key: { id: null }, set: 'refunded = refunded + $1', guard: 'true', params: [1] })).toEqual({
      status: 'not-found',
    });
    expect(
      await guardedUpdate(db.sql, { table, key: { id: 30 }, set: 'refunded = refunded + $1', guard: 'true', params: [1] }),
    ).toMatchObject({
      status: 'applied',
      row: { id: 30, refunded: 1 },
    });
    // a set object after a set fragment, otherwise the same
    expect(
      await guardedUpdate(db.sql, { table, key: { id: 30 }, set: { note: 'object' }, guard: 'refunded >= $1', params: [1] }),
    ).toMatchObject({
      row: { id: 30, refunded: 1, note: 'object' },
    });
    // two params, then one: the key's placeholder moves
    const two = { table, key: { id: 31 }, set: 'refunded = refunded + $1', guard: 'refunded + $1 <= $2' };
    expect(await guardedUpdate(db.sql, { ...two, params: [5, 300] })).toMatchObject({ row: { id: 31, refunded: 5 } });
    expect(await guardedUpdate(db.sql, { ...two, params: [5, 4] })).toEqual({ status: 'guard-failed' });
    expect(await guardedUpdate(db.sql, { ...two, guard: 'refunded + $1 <= total', params: [7] })).toMatchObject({ row: { refunded: 12 } });
    // with and without an insert; the insert's values come from each call
    for (const note of ['first', 'second']) {
      const r = await guardedUpdate(db.sql, {
        table,
        key: { id: 32 },
        set: 'refunded = refunded + $1',
        guard: 'true',
        params: [1],
        insert: { into: 'billing.gu_log', values: { note }, fromRow: { order_id: 'id' } },
      });
      expect(r.status).toBe('applied');
    }
    expect(await q(db.sql, 'select order_id, note from billing.gu_log order by note')).toEqual([
      { order_id: 32, note: 'first' },
      { order_id: 32, note: 'second' },
    ]);
  });

  it('checks every call of a known shape, and never stores an invalid one', async () => {
    const good = refund(33, 1);
    expect((await guardedUpdate(db.sql, good)).status).toBe('applied');
    await expect(guardedUpdate(db.sql, { ...good, key: { id: undefined } })).rejects.toBeInstanceOf(InvalidOptionError);
    for (let i = 0; i < 2; i++) {
      await expect(guardedUpdate(db.sql, { ...good, key: { 'id"': 33 } })).rejects.toBeInstanceOf(InvalidIdentifierError);
      await expect(guardedUpdate(db.sql, { ...good, set: { 'x y': 1 } })).rejects.toBeInstanceOf(InvalidIdentifierError);
    }
  });
});

describe('ShapeCache', () => {
  it('starts over once it holds its maximum of nodes', () => {
    const cache = new ShapeCache(3);
    const path = (parts: unknown[]) => parts.reduce<ShapeNode>((node, p) => cache.step(node, p), cache.root());
    const a = path(['t', 'k']);
    cache.set(a, [1], { text: 'select 1', values: [1] });
    expect(cache.get(path(['t', 'k']))).toBe('select 1');
    path(['u']); // the third node
    expect(cache.get(path(['t', 'k']))).toBeUndefined(); // the cache started over
  });

  it('refuses a text whose values are not the ones collected for its shape', () => {
    const cache = new ShapeCache();
    const node = cache.step(cache.root(), 'x');
    expect(() => cache.set(node, [1, 2], { text: 'select $1, $2', values: [2, 1] })).toThrow(/internal error/);
    expect(cache.get(node)).toBeUndefined();
  });
});
