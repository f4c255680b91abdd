// The apps in examples/ on real HTTP ports against the test database: the same refund sent twice
// with one Idempotency-Key writes one refund, and the second answer is the first one, replayed.
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { afterAll, describe, expect, it } from 'vitest';
import * as expressExample from '../examples/express.js';
import * as fastifyExample from '../examples/fastify.js';
import * as honoExample from '../examples/hono.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(8);
// The examples type their pools as the development driver's (postgres.js 4): the one under test
// (./pgjs.ts, 3.4 with PGCOORD_PGJS=3) has the same surface for what they use.
type PgjsSql = Parameters<typeof expressExample.setUp>[0];

interface Running {
  url: string;
  close(): Promise<void>;
}

const apps: { name: string; start(): Promise<Running> }[] = [
  {
    name: 'express + postgres.js',
    async start() {
      const sql = db.newSql() as unknown as PgjsSql;
      await expressExample.setUp(sql);
      const server = expressExample.createApp(sql).listen(0, '127.0.0.1');
      await new Promise((r) => server.once('listening', r));
      return {
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        close: () => new Promise((r) => server.close(() => r())),
      };
    },
  },
  {
    name: 'fastify + node-postgres',
    async start() {
      const pool = db.newPool();
      await fastifyExample.setUp(pool);
      const app = await fastifyExample.createApp(pool);
      await app.listen({ port: 0, host: '127.0.0.1' });
      return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, close: () => app.close() };
    },
  },
  {
    name: 'hono + drizzle (postgres.js)',
    async start() {
      const sql = db.newSql() as unknown as PgjsSql; // drizzle rewrites its client's parsers: a pool of its own
      await honoExample.setUp(sql);
      const server = serve({ fetch: honoExample.createApp(sql).fetch, port: 0, hostname: '127.0.0.1' });
      await new Promise((r) => server.once('listening', r));
      return {
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        close: () => new Promise((r) => server.close(() => r())),
      };
    },
  },
];

const running: Running[] = [];
afterAll(async () => {
  await Promise.all(running.map((r) => r.close()));
});

function refund(url: string, orderId: number, key: string, body: unknown) {
  return fetch(`${url}/orders/${orderId}/refunds`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-tenant': 'acme', 'idempotency-key': `"${key}"` },
    body: JSON.stringify(body),
  });
}

describe('examples/', () => {
  apps.forEach((app, i) => {
    it(`${app.name}: the same refund twice with one Idempotency-Key: one refund, an identical replay`, async () => {
      const server = await app.start();
      running.push(server);
      const orderId = 100 + i;
      await db.sql`insert into orders (id, total_cents) values (${orderId}, 1000)`;

      const first = await refund(server.url, orderId, `refund-${i}`, { amount_cents: 600 });
      const firstBody = await first.text();
      expect(first.status, firstBody).toBe(201);
      expect(first.headers.get('idempotent-replayed')).toBeNull();
      expect(JSON.parse(firstBody)).toMatchObject({ order_id: orderId, amount_cents: 600, refunded_cents: 600 });

      const second = await refund(server.url, orderId, `refund-${i}`, { amount_cents: 600 });
      expect(second.status).toBe(201);
      expect(second.headers.get('idempotent-replayed')).toBe('true');
      expect(await second.text()).toBe(firstBody);
      expect(second.headers.get('location')).toBe(first.headers.get('location'));
      expect(second.headers.get('content-type')).toBe(first.headers.get('content-type'));

      // one side effect
      const rows = await db.sql`select amount_cents from refunds where order_id = ${orderId}`;
      expect(rows.map((r) => r.amount_cents)).toEqual([600]);
      const [order] = await db.sql`select refunded_cents from orders where id = ${orderId}`;
      expect(order?.refunded_cents).toBe(600);

      // another key is another refund: 600 more exceeds the total, a 422 that is stored too
      const over = await refund(server.url, orderId, `refund-${i}-b`, { amount_cents: 600 });
      expect(over.status).toBe(422);
      const overAgain = await refund(server.url, orderId, `refund-${i}-b`, { amount_cents: 600 });
      expect(overAgain.status).toBe(422);
      expect(overAgain.headers.get('idempotent-replayed')).toBe('true');
      // the same key with another body is refused, and a request without a key too
      expect((await refund(server.url, orderId, `refund-${i}`, { amount_cents: 1 })).status).toBe(422);
      const noKey = await fetch(`${server.url}/orders/${orderId}/refunds`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-tenant': 'acme' },
        body: '{"amount_cents":1}',
      });
      expect(noKey.status).toBe(400);
      expect(noKey.headers.get('content-type')).toContain('application/problem+json');
      expect((await db.sql`select count(*)::int as n from refunds where order_id = ${orderId}`)[0]?.n).toBe(1);
    });
  });
});
