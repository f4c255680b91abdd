// The refund workload: orders with a total, refunds of random amounts recorded one row per request
// id, and one refund per strategy of pgcoord, each written the way the README tells users to and
// the same on every runner (postgres.js, node-postgres, drizzle on either). Each strategy has
// orders of its own: two strategies on one order would not exclude each other (an advisory lock
// does not stop a guarded UPDATE), and that would be the workload's fault, not pgcoord's.
//
// The refunds table has no unique key on request_id on purpose: a duplicate effect must show up as
// a second row for the checker to find, not as an error that hides it.

import {
  guardedUpdate,
  idempotent,
  isConnectionLost,
  migrateIdempotency,
  migrateLeases,
  retry,
  updateVersioned,
  withFence,
  withLease,
  withLock,
  withRowLock,
} from '../src/index.js';
import { planWrite } from '../test/fixtures/plan-write.js';
import { q } from '../test/query.js';

/** The runners every strategy runs on. */
export const RUNNERS = ['postgres.js', 'pg', 'drizzle-pgjs', 'drizzle-pg'] as const;
export type RunnerName = (typeof RUNNERS)[number];

/** Largest refund amount; amounts are uniform in 1..MAX_AMOUNT. */
export const MAX_AMOUNT = 100;

/** The tables of a run, in their own schema. */
export function schemaSql(schema: string): string {
  return `create schema ${schema};
create table ${schema}.orders (id int primary key, total int not null, refunded int not null default 0, version int not null default 0);
create table ${schema}.refunds (request_id text not null, order_id int not null, amount int not null, strategy text not null);
create index on ${schema}.refunds (request_id);`;
}

/** pgcoord's own tables (idempotency keys, leases), then the run's. */
export async function createTables(admin: object, schema: string): Promise<void> {
  await migrateIdempotency(admin);
  await migrateLeases(admin);
  await q(admin, schemaSql(schema));
}

/** What a strategy call is given. */
export interface Call {
  runner: object;
  schema: string;
  /** Idempotency scope of the run (keys of another run never replay here). */
  scope: string;
  req: string;
  strategyName: string;
  order: number;
  amount: number;
  lockTimeoutMs: number;
  leaseTtlMs: number;
}

/** What the caller learns. */
export interface Answer {
  applied: boolean;
  /** Answered from an idempotency key's stored result. */
  replayed?: boolean;
}

/** A strategy: `keyed` ones carry an idempotency key (the request id), so the same request may be sent again. */
export interface Strategy {
  name: string;
  keyed: boolean;
  refund(c: Call): Promise<Answer>;
}

/**
 * The caller's own statement outside any pgcoord call lost its connection (updateVersioned's read):
 * a known driver loss that pgcoord never saw, so it is not pgcoord's to type. Nothing was written.
 */
export class AppReadLost extends Error {
  readonly code = 'APP_READ_LOST';
}

const fits = (row: Record<string, unknown> | undefined, amount: number) =>
  row !== undefined && Number(row.refunded) + amount <= Number(row.total);

// The statements of a refund; the update and the insert are two statements in the transactional
// strategies, so a transaction torn between them shows up as orders.refunded ≠ sum of its refunds.
const read = (c: Call, lock = '') => `select total, refunded, version from ${c.schema}.orders where id = $1${lock}`;
const update = (c: Call) => `update ${c.schema}.orders set refunded = refunded + $2 where id = $1`;
const insert = (c: Call) => `insert into ${c.schema}.refunds (request_id, order_id, amount, strategy) values ($1, $2, $3, $4)`;
const writeBoth = async (tx: unknown, c: Call) => {
  await q(tx, update(c), [c.order, c.amount]);
  await q(tx, insert(c), [c.req, c.order, c.amount, c.strategyName]);
};
const planBoth = (tx: unknown, c: Call) => [
  planWrite(tx, update(c), [c.order, c.amount]),
  planWrite(tx, insert(c), [c.req, c.order, c.amount, c.strategyName]),
];
const refundRecord = (c: Call) => ({
  into: `${c.schema}.refunds`,
  values: { request_id: c.req, amount: c.amount, strategy: c.strategyName },
  fromRow: { order_id: 'id' },
});
const guarded = (c: Call) => ({
  table: `${c.schema}.orders`,
  key: { id: c.order },
  set: 'refunded = refunded + $1',
  guard: 'refunded + $1 <= total',
  params: [c.amount],
  insert: refundRecord(c),
});
const lockKey = (c: Call) => `chaos:${c.schema}:${c.order}`;

