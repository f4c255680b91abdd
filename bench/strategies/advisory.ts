// pg_advisory_xact_lock on the order id, hand-written on postgres.js in three shapes. The lock is
// transaction-scoped: it is released by COMMIT/ROLLBACK, never by a timer, so a paused holder
// keeps it (and the check, the gateway call and the write stay one critical section).
import { ADD_REFUND, ADVISORY_LOCK, SELECT_ORDER } from '../sql.js';
import { onReserved, order, PREPARED, pipeline } from './reserved.js';
import { fits, type Strategy } from './types.js';

/** Inside `sql.begin`, one await per statement: BEGIN, lock, SELECT, UPDATE, COMMIT = 5 round trips. */
export const advisoryBegin: Strategy = {
  id: 'advisory/begin',
  family: 'advisory',
  impl: 'begin',
  label: 'advisory, sql.begin',
  expectCorrect: true,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    return (await sql.begin(async (tx) => {
      await tx.unsafe(ADVISORY_LOCK, [req.orderId], PREPARED);
      const o = order(await tx.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return 'rejected';
      await gateway.pay(req);
      await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      return 'refunded';
    })) as 'refunded' | 'rejected';
  },
};

/**
 * pgcoord's callback shape (`withLock(sql, key, async (tx) => ...)`), statement for statement:
 * [BEGIN + lock] issued together, then each statement of the callback, then COMMIT: 4 round trips.
 */
export const advisorySame: Strategy = {
  id: 'advisory/same',
  family: 'advisory',
  impl: 'same',
  label: 'advisory, same shape as pgcoord',
  expectCorrect: true,
  dedupes: false,
  refund: ({ sql, gateway }, req) =>
    onReserved(sql, async (c) => {
      await pipeline(c, [['begin'], [ADVISORY_LOCK, [req.orderId]]]);
      const o = order(await c.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) {
        await c.unsafe('commit');
        return 'rejected';
      }
      await gateway.pay(req);
      await c.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      await c.unsafe('commit');
      return 'refunded';
    }),
};

/**
 * Best shape: [BEGIN + lock + SELECT] then [UPDATE + COMMIT] = 2 round trips. The SELECT queued
 * behind the lock call runs the moment the lock is granted, on the server, with no client hop.
 */
export const advisoryBest: Strategy = {
  id: 'advisory/best',
  family: 'advisory',
  impl: 'best',
  label: 'advisory, pipelined',
  expectCorrect: true,
  dedupes: false,
  refund: ({ sql, gateway }, req) =>
    onReserved(sql, async (c) => {
      const [, , rows] = await pipeline(c, [['begin'], [ADVISORY_LOCK, [req.orderId]], [SELECT_ORDER, [req.orderId]]]);
      const o = order(rows);
      if (!fits(o, req.amount)) {
        await c.unsafe('commit');
        return 'rejected';
      }
      await gateway.pay(req);
      await pipeline(c, [[ADD_REFUND, [req.orderId, req.amount, req.requestId]], ['commit']]);
      return 'refunded';
    }),
};
