// Guarded atomic UPDATE: the check lives in the WHERE clause of the write, so no lock is held
// across the gateway call. The money is reserved (committed) first, then paid out.
import { GUARDED_REFUND } from '../sql.js';
import { PREPARED } from './reserved.js';
import type { Strategy } from './types.js';

/** One autocommit statement: `update ... where refunded + amount <= total`, then the gateway. */
export const guarded: Strategy = {
  id: 'guarded/plain',
  family: 'guarded',
  impl: 'plain',
  label: 'guarded UPDATE',
  expectCorrect: true,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    const rows = await sql.unsafe(GUARDED_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
    if (rows.length === 0) return 'rejected';
    await gateway.pay(req);
    return 'refunded';
  },
};
