// pgcoord's advisory-lock refund: `withLock` on the order id (a number key: the int8 key space,
// the same `pg_advisory_xact_lock($1::int8)` as the hand-written versions), in its two shapes.
import { withLock } from '../../src/index.js';
import { ADD_REFUND, SELECT_ORDER } from '../sql.js';
import { order, PREPARED } from './reserved.js';
import { fits, type Strategy } from './types.js';

/**
 * `withLock(sql, orderId, { read, write })`: the read rides behind the lock, the write with COMMIT:
 * [BEGIN + lock + SELECT], gateway, [UPDATE + COMMIT] = 2 round trips, the best hand-written shape.
 */
export const pgcoordAdvisory: Strategy = {
  id: 'advisory/pgcoord',
  family: 'advisory',
  impl: 'pgcoord',
  label: 'pgcoord withLock (read/write plan)',
  expectCorrect: true,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    let outcome: 'refunded' | 'rejected' = 'rejected';
    await withLock(sql, req.orderId, {
      read: (tx) => tx.unsafe(SELECT_ORDER, [req.orderId], PREPARED),
      write: async (tx, rows) => {
        if (!fits(order(rows), req.amount)) return [];
        await gateway.pay(req);
        outcome = 'refunded';
        return [tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED)];
      },
    });
    return outcome;
  },
};

/** `withLock(sql, orderId, tx => read, check, gateway, write)`: [BEGIN + lock], SELECT, UPDATE, COMMIT. */
export const pgcoordAdvisoryCallback: Strategy = {
  id: 'advisory/pgcoord-callback',
  family: 'advisory',
  impl: 'pgcoord',
  label: 'pgcoord withLock (callback)',
  expectCorrect: true,
  dedupes: false,
  refund: ({ sql, gateway }, req) =>
    withLock(sql, req.orderId, async (tx) => {
      const o = order(await tx.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return 'rejected' as const;
      await gateway.pay(req);
      await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      return 'refunded' as const;
    }),
};