/** Every strategy, in table order. */
export const STRATEGIES: readonly Strategy[] = [
  {
    name: 'withLock',
    keyed: false,
    refund: (c) =>
      withLock(
        c.runner,
        lockKey(c),
        async (tx) => {
          const [o] = await q(tx, read(c), [c.order]);
          if (!fits(o, c.amount)) return { applied: false };
          await writeBoth(tx, c);
          return { applied: true };
        },
        { timeoutMs: c.lockTimeoutMs },
      ),
  },
  {
    name: 'withLock plan',
    keyed: false,
    refund: (c) =>
      withLock(
        c.runner,
        lockKey(c),
        { read: (tx) => q(tx, read(c), [c.order]), write: (tx, [o]) => (fits(o, c.amount) ? planBoth(tx, c) : []) },
        { timeoutMs: c.lockTimeoutMs },
      ).then((r) => ({ applied: r.written.length > 0 })),
  },
  {
    name: 'withRowLock plan',
    keyed: false,
    refund: (c) =>
      withRowLock(
        c.runner,
        { table: `${c.schema}.orders`, key: { id: c.order } },
        { write: (o, tx) => (fits(o, c.amount) ? planBoth(tx, c) : []) },
        { timeoutMs: c.lockTimeoutMs },
      ).then((r) => ({ applied: r.written.length > 0 })),
  },
  {
    name: 'guardedUpdate',
    keyed: false,
    refund: (c) => guardedUpdate(c.runner, guarded(c)).then((r) => ({ applied: r.status === 'applied' })),
  },
  {
    name: 'updateVersioned+retry',
    keyed: false,
    refund: (c) =>
      retry(
        async () => {
          const [o] = await q(c.runner, read(c), [c.order]).catch((err: unknown) => {
            throw isConnectionLost(err) ? new AppReadLost(String((err as Error).message), { cause: err }) : err;
          });
          if (!fits(o, c.amount)) return { applied: false };
          await updateVersioned(c.runner, {
            table: `${c.schema}.orders`,
            key: { id: c.order },
            set: { refunded: Number(o!.refunded) + c.amount },
            expected: Number(o!.version),
            insert: refundRecord(c),
          });
          return { applied: true };
        },
        { attempts: 10 },
      ),
  },
  {
    name: 'lease+withFence',
    keyed: false,
    refund: (c) =>
      withLease(c.runner, lockKey(c), { ttlMs: c.leaseTtlMs, timeoutMs: c.lockTimeoutMs }, (lease) =>
        withFence(c.runner, lease, async (tx) => {
          const [o] = await q(tx, read(c), [c.order]);
          if (!fits(o, c.amount)) return { applied: false };
          await writeBoth(tx, c);
          return { applied: true };
        }),
      ),
  },
  {
    name: 'idempotent',
    keyed: true,
    refund: (c) =>
      idempotent(
        c.runner,
        { scope: c.scope, key: c.req, request: { order: c.order, amount: c.amount }, waitMs: c.lockTimeoutMs },
        async ({ tx }) => {
          const [o] = await q(tx, read(c, ' for update'), [c.order]);
          if (!fits(o, c.amount)) return { applied: false };
          await writeBoth(tx, c);
          return { applied: true };
        },
      ).then((r) => ({ applied: r.value.applied, replayed: r.replayed })),
  },
  {
    name: 'idempotent plan',
    keyed: true,
    refund: (c) =>
      idempotent(
        c.runner,
        { scope: c.scope, key: c.req, request: { order: c.order, amount: c.amount }, waitMs: c.lockTimeoutMs },
        {
          read: (tx) => q(tx, read(c, ' for update'), [c.order]),
          write: (tx, [o]) => (fits(o, c.amount) ? { value: { applied: true }, writes: planBoth(tx, c) } : { value: { applied: false } }),
        },
      ).then((r) => ({ applied: r.value.applied, replayed: r.replayed })),
  },
  {
    name: 'guardedUpdate+key',
    keyed: true,
    refund: (c) =>
      guardedUpdate(c.runner, guarded(c), {
        idempotency: { scope: c.scope, key: c.req, request: { order: c.order, amount: c.amount } },
      }).then((r) => ({ applied: r.status === 'applied', replayed: r.replayed })),
  },
];
