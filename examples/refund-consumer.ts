// The seed's refund race, answered without a lock: a $200 order gets three $200 refund requests in
// the same second (customer, seller, fraud system). The API does not decide anything: it records
// each request and queues it under the order's key, like a Kafka partition key, then answers 202
// with a status URL. Consumers, in any number of processes, decide an order's requests one at a
// time, in the order they were made: one of the three is approved, the other two are rejected.
//
//   DATABASE_URL=postgres://... PORT=3000 npx tsx examples/refund-consumer.ts [api|consumer|both]
//   curl -X POST localhost:3000/orders/1/refunds -H 'content-type: application/json' \
//        -d '{"amount": 20000, "requester": "customer"}'        # amounts in cents
//   curl localhost:3000/refunds/<id>                             # pending, approved, or rejected and why

import { randomUUID } from 'node:crypto';
import { STATUS_CODES } from 'node:http';
import { pathToFileURL } from 'node:url';
import express, { type ErrorRequestHandler, type Express, type Response } from 'express';
import postgres from 'postgres';
import { enqueue, idempotent, type Job, migrateIdempotency, migrateQueue, type Worker, work } from '../src/index.js';

export const QUEUE = 'refunds';

/** Job payload: the request row holds the rest (it committed with the job). */
export interface RefundJob {
  requestId: string;
}

/** pgcoord's tables (a deploy step in a real app) and the demo's. */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await migrateQueue(sql);
  await migrateIdempotency(sql);
  await sql.unsafe(`
    create table if not exists orders (id int primary key, total_cents int not null, refunded_cents int not null default 0);
    create table if not exists refund_requests (
      id uuid primary key, order_id int not null references orders, amount_cents int not null, requester text not null,
      job_id bigint not null, status text not null default 'pending', reason text, decided_at timestamptz)`);
}

/** Record a refund request and queue it on its order's key, in one transaction. Undefined: no such order. */
export async function requestRefund(
  sql: postgres.Sql,
  orderId: number,
  amountCents: number,
  requester: string,
): Promise<string | undefined> {
  const id = randomUUID();
  const found = await sql.begin(async (tx) => {
    const [order] = await tx`select 1 from orders where id = ${orderId}`;
    if (!order) return false;
    // The outbox: the job exists if and only if the request row commits. Ids are in commit order per key.
    const job = await enqueue(tx, QUEUE, `order:${orderId}`, { requestId: id } satisfies RefundJob);
    await tx`insert into refund_requests (id, order_id, amount_cents, requester, job_id)
      values (${id}, ${orderId}, ${amountCents}, ${requester}, ${String(job.id)})`;
    return true;
  });
  return found ? id : undefined;
}

const dollars = (cents: number) => `$${(cents / 100).toFixed(2)}`;

/**
 * Decide one request: approve it if the order has that much left to refund, else reject it.
 *
 * No lock, and a plain read before the write: the queue runs one job of an order at a time, in
 * enqueue order, so no other decision on this order runs between the read and the write.
 *
 * Delivery is at least once: a consumer that dies after the commit below but before the queue
 * deletes the job leaves the job to run again elsewhere. So the decision runs inside `idempotent()`
 * keyed by `job.idempotencyKey` (the same on every attempt): the key's row, the two updates and the
 * stored result commit in one transaction, so a second run finds the key completed and replays the
 * result without writing. (A fenced write, `withJobFence`, would not be enough on its own: it stops
 * a consumer whose claim was taken over from committing, but a job whose first run committed and
 * then crashed runs again under a new, valid claim.) While a first run is still open, a second one
 * waits on the key's row and then replays.
 */
export async function decideRefund(sql: postgres.Sql, job: Job<RefundJob>): Promise<{ status: string; reason?: string }> {
  const { value } = await idempotent(sql, { scope: QUEUE, key: job.idempotencyKey, signal: job.signal }, async ({ tx }) => {
    const [r] = await tx`select r.amount_cents, o.id as order_id, o.total_cents - o.refunded_cents as left_cents
      from refund_requests r join orders o on o.id = r.order_id where r.id = ${job.payload.requestId}`;
    if (!r) throw new Error(`refund request ${job.payload.requestId} not found`); // retried, then dead
    if (r.amount_cents > r.left_cents) {
      const reason = `only ${dollars(r.left_cents)} of order ${r.order_id} is left to refund, ${dollars(r.amount_cents)} asked`;
      await tx`update refund_requests set status = 'rejected', reason = ${reason}, decided_at = clock_timestamp()
        where id = ${job.payload.requestId}`;
      return { status: 'rejected', reason };
    }
    await tx`update orders set refunded_cents = refunded_cents + ${r.amount_cents} where id = ${r.order_id}`;
    await tx`update refund_requests set status = 'approved', decided_at = clock_timestamp() where id = ${job.payload.requestId}`;
    return { status: 'approved' };
  });
  return value;
}

/**
 * Consume the refund queue: up to `concurrency` orders at once, each order's requests in turn. A
 * job that throws (the database away) is retried as its order's head, later requests of the order
 * waiting behind it; after 5 attempts it is dead and its order stops, its request pending, until
 * `npx pgcoord queue` retries or skips it. Other orders go on.
 */
