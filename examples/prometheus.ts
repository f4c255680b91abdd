// pgcoord's metrics in Prometheus: a refund endpoint whose refunds of one order take turns under
// an advisory lock (withLock) and are rate-limited per order, instrumented with pgcoord/otel and
// scraped from /metrics by OpenTelemetry's Prometheus exporter.
//
//   DATABASE_URL=postgres://... PORT=9464 npx tsx examples/prometheus.ts
//   curl -X POST localhost:9464/orders/1/refunds -H 'content-type: application/json' -d '{"amount_cents": 500}'
//   curl localhost:9464/metrics    # pgcoord_lock_wait_duration_bucket{pgcoord_outcome="acquired",...} (seconds)
//
// Keys stay out of the metrics: the key attribute is only the key's kind ("order"), never the order.

import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { pathToFileURL } from 'node:url';
import { PrometheusExporter } from '@opentelemetry/exporter-prometheus';
import { MeterProvider } from '@opentelemetry/sdk-metrics';
import postgres from 'postgres';
import { LockTimeoutError, limit, migrateLimits, withLock } from '../src/index.js';
import { instrumentPgcoord } from '../src/otel/index.js';

/** The rate-limit table (a deploy step in a real app) and the demo's tables, with order 1. */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await migrateLimits(sql);
  await sql.unsafe(`
    create table if not exists orders (id int primary key, total_cents int not null, refunded_cents int not null default 0);
    create table if not exists refunds (id serial primary key, order_id int not null references orders, amount_cents int not null);
    insert into orders (id, total_cents) values (1, 20000) on conflict do nothing`);
}

export interface Options {
  port?: number;
  host?: string;
  /** How long a refund waits for its order's lock before answering 409. Default 2000 ms. */
  lockTimeoutMs?: number;
  /** Refunds per order per minute (all of them at once, if need be) before 429. Default 20. */
  refundsPerMinute?: number;
}

/** A refund of `amount` cents: decided under the order's lock, so two refunds never both pass the check. */
export function refund(sql: postgres.Sql, orderId: number, amount: number, lockTimeoutMs: number) {
  return withLock(
    sql,
    `order:${orderId}`,
    async (tx: postgres.TransactionSql) => {
      const [order] = await tx`select total_cents, refunded_cents from orders where id = ${orderId}`;
      if (!order || order.refunded_cents + amount > order.total_cents) return undefined;
      await tx`update orders set refunded_cents = refunded_cents + ${amount} where id = ${orderId}`;
      const [row] = await tx`insert into refunds (order_id, amount_cents) values (${orderId}, ${amount}) returning id`;
      return { id: row!.id as number, refunded_cents: (order.refunded_cents as number) + amount };
    },
    { timeoutMs: lockTimeoutMs },
  );
}

/** Serve POST /orders/:id/refunds and GET /metrics; `close()` stops the server and the instrumentation. */
export async function start(sql: postgres.Sql, options: Options = {}): Promise<{ url: string; close(): Promise<void> }> {
  const { port = 9464, host = '127.0.0.1', lockTimeoutMs = 2000, refundsPerMinute = 20 } = options;
  // The exporter is a metric reader that answers scrapes; here on the app's own server.
  const exporter = new PrometheusExporter({ preventServerStart: true });
  const meterProvider = new MeterProvider({ readers: [exporter] });
  const otel = instrumentPgcoord({ meterProvider, keyAttribute: (key) => key.replace(/^"/, '').split(':')[0] ?? 'other' });

  const reply = (res: ServerResponse, status: number, body: unknown) =>
    res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    if (req.method === 'GET' && req.url === '/metrics') return exporter.getMetricsRequestHandler(req, res);
    const match = req.method === 'POST' ? /^\/orders\/(\d+)\/refunds$/.exec(req.url ?? '') : null;
    if (!match) return reply(res, 404, { error: 'not found' });
    const orderId = Number(match[1]);
    let amount: unknown;
    try {
      const chunks: Buffer[] = [];
      for await (const chunk of req) chunks.push(chunk as Buffer);
      amount = JSON.parse(Buffer.concat(chunks).toString('utf8')).amount_cents;
    } catch {
      return reply(res, 400, { error: 'the body must be JSON' });
    }
    if (!Number.isInteger(amount) || (amount as number) <= 0) return reply(res, 400, { error: 'amount_cents must be a positive integer' });
    const decision = await limit(sql, `refunds:order:${orderId}`, { rate: refundsPerMinute, per: 60_000, burst: refundsPerMinute });
    if (!decision.allowed) {
      res.setHeader('retry-after', String(Math.ceil(decision.retryAfterMs / 1000)));
      return reply(res, 429, { error: 'too many refunds for this order' });
    }
    try {
      const done = await refund(sql, orderId, amount as number, lockTimeoutMs);
      if (!done) return reply(res, 422, { error: 'no such order, or the refund exceeds what is left' });
      return reply(res, 201, { order_id: orderId, amount_cents: amount, ...done });
    } catch (err) {
      if (err instanceof LockTimeoutError) return reply(res, 409, { error: 'another refund of this order is running; retry' });
      throw err;
    }
  };
  const server = createServer((req, res) => {
    handle(req, res).catch(() => {
      if (!res.headersSent) reply(res, 500, { error: 'internal error' });
      else res.end();
    });
  });
  await new Promise<void>((resolve) => server.listen(port, host, resolve));
  const address = server.address() as AddressInfo;
  return {
    url: `http://${host}:${address.port}`,
    async close() {
      otel.stop();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await meterProvider.shutdown();
    },
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://localhost/postgres');
  await setUp(sql);
  const { url } = await start(sql, { port: Number(process.env.PORT ?? 9464), host: process.env.HOST ?? '127.0.0.1' });
  console.log(`POST ${url}/orders/1/refunds, GET ${url}/metrics`);
}
