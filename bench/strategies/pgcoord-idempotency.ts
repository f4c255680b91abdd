// pgcoord's idempotency keys in their two fast shapes, next to the hand-written key
// (idempotency.ts) and `idempotent` with a callback (pgcoord-others.ts).

import { idempotent } from '../../src/idempotency/index.js';
import { guardedUpdate } from '../../src/index.js';
import { ADD_REFUND, SELECT_ORDER_FOR_UPDATE } from '../sql.js';
import { order, PREPARED } from './reserved.js';
import { fits, type Strategy } from './types.js';

const base = { family: 'idempotency', impl: 'pgcoord', expectCorrect: true, dedupes: true } as const;

/**
 * `guardedUpdate` with an idempotency key: the key's claim, the guarded refund, the refund record
 * and the stored outcome in one autocommit statement (a replay: one statement too, writing
 * nothing); the gateway after, as the hand-written key does.
 */
export const pgcoordIdempotencyOne: Strategy = {
  ...base,
  id: 'idempotency/pgcoord-one',
  label: 'pgcoord guardedUpdate + idempotency key (one statement)',
  async refund({ sql, gateway }, req) {
    const r = await guardedUpdate(
      sql,
      {
        table: 'orders',
        key: { id: req.orderId },
        set: 'refunded = refunded + $1',
        guard: 'refunded + $1 <= total',
        params: [req.amount],
        insert: { into: 'refunds', values: { request_id: req.requestId, amount: req.amount }, fromRow: { order_id: 'id' } },
      },
      { idempotency: { unscoped: true, key: req.requestId, request: { orderId: req.orderId, amount: req.amount } } },
    );
    if (r.replayed) return r.status === 'applied' ? 'replayed-refunded' : 'replayed-rejected';
    if (r.status !== 'applied') return 'rejected';
    await gateway.pay(req);
    return 'refunded';
  },
};

/**
 * `idempotent` with a `{ read, write }` plan: [BEGIN, claim, read FOR UPDATE], then the gateway
 * (under the order's row lock and the uncommitted claim), then [stored result, refund, COMMIT]:
 * two round trips, as many as the same read and write without the key (`withRowLock`'s plan).
 */
export const pgcoordIdempotencyPlan: Strategy = {
  ...base,
  id: 'idempotency/pgcoord-plan',
  label: 'pgcoord idempotent (read/write plan)',
  async refund({ sql, gateway }, req) {
    const { value, replayed } = await idempotent(
      sql,
      { unscoped: true, key: req.requestId, request: { orderId: req.orderId, amount: req.amount } },
      {
        read: (tx) => tx.unsafe(SELECT_ORDER_FOR_UPDATE, [req.orderId], PREPARED),
        write: async (tx, rows) => {
          if (!fits(order(rows), req.amount)) return { value: { done: false } };
          await gateway.pay(req);
          return { value: { done: true }, writes: [tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED)] };
        },
      },
    );
    if (replayed) return value.done ? 'replayed-refunded' : 'replayed-rejected';
    return value.done ? 'refunded' : 'rejected';
  },
};
