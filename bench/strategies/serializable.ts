// SERIALIZABLE + retry: plain read-check-write, and Postgres aborts (SQLSTATE 40001) whichever
// transaction would make the outcome non-serial; the client runs it again. The gateway is called
// after COMMIT, outside the retried part.
import { ADD_REFUND, SELECT_ORDER } from '../sql.js';
import { onReserved, order, PREPARED, pipeline } from './reserved.js';
import { fits, retryable, type Strategy, type StrategyContext } from './types.js';

async function withRetry(ctx: StrategyContext, attempt: () => Promise<'refunded' | 'rejected'>): Promise<'refunded' | 'rejected'> {
  for (let n = 1; ; n++) {
    try {
      return await attempt();
    } catch (err) {
      if (!retryable(err) || n >= ctx.maxAttempts) throw err;
      ctx.retry();
    }
  }
}

/** `sql.begin('isolation level serializable')`, one await per statement (4 round trips an attempt). */
export const serializableBegin: Strategy = {
  id: 'serializable/begin',
  family: 'serializable',
  impl: 'begin',
  label: 'SERIALIZABLE, sql.begin',
  expectCorrect: true,
  dedupes: false,
  async refund(ctx, req) {
    const outcome = await withRetry(
      ctx,
      async () =>
        (await ctx.sql.begin('isolation level serializable', async (tx) => {
          const o = order(await tx.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
          if (!fits(o, req.amount)) return 'rejected';
          await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
          return 'refunded';
        })) as 'refunded' | 'rejected',
    );
    if (outcome === 'refunded') await ctx.gateway.pay(req);
    return outcome;
  },
};

/** Best shape: [BEGIN SERIALIZABLE + SELECT] then [UPDATE + COMMIT] = 2 round trips an attempt. */
export const serializableBest: Strategy = {
  id: 'serializable/best',
  family: 'serializable',
  impl: 'best',
  label: 'SERIALIZABLE, pipelined',
  expectCorrect: true,
  dedupes: false,
  async refund(ctx, req) {
    const outcome = await withRetry(ctx, () =>
      onReserved(ctx.sql, async (c) => {
        const [, rows] = await pipeline(c, [['begin isolation level serializable'], [SELECT_ORDER, [req.orderId]]]);
        if (!fits(order(rows), req.amount)) {
          await c.unsafe('commit');
          return 'rejected';
        }
        await pipeline(c, [[ADD_REFUND, [req.orderId, req.amount, req.requestId]], ['commit']]);
        return 'refunded';
      }),
    );
    if (outcome === 'refunded') await ctx.gateway.pay(req);
    return outcome;
  },
};
