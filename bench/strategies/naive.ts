// The negative control: read, check, write, with nothing stopping two clients from reading the
// same value. It must over-refund under contention.
import { NAIVE_WRITE, SELECT_ORDER } from '../sql.js';
import { order, PREPARED } from './reserved.js';
import { fits, type Strategy } from './types.js';

/** Read-check-write in two autocommit statements, no lock (WRONG on purpose). */
export const naive: Strategy = {
  id: 'naive/plain',
  family: 'naive',
  impl: 'plain',
  label: 'naive read-check-write',
  expectCorrect: false,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    const o = order(await sql.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
    if (!fits(o, req.amount)) return 'rejected';
    await gateway.pay(req);
    await sql.unsafe(NAIVE_WRITE, [req.orderId, req.amount, req.requestId, o.refunded + req.amount], PREPARED);
    return 'refunded';
  },
};