export function startConsumer(sql: postgres.Sql, options: { concurrency?: number; claimTtlMs?: number } = {}): Worker {
  return work<RefundJob>(sql, QUEUE, (job) => decideRefund(sql, job), {
    concurrency: 4,
    ...options,
    onError: (err, job) => console.error(`refund job ${job?.id ?? '-'}:`, err),
  });
}

function problem(res: Response, status: number, detail: string): void {
  res.status(status).type('application/problem+json').json({ type: 'about:blank', title: STATUS_CODES[status], status, detail });
}

const INT_MAX = 2_147_483_647; // what an int column holds
const isPositiveInt = (n: unknown): n is number => Number.isSafeInteger(n) && (n as number) >= 1 && (n as number) <= INT_MAX;
/** Text a person typed: 1 to 100 characters, no control characters (NUL included), no lone surrogates. */
const isText = (s: unknown): s is string => typeof s === 'string' && s.length >= 1 && s.length <= 100 && !/\p{Cc}|\p{Cs}/u.test(s);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function createApi(sql: postgres.Sql): Express {
  const app = express();
  app.use(express.json({ limit: '8kb' }));

  app.post('/orders/:orderId/refunds', async (req, res) => {
    if (!req.is('application/json')) return problem(res, 415, 'send a JSON body (content-type: application/json)');
    const body: unknown = req.body;
    if (typeof body !== 'object' || body === null || Array.isArray(body))
      return problem(res, 400, 'the body must be a JSON object: {"amount": <cents>, "requester": "..."}');
    const { amount, requester } = body as { amount?: unknown; requester?: unknown };
    if (!isPositiveInt(amount))
      return problem(res, 400, `amount must be a whole number of cents from 1 to ${INT_MAX}, got ${JSON.stringify(amount)}`);
    if (!isText(requester)) return problem(res, 400, 'requester must be a string of 1 to 100 characters without control characters');
    const orderId = /^\d{1,10}$/.test(req.params.orderId) ? Number(req.params.orderId) : 0;
    const id = isPositiveInt(orderId) ? await requestRefund(sql, orderId, amount, requester) : undefined;
    if (!id) return problem(res, 404, `there is no order ${JSON.stringify(req.params.orderId)}`);
    res
      .status(202)
      .location(`/refunds/${id}`)
      .json({ id, status: 'pending', statusUrl: `/refunds/${id}` });
  });

  app.get('/refunds/:requestId', async (req, res) => {
    const { requestId } = req.params;
    const [r] = UUID.test(requestId) ? await sql`select * from refund_requests where id = ${requestId}` : [];
    if (!r) return problem(res, 404, `there is no refund request ${JSON.stringify(requestId)}`);
    if (r.status === 'pending') res.set('retry-after', '1'); // poll again in a second
    const { id, order_id: orderId, amount_cents: amount, requester, status, reason, decided_at: decidedAt } = r;
    res.json({ id, orderId, amount, requester, status, reason, decidedAt });
  });

  // for load balancers (and the demo's test, which finds each instance's pid here)
  app.get('/health', (_req, res) => {
    res.json({ ok: true, pid: process.pid });
  });
  app.use((req, res) => problem(res, 404, `no route for ${req.method} ${req.path}`));
  // A body that is not JSON or too large, a path that does not decode: body-parser's and the
  // router's 4xx. Anything else (the database away) is a 500 that tells nothing of the inside.
  const onError: ErrorRequestHandler = (err, _req, res, _next) => {
    const status = Number.isInteger(err?.status) && err.status >= 400 && err.status < 500 ? err.status : 500;
    if (status === 500) console.error(err);
    problem(res, status, status === 500 ? 'try again later' : String(err.message));
  };
  app.use(onError);
  return app;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const role = process.argv[2] ?? 'both';
  if (!['api', 'consumer', 'both'].includes(role)) throw new Error(`usage: refund-consumer.ts [api|consumer|both], got ${role}`);
  // more connections than the consumer's concurrency: its claim renewals and the API need some too
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres', { max: 10, onnotice: () => {} });
  await setUp(sql);
  // how long an order stays with a consumer that died before another takes it over
  const claimTtlMs = Number(process.env.CLAIM_TTL_MS ?? 15_000);
  const consumer = role === 'api' ? undefined : startConsumer(sql, { claimTtlMs });
  const server = role === 'consumer' ? undefined : createApi(sql).listen(Number(process.env.PORT ?? 3000));
  console.error(`refunds ${role}, pid ${process.pid}${server ? `, port ${process.env.PORT ?? 3000}` : ''}`);
  await new Promise((resolve) => process.once('SIGTERM', resolve).once('SIGINT', resolve));
  // stop taking requests and jobs; running jobs finish and their orders are released
  await Promise.all([server && new Promise((resolve) => server.close(resolve).closeIdleConnections()), consumer?.stop()]);
  await sql.end({ timeout: 5 });
  process.stdout.write(`${JSON.stringify({ pid: process.pid, role, stopped: true })}\n`);
}
