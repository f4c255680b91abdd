// Optimistic concurrency: read the version, check, write only if the version is unchanged; on a
// conflict read again. The conditional write commits the refund, then the gateway pays it: the
// gateway call cannot sit inside a loop that may run again.
import { OPTIMISTIC_REFUND, SELECT_ORDER_VERSION } from '../sql.js';
import { order, PREPARED } from './reserved.js';
import { fits, type Strategy } from './types.js';

/** Two autocommit statements per attempt (read, conditional write); retried on a version conflict. */
export const optimistic: Strategy = {
  id: 'optimistic/plain',
  family: 'optimistic',
  impl: 'plain',
  label: 'optimistic version + retry',
  expectCorrect: true,
  dedupes: false,
  async refund(ctx, req) {
    for (let attempt = 1; ; attempt++) {
      const o = order(await ctx.sql.unsafe(SELECT_ORDER_VERSION, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return 'rejected';
      const rows = await ctx.sql.unsafe(OPTIMISTIC_REFUND, [req.orderId, req.amount, req.requestId, o.version ?? 0], PREPARED);
      if (rows.length === 1) {
        await ctx.gateway.pay(req);
        return 'refunded';
      }
      if (attempt >= ctx.maxAttempts) throw Object.assign(new Error('optimistic: too many version conflicts'), { code: 'RETRY' });
      ctx.retry();
    }
  },
};
