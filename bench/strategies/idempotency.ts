// Idempotency key: the request id is inserted into a unique table in the same autocommit
// statement that takes the money, so a duplicate delivery (a client retrying) finds the key and
// neither takes the money nor calls the gateway again; it is answered from the first delivery.
import { IDEMPOTENT_REFUND, REPLAY_OUTCOME } from '../sql.js';
import { PREPARED } from './reserved.js';
import type { Strategy } from './types.js';

/** First delivery: 1 round trip (key + guarded refund). Replay: 1 more to read the first answer. */
export const idempotency: Strategy = {
  id: 'idempotency/plain',
  family: 'idempotency',
  impl: 'plain',
  label: 'idempotency key + guarded UPDATE',
  expectCorrect: true,
  dedupes: true,
  async refund({ sql, gateway }, req) {
    const [row] = await sql.unsafe<{ fresh: number; done: number }[]>(
      IDEMPOTENT_REFUND,
      [req.orderId, req.amount, req.requestId],
      PREPARED,
    );
    if (row?.fresh === 1) {
      if (row.done !== 1) return 'rejected';
      await gateway.pay(req);
      return 'refunded';
    }
    const [replay] = await sql.unsafe<{ done: boolean }[]>(REPLAY_OUTCOME, [req.requestId], PREPARED);
    return replay?.done ? 'replayed-refunded' : 'replayed-rejected';
  },
};
