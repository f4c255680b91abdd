// pgcoord's advisory-lock refund: `withLock` on the order id (a number key: the int8 key space,
// the same `pg_advisory_xact_lock($1::int8)` as the hand-written versions).
import { withLock } from '../../src/index.js';
import { ADD_REFUND, SELECT_ORDER } from '../sql.js';
import { order, PREPARED } from './reserved.js';
import { fits, type Strategy } from './types.js';

/** `withLock(sql, orderId, tx => read, check, gateway, write)`: [BEGIN + lock], SELECT, UPDATE, COMMIT. */
export const pgcoordAdvisory: Strategy = {
  id: 'advisory/pgcoord',
  family: 'advisory',
  impl: 'pgcoord',
  label: 'pgcoord withLock',
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
