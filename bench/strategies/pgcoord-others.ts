// pgcoord's other strategies, written the way its README tells users to, with the same reads,
// checks and refund records as the hand-written versions.

import { idempotent } from '../../src/idempotency/index.js';
import { guardedUpdate, retry, transactionWithRetry, updateVersioned, withRowLock } from '../../src/index.js';
import { ADD_REFUND, GUARDED_REFUND, SELECT_ORDER, SELECT_ORDER_VERSION } from '../sql.js';
import type { RefundRequest } from '../workload.js';
import { order, PREPARED } from './reserved.js';
import { fits, type OrderRow, type Strategy } from './types.js';

const base = { impl: 'pgcoord', expectCorrect: true, dedupes: false } as const;

/** The refund record, inserted by pgcoord in the same statement as the update, only when it applies. */
const refundRecord = (req: RefundRequest) => ({
  into: 'refunds',
  values: { request_id: req.requestId, amount: req.amount },
  fromRow: { order_id: 'id' },
});

/** `guardedUpdate` with the refund record as its `insert`: one autocommit statement; the gateway after. */
export const pgcoordGuarded: Strategy = {
  ...base,
  id: 'guarded/pgcoord',
  family: 'guarded',
  label: 'pgcoord guardedUpdate',
  async refund({ sql, gateway }, req) {
    const r = await guardedUpdate(sql, {
      table: 'orders',
      key: { id: req.orderId },
      set: 'refunded = refunded + $1',
      guard: 'refunded + $1 <= total',
      params: [req.amount],
      insert: refundRecord(req),
    });
    if (r.status !== 'applied') return 'rejected';
    await gateway.pay(req);
    return 'refunded';
  },
};

/**
 * `withRowLock` (SELECT ... FOR UPDATE by key) as a write plan: check, gateway, and the write sent
 * with COMMIT: [BEGIN + row lock], [UPDATE + COMMIT] = 2 round trips, the best hand-written shape.
 */
export const pgcoordForUpdate: Strategy = {
  ...base,
  id: 'for-update/pgcoord',
  family: 'for-update',
  label: 'pgcoord withRowLock (write plan)',
  async refund({ sql, gateway }, req) {
    let outcome: 'refunded' | 'rejected' = 'rejected';
    await withRowLock(
      sql,
      { table: 'orders', key: { id: req.orderId } },
      {
        write: async (row: OrderRow, tx) => {
          if (!fits(row, req.amount)) return [];
          await gateway.pay(req);
          outcome = 'refunded';
          return [tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED)];
        },
      },
    );
    return outcome;
  },
};

/**
 * `retry` around read + `updateVersioned` with the refund record as its `insert` (one autocommit
 * statement); the gateway after the refund commits. pgcoord's retry backs off with full jitter
 * (the hand-written one does not).
 */
export const pgcoordOptimistic: Strategy = {
  ...base,
  id: 'optimistic/pgcoord',
  family: 'optimistic',
  label: 'pgcoord updateVersioned + retry',
  async refund(ctx, req) {
    const outcome = await retry(
      async () => {
        const o = order(await ctx.sql.unsafe(SELECT_ORDER_VERSION, [req.orderId], PREPARED));
        if (!fits(o, req.amount)) return 'rejected' as const;
        await updateVersioned(ctx.sql, {
          table: 'orders',
          key: { id: req.orderId },
          set: { refunded: o.refunded + req.amount },
          expected: o.version ?? 0,
          insert: refundRecord(req),
        });
        return 'refunded' as const;
      },
      { attempts: ctx.maxAttempts, onRetry: () => ctx.retry() },
    );
    if (outcome === 'refunded') await ctx.gateway.pay(req);
    return outcome;
  },
};

/** `transactionWithRetry` (SERIALIZABLE by default): read, check, write; the gateway after COMMIT. */
export const pgcoordSerializable: Strategy = {
  ...base,
  id: 'serializable/pgcoord',
  family: 'serializable',
  label: 'pgcoord transactionWithRetry',
  async refund(ctx, req) {
    const outcome = await transactionWithRetry(
      ctx.sql,
      async (tx) => {
        const o = order(await tx.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
        if (!fits(o, req.amount)) return 'rejected' as const;
        await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
        return 'refunded' as const;
      },
      { attempts: ctx.maxAttempts, onRetry: () => ctx.retry() },
    );
    if (outcome === 'refunded') await ctx.gateway.pay(req);
    return outcome;
  },
};

/**
 * `idempotent` (transactional mode): the key claim, the guarded refund and the stored result
 * commit together; a duplicate delivery waits for the first and gets its stored result. The
 * gateway is paid inside the handler, after the refund is taken, before the result is stored.
 */
export const pgcoordIdempotency: Strategy = {
  ...base,
  id: 'idempotency/pgcoord',
  family: 'idempotency',
  label: 'pgcoord idempotent + guarded UPDATE',
  dedupes: true,
  async refund({ sql, gateway }, req) {
    const { value, replayed } = await idempotent(
      sql,
      { unscoped: true, key: req.requestId, request: { orderId: req.orderId, amount: req.amount } },
      async ({ tx }) => {
        const rows = await tx.unsafe(GUARDED_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
        if (rows.length === 0) return { done: false };
        await gateway.pay(req);
        return { done: true };
      },
    );
    if (replayed) return value.done ? 'replayed-refunded' : 'replayed-rejected';
    return value.done ? 'refunded' : 'rejected';
  },
};
