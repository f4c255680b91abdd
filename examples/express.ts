// A refund endpoint on Express with postgres.js, made safe to retry with an Idempotency-Key.
//
//   DATABASE_URL=postgres://... npx tsx examples/express.ts
//   curl -X POST localhost:3000/orders/1/refunds -H 'x-tenant: acme' -H 'Idempotency-Key: "r-1"' \
//        -H 'content-type: application/json' -d '{"amount_cents": 500}'
//
// Send it twice: one refund is written, and the second answer is the first one, replayed
// byte for byte with `Idempotent-Replayed: true`.

import { pathToFileURL } from 'node:url';
import express, { type Express } from 'express';
import postgres from 'postgres';
import { idempotencyExpress, migrateIdempotency } from '../src/index.js';

/** The idempotency table (a deploy step in a real app) and the demo's tables, with order 1. */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await migrateIdempotency(sql);
  await sql.unsafe(`
    create table if not exists orders (id int primary key, total_cents int not null, refunded_cents int not null default 0);
    create table if not exists refunds (id serial primary key, order_id int not null references orders, amount_cents int not null);
    insert into orders (id, total_cents) values (1, 20000) on conflict do nothing`);
}

export function createApp(sql: postgres.Sql): Express {
  const app = express();
  // Before any body parser: the middleware reads the body itself (up to maxBodyBytes, 413 above),
  // fingerprints it and sets req.body (parsed JSON, or a Buffer for other content types).
  app.use(
    '/orders',
    idempotencyExpress(sql, {
      // The tenant the key belongs to: in a real app the authenticated client, never a raw header.
      scope: (req) => req.get('x-tenant'),
    }),
  );
  app.use(express.json()); // for routes the middleware does not cover (it skips a body already read)

  app.post('/orders/:id/refunds', async (req, res) => {
    // The claimed key's transaction: these writes commit together with the stored response, or
    // not at all (a thrown error or a 5xx rolls them back and leaves the key retryable).
    const tx = req.idempotency!.tx as postgres.TransactionSql;
    const orderId = Number(req.params.id);
    const amount = (req.body as { amount_cents?: unknown }).amount_cents;
    if (!Number.isInteger(amount) || (amount as number) <= 0) {
      res.status(400).json({ error: 'amount_cents must be a positive integer' });
      return;
    }
    const [order] = await tx`
      update orders set refunded_cents = refunded_cents + ${amount as number}
      where id = ${orderId} and refunded_cents + ${amount as number} <= total_cents
      returning refunded_cents`;
    if (!order) {
      // a deterministic 4xx is stored too: a retry of this request gets the same answer
      res.status(422).json({ error: 'no such order, or the refund exceeds what is left' });
      return;
    }
    const [refund] = await tx`insert into refunds (order_id, amount_cents) values (${orderId}, ${amount as number}) returning id`;
    res
      .status(201)
      .location(`/orders/${orderId}/refunds/${refund!.id}`)
      .json({ id: refund!.id, order_id: orderId, amount_cents: amount, refunded_cents: order.refunded_cents });
  });
  return app;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://localhost/postgres');
  await setUp(sql);
  const port = Number(process.env.PORT ?? 3000);
  createApp(sql).listen(port, () => console.log(`POST http://localhost:${port}/orders/1/refunds`));
}
