// SELECT ... FOR UPDATE: the row lock is the critical section; the gateway call happens while it
// is held, between the check and the write.
import { ADD_REFUND, SELECT_ORDER_FOR_UPDATE } from '../sql.js';
import { onReserved, order, PREPARED, pipeline } from './reserved.js';
import { fits, type Strategy } from './types.js';

/** Inside `sql.begin`, one await per statement: BEGIN, SELECT FOR UPDATE, UPDATE, COMMIT = 4 round trips. */
export const forUpdateBegin: Strategy = {
  id: 'for-update/begin',
  family: 'for-update',
  impl: 'begin',
  label: 'FOR UPDATE, sql.begin',
  expectCorrect: true,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    return (await sql.begin(async (tx) => {
      const o = order(await tx.unsafe(SELECT_ORDER_FOR_UPDATE, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return 'rejected';
      await gateway.pay(req);
      await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      return 'refunded';
    })) as 'refunded' | 'rejected';
  },
};

/** Best shape: [BEGIN + SELECT FOR UPDATE] then [UPDATE + COMMIT] = 2 round trips. */
export const forUpdateBest: Strategy = {
  id: 'for-update/best',
  family: 'for-update',
  impl: 'best',
  label: 'FOR UPDATE, pipelined',
  expectCorrect: true,
  dedupes: false,
  refund: ({ sql, gateway }, req) =>
    onReserved(sql, async (c) => {
      const [, rows] = await pipeline(c, [['begin'], [SELECT_ORDER_FOR_UPDATE, [req.orderId]]]);
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
