// The refund storm: an order of $200 gets three $200 refund requests in the same second (customer,
// seller, fraud system). Three stateless instances each read "refundable: $200", each approve, and
// $600 goes out. `naiveRefund` is that code: read, pay (50 ms at the gateway), write. The other three
// close the window between the read and the write, each in its own way: an advisory lock on the
// order (`withLock`), a row lock on it (`withRowLock`, SELECT ... FOR UPDATE), or no read at all
// (`guardedUpdate`: one UPDATE whose WHERE is the check). Whichever instances the three requests
// reach, exactly one refund is paid. test/examples-scenarios.test.ts runs them from three processes.
//
//   DATABASE_URL=postgres://... npx tsx examples/refund-storm.ts
//   naive: 3 of 3 approved, $600.00 paid out for a $200.00 order ... guardedUpdate: 1 of 3, $200.00

import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import postgres from 'postgres';
import { guardedUpdate, withLock, withRowLock } from '../src/index.js';

/** The demo's tables: orders, and the ledger of refunds paid (one row per gateway payout). */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await sql.unsafe(`
    create table if not exists storm_orders (id serial primary key, total_cents int not null, refunded_cents int not null default 0);
    create table if not exists storm_refunds (
      id serial primary key, order_id int not null references storm_orders, amount_cents int not null, requester text not null)`);
}

/** A new order of `totalCents`, nothing refunded yet; resolves to its id. */
export async function openOrder(sql: postgres.Sql, totalCents: number): Promise<number> {
  const [o] = await sql`insert into storm_orders (total_cents) values (${totalCents}) returning id`;
  return Number(o?.id);
}

/** The payment gateway: 50 ms to send the money back. In the naive version, the race window. */
export const payOut = (_orderId: number, _cents: number) => sleep(50);

/** A refund strategy: resolves true when this request was approved (and paid). */
export type Refund = (sql: postgres.Sql, orderId: number, cents: number, requester: string) => Promise<boolean>;

/**
 * The bug. Every instance reads "refundable: $200", pays, then writes. The gateway's 50 ms are in
 * the code on purpose: they make the race certain (the other two requests read while this one
 * pays) instead of a matter of luck; a real gateway takes that long or longer.
 */
export const naiveRefund: Refund = async (sql, orderId, cents, requester) => {
  const [o] = await sql`select total_cents - refunded_cents as left_cents from storm_orders where id = ${orderId}`;
  if (!o || o.left_cents < cents) return false;
  await payOut(orderId, cents);
  await sql`update storm_orders set refunded_cents = refunded_cents + ${cents} where id = ${orderId}`;
  await sql`insert into storm_refunds (order_id, amount_cents, requester) values (${orderId}, ${cents}, ${requester})`;
  return true;
};

/**
 * An advisory lock on the order's key for the transaction: the same read, pay and write, one request
 * at a time per order. As a plan: the read rides behind the lock (`[BEGIN, lock, read]`), the
 * writes with COMMIT, two round trips in all on postgres.js. The lock goes with the transaction.
 */
export const refundWithLock: Refund = async (sql, orderId, cents, requester) => {
  const { written } = await withLock(
    sql,
    `order:${orderId}`,
    {
      read: (tx) => tx`select total_cents - refunded_cents as left_cents from storm_orders where id = ${orderId}`,
      write: async (tx, [o]) => {
        if (!o || o.left_cents < cents) return [];
        await payOut(orderId, cents); // still under the lock: the next request waits for our COMMIT
        return [
          tx`update storm_orders set refunded_cents = refunded_cents + ${cents} where id = ${orderId}`,
          tx`insert into storm_refunds (order_id, amount_cents, requester) values (${orderId}, ${cents}, ${requester})`,
        ];
      },
    },
    { timeoutMs: 5000 },
  );
  return written.length > 0;
};

/** SELECT ... FOR UPDATE on the order's row, then the same code on the row as locked (fresh, not stale). */
export const refundWithRowLock: Refund = (sql, orderId, cents, requester) =>
  withRowLock<postgres.Sql, boolean, { total_cents: number; refunded_cents: number }>(
    sql,
    { table: 'storm_orders', key: { id: orderId } },
    async (o, tx) => {
      if (o.total_cents - o.refunded_cents < cents) return false;
      await payOut(orderId, cents);
      await tx`update storm_orders set refunded_cents = refunded_cents + ${cents} where id = ${orderId}`;
      await tx`insert into storm_refunds (order_id, amount_cents, requester) values (${orderId}, ${cents}, ${requester})`;
      return true;
    },
    { timeoutMs: 5000 },
  );

/**
 * No read: one UPDATE whose WHERE is the check, and the ledger row inserted by the same statement
 * only when it applied. Postgres rechecks the guard on the row's newest version, so of three at
 * once one applies and two find it false. Pay after: the refund is recorded before the money goes
 * (a crash in between leaves a recorded refund to pay, never an unrecorded one paid).
 */
export const refundGuarded: Refund = async (sql, orderId, cents, requester) => {
  const r = await guardedUpdate(sql, {
    table: 'storm_orders',
    key: { id: orderId },
    set: 'refunded_cents = refunded_cents + $1',
    guard: 'refunded_cents + $1 <= total_cents',
    params: [cents],
    insert: { into: 'storm_refunds', values: { amount_cents: cents, requester }, fromRow: { order_id: 'id' } },
  });
  if (r.status !== 'applied') return false;
  await payOut(orderId, cents);
  return true;
};

export const strategies: Record<string, Refund> = {
  naive: naiveRefund,
  withLock: refundWithLock,
  withRowLock: refundWithRowLock,
  guardedUpdate: refundGuarded,
};

export const REQUESTERS = ['customer', 'seller', 'fraud system'] as const;

/** What went out for an order: refunds paid and their sum, from the ledger. */
export async function paidOut(sql: postgres.Sql, orderId: number): Promise<{ refunds: number; cents: number }> {
  const [r] =
    await sql`select count(*)::int as n, coalesce(sum(amount_cents), 0)::int as cents from storm_refunds where order_id = ${orderId}`;
  return { refunds: Number(r?.n), cents: Number(r?.cents) };
}

/** The storm in one process: a new $200 order, three $200 refunds at once through `refund`. */
export async function storm(sql: postgres.Sql, refund: Refund) {
  const orderId = await openOrder(sql, 20_000);
  const approved = await Promise.all(REQUESTERS.map((who) => refund(sql, orderId, 20_000, who)));
  return { orderId, approved: approved.filter(Boolean).length, ...(await paidOut(sql, orderId)) };
}

const dollars = (cents: number) => `$${(cents / 100).toFixed(2)}`;

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  // three connections at least: the three requests run at once, as on three instances
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres', { max: 4, onnotice: () => {} });
  try {
    await setUp(sql);
    for (const [name, refund] of Object.entries(strategies)) {
      const r = await storm(sql, refund);
      console.log(`${name}: ${r.approved} of 3 approved, ${dollars(r.cents)} paid out for a ${dollars(20_000)} order`);
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
}
