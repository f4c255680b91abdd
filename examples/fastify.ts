// A refund endpoint on Fastify with node-postgres, made safe to retry with an Idempotency-Key.
//
//   DATABASE_URL=postgres://... npx tsx examples/fastify.ts
//   curl -X POST localhost:3000/orders/1/refunds -H 'x-tenant: acme' -H 'Idempotency-Key: "r-1"' \
//        -H 'content-type: application/json' -d '{"amount_cents": 500}'
//
// Send it twice: one refund is written, and the second answer is the first one, replayed
// byte for byte with `Idempotent-Replayed: true`.

import { pathToFileURL } from 'node:url';
import Fastify, { type FastifyInstance } from 'fastify';
import pg from 'pg';
import { idempotencyFastify, migrateIdempotency } from '../src/index.js';

/** The idempotency table (a deploy step in a real app) and the demo's tables, with order 1. */
export async function setUp(pool: pg.Pool): Promise<void> {
  await migrateIdempotency(pool);
  await pool.query(`
    create table if not exists orders (id int primary key, total_cents int not null, refunded_cents int not null default 0);
    create table if not exists refunds (id serial primary key, order_id int not null references orders, amount_cents int not null);
    insert into orders (id, total_cents) values (1, 20000) on conflict do nothing`);
}

const BODY_LIMIT = 64 * 1024;

export async function createApp(pool: pg.Pool): Promise<FastifyInstance> {
  // Fastify parses the body before the plugin sees it: its bodyLimit applies first (answered as a
  // 413 problem+json for the routes the plugin covers). Keep maxBodyBytes and bodyLimit equal.
  const app = Fastify({ bodyLimit: BODY_LIMIT });
  await app.register(
    idempotencyFastify(pool, {
      // The tenant the key belongs to: in a real app the authenticated client, never a raw header.
      scope: (req) => {
        const tenant = req.headers['x-tenant'];
        return typeof tenant === 'string' ? tenant : undefined;
      },
      maxBodyBytes: BODY_LIMIT,
    }),
  );

  app.post<{ Params: { id: string }; Body: { amount_cents?: unknown } }>('/orders/:id/refunds', async (req, reply) => {
    // The claimed key's transaction (a checked-out pg client, inside BEGIN): these writes commit
    // together with the stored response, or not at all.
    const tx = req.idempotency!.tx as pg.PoolClient;
    const orderId = Number(req.params.id);
    const amount = req.body?.amount_cents;
    if (!Number.isInteger(amount) || (amount as number) <= 0)
      return reply.code(400).send({ error: 'amount_cents must be a positive integer' });
    const { rows: orders } = await tx.query<{ refunded_cents: number }>(
      `update orders set refunded_cents = refunded_cents + $2
       where id = $1 and refunded_cents + $2 <= total_cents returning refunded_cents`,
      [orderId, amount],
    );
    const order = orders[0];
    // a deterministic 4xx is stored too: a retry of this request gets the same answer
    if (!order) return reply.code(422).send({ error: 'no such order, or the refund exceeds what is left' });
    const { rows } = await tx.query<{ id: number }>('insert into refunds (order_id, amount_cents) values ($1, $2) returning id', [
      orderId,
      amount,
    ]);
    const refund = rows[0]!;
    return reply
      .code(201)
      .header('location', `/orders/${orderId}/refunds/${refund.id}`)
      .send({ id: refund.id, order_id: orderId, amount_cents: amount, refunded_cents: order.refunded_cents });
  });
  return app;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL ?? 'postgres://localhost/postgres' });
  await setUp(pool);
  const app = await createApp(pool);
  const port = Number(process.env.PORT ?? 3000);
  await app.listen({ port });
  console.log(`POST http://localhost:${port}/orders/1/refunds`);
}
