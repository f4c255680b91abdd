// The refund race: 60 concurrent $100 refunds against 4 orders of $1000 (15 per order), on 12
// connections, with a real window between reading "refundable" and writing the refund. Without a
// strategy the orders are over-refunded; with each strategy no order goes above its total and
// every order's refunded amount equals the sum of the refunds reported as applied.
import { beforeEach, describe, expect, it } from 'vitest';
import { guardedUpdate, retry, transactionWithRetry, updateVersioned, withRowLock } from '../src/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb(12);

const ORDERS = 4;
const PER_ORDER = 15;
const AMOUNT = 100;
const TOTAL = 1000;

beforeEach(async () => {
  await db.sql`drop table if exists rr_orders`;
  await db.sql`create table rr_orders (id int primary key, total int not null, refunded int not null default 0, version int not null default 0)`;
  await db.sql`insert into rr_orders (id, total) select g, ${TOTAL} from generate_series(1, ${ORDERS}) g`;
});

type Refund = (runner: object, id: number) => Promise<boolean>;

/** Fire all refunds at once; return the applied amount per order as reported by the strategy. */
async function race(runner: object, refund: Refund): Promise<Map<number, number>> {
  const requests = Array.from({ length: ORDERS * PER_ORDER }, (_, i) => (i % ORDERS) + 1);
  const results = await Promise.all(requests.map((id) => refund(runner, id).then((ok) => [id, ok] as const)));
  const applied = new Map<number, number>();
  for (const [id, ok] of results) if (ok) applied.set(id, (applied.get(id) ?? 0) + AMOUNT);
  return applied;
}

async function refunded(): Promise<Map<number, number>> {
  const rows = await db.sql`select id, refunded from rr_orders order by id`;
  return new Map(rows.map((r) => [r.id as number, r.refunded as number]));
}

async function expectCorrect(applied: Map<number, number>): Promise<void> {
  const final = await refunded();
  for (let id = 1; id <= ORDERS; id++) {
    expect(final.get(id)).toBeLessThanOrEqual(TOTAL);
    expect(final.get(id)).toBe(applied.get(id) ?? 0);
    // every request retries until it succeeds or sees the order full, so each order fills exactly
    expect(final.get(id)).toBe(TOTAL);
  }
}

// read → think (the window in which the other requests read the same "refundable") → write
const think = (tx: unknown) => q(tx, 'select pg_sleep(0.005)');

const strategies: Record<string, Refund> = {
  'FOR UPDATE (withRowLock)': (runner, id) =>
    withRowLock(runner, { table: 'rr_orders', key: { id } }, async (o, tx) => {
      await think(tx);
      if ((o.refunded as number) + AMOUNT > (o.total as number)) return false;
      await q(tx, 'update rr_orders set refunded = refunded + $1 where id = $2', [AMOUNT, id]);
      return true;
    }),
  'optimistic version + retry': (runner, id) =>
    retry(
      async () => {
        const [o] = await q(runner, 'select total, refunded, version from rr_orders where id = $1', [id]);
        await think(runner);
        if ((o!.refunded as number) + AMOUNT > (o!.total as number)) return false;
        await updateVersioned(runner, {
          table: 'rr_orders',
          key: { id },
          set: { refunded: (o!.refunded as number) + AMOUNT },
          expected: o!.version as number,
        });
        return true;
      },
      { attempts: 200, baseMs: 1, maxMs: 40 },
    ),
  'guarded update': async (runner, id) => {
    const r = await guardedUpdate(runner, {
      table: 'rr_orders',
      key: { id },
      set: 'refunded = refunded + $1',
      guard: 'refunded + $1 <= total',
      params: [AMOUNT],
    });
    return r.status === 'applied';
  },
  'SERIALIZABLE + retry (transactionWithRetry)': (runner, id) =>
    transactionWithRetry(
      runner,
      async (tx) => {
        const [o] = await q(tx, 'select total, refunded from rr_orders where id = $1', [id]);
        await think(tx);
        if ((o!.refunded as number) + AMOUNT > (o!.total as number)) return false;
        await q(tx, 'update rr_orders set refunded = refunded + $1 where id = $2', [AMOUNT, id]);
        return true;
      },
      { isolation: 'serializable', attempts: 200, baseMs: 1, maxMs: 40 },
    ),
};

describe('the refund race', () => {
  it('over-refunds without a strategy (negative control)', async () => {
    const applied = await race(
      db.sql,
      (runner, id) =>
        (runner as typeof db.sql).begin(async (tx) => {
          const [o] = await tx`select total, refunded from rr_orders where id = ${id}`;
          await tx`select pg_sleep(0.02)`;
          if (o!.refunded + AMOUNT > o!.total) return false;
          await tx`update rr_orders set refunded = refunded + ${AMOUNT} where id = ${id}`;
          return true;
        }) as Promise<boolean>,
    );
    const final = await refunded();
    expect([...final.values()].some((v) => v > TOTAL)).toBe(true);
    // the writes were all applied, so the money went out: the control really raced
    expect([...applied.values()].reduce((a, b) => a + b, 0)).toBeGreaterThan(ORDERS * TOTAL);
  });

  const kinds = db.runners.filter((k) => !k.inTx);
  for (const [name, refund] of Object.entries(strategies)) {
    for (const kind of kinds) {
      it(`never over-refunds with ${name} through ${kind.name}`, async () => {
        const applied = await kind.use((runner) => race(runner, refund));
        await expectCorrect(applied);
      });
    }
  }
});
