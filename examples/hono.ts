// A refund endpoint on Hono with drizzle (over postgres.js), made safe to retry with an
// Idempotency-Key.
//
//   DATABASE_URL=postgres://... npx tsx examples/hono.ts
//   curl -X POST localhost:3000/orders/1/refunds -H 'x-tenant: acme' -H 'Idempotency-Key: "r-1"' \
//        -H 'content-type: application/json' -d '{"amount_cents": 500}'
//
// Send it twice: one refund is written, and the second answer is the first one, replayed
// byte for byte with `Idempotent-Replayed: true`.

import { pathToFileURL } from 'node:url';
import { serve } from '@hono/node-server';
import { and, sql as dsql, eq } from 'drizzle-orm';
import { integer, pgTable, serial } from 'drizzle-orm/pg-core';
import { drizzle, type PostgresJsDatabase } from 'drizzle-orm/postgres-js';
import { Hono } from 'hono';
import postgres from 'postgres';
import { type IdempotencyVariables, idempotencyHono, migrateIdempotency } from '../src/index.js';

const orders = pgTable('orders', {
  id: integer('id').primaryKey(),
  totalCents: integer('total_cents').notNull(),
  refundedCents: integer('refunded_cents').notNull().default(0),
});
const refunds = pgTable('refunds', {
  id: serial('id').primaryKey(),
  orderId: integer('order_id').notNull(),
  amountCents: integer('amount_cents').notNull(),
});

/** A drizzle transaction, as the middleware's context hands it over for a drizzle db. */
type Tx = Parameters<Parameters<PostgresJsDatabase['transaction']>[0]>[0];

/** The idempotency table (a deploy step in a real app) and the demo's tables, with order 1. */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await migrateIdempotency(sql);
  await sql.unsafe(`
    create table if not exists orders (id int primary key, total_cents int not null, refunded_cents int not null default 0);
    create table if not exists refunds (id serial primary key, order_id int not null references orders, amount_cents int not null);
    insert into orders (id, total_cents) values (1, 20000) on conflict do nothing`);
}

export function createApp(sql: postgres.Sql): Hono<{ Variables: IdempotencyVariables }> {
  const db = drizzle(sql);
  const app = new Hono<{ Variables: IdempotencyVariables }>();
  // The middleware reads the body itself (up to maxBodyBytes, 413 above, streamed bodies too) and
  // leaves it cached: c.req.json() still works in the handler.
  app.use(
    '/orders/*',
    idempotencyHono(db, {
      // The tenant the key belongs to: in a real app the authenticated client, never a raw header.
      scope: (c) => c.req.header('x-tenant'),
    }),
  );

  app.post('/orders/:id/refunds', async (c) => {
    // The claimed key's transaction (a drizzle tx, since the runner is a drizzle db): these writes
    // commit together with the stored response, or not at all.
    const tx = c.get('idempotency').tx as Tx;
    const orderId = Number(c.req.param('id'));
    const { amount_cents: amount } = await c.req.json<{ amount_cents?: unknown }>();
    if (typeof amount !== 'number' || !Number.isInteger(amount) || amount <= 0)
      return c.json({ error: 'amount_cents must be a positive integer' }, 400);
    const [order] = await tx
      .update(orders)
      .set({ refundedCents: dsql`${orders.refundedCents} + ${amount}` })
      .where(and(eq(orders.id, orderId), dsql`${orders.refundedCents} + ${amount} <= ${orders.totalCents}`))
      .returning({ refundedCents: orders.refundedCents });
    // a deterministic 4xx is stored too: a retry of this request gets the same answer
    if (!order) return c.json({ error: 'no such order, or the refund exceeds what is left' }, 422);
    const [refund] = await tx.insert(refunds).values({ orderId, amountCents: amount }).returning({ id: refunds.id });
    c.header('location', `/orders/${orderId}/refunds/${refund!.id}`);
    return c.json({ id: refund!.id, order_id: orderId, amount_cents: amount, refunded_cents: order.refundedCents }, 201);
  });
  return app;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://localhost/postgres');
  await setUp(sql);
  const port = Number(process.env.PORT ?? 3000);
  serve({ fetch: createApp(sql).fetch, port }, () => console.log(`POST http://localhost:${port}/orders/1/refunds`));
}
