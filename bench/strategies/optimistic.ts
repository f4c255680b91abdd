// Optimistic concurrency: read the version, check, write only if the version is unchanged; on a
// conflict read again. The conditional write commits the refund, then the gateway pays it: the
// gateway call cannot sit inside a loop that may run again.
import { OPTIMISTIC_REFUND, SELECT_ORDER_VERSION } from '../sql.js';
import type { RefundRequest } from '../workload.js';
import { order, PREPARED } from './reserved.js';
import { fits, type OrderRow, type Strategy, type StrategyContext } from './types.js';

/**
 * The optimistic loop of the hand-written strategies: read the order with its version, check,
 * conditional `write` (one row back = applied, then the gateway pays). On a conflict: `onConflict`
 * (what else the shape sends), the attempt cap, then `backoff` before the next attempt.
 */
export async function optimisticRefund(
  ctx: StrategyContext,
  req: RefundRequest,
  shape: {
    write: (o: OrderRow) => Promise<readonly unknown[]>;
    onConflict?: () => Promise<unknown>;
    backoff?: (attempt: number) => Promise<unknown>;
  },
): Promise<'refunded' | 'rejected'> {
  for (let attempt = 1; ; attempt++) {
    const o = order(await ctx.sql.unsafe(SELECT_ORDER_VERSION, [req.orderId], PREPARED));
    if (!fits(o, req.amount)) return 'rejected';
    if ((await shape.write(o)).length === 1) {
      await ctx.gateway.pay(req);
      return 'refunded';
    }
    await shape.onConflict?.();
    if (attempt >= ctx.maxAttempts) throw Object.assign(new Error('optimistic: too many version conflicts'), { code: 'RETRY' });
    ctx.retry();
    await shape.backoff?.(attempt);
  }
}

/** Two autocommit statements per attempt (read, conditional write); retried on a version conflict. */
export const optimistic: Strategy = {
  id: 'optimistic/plain',
  family: 'optimistic',
  impl: 'plain',
  label: 'optimistic version + retry',
  expectCorrect: true,
  dedupes: false,
  refund: (ctx, req) =>
    optimisticRefund(ctx, req, {
      write: (o) => ctx.sql.unsafe(OPTIMISTIC_REFUND, [req.orderId, req.amount, req.requestId, o.version ?? 0], PREPARED),
    }),
};
