// The fault scenario: the lock holder pauses (a GC pause, a stalled VM) longer than the Redis
// lock's TTL. Redis expires the lock on its timer and lets a second holder in while the first one
// is still inside its critical section, so both refund the full order. pgcoord's lock is
// transaction-scoped: it is held by the holder's open transaction, not by a timer, so the second
// holder waits however long the pause lasts, then sees the first refund and refuses.
//
// The pause is an `await sleep()` in the holder's async flow, not a blocking loop: the second
// holder runs in the same process and must keep running, as it would in another instance.
import type { Redis } from 'ioredis';
import type postgres from 'postgres';
import { withLock } from '../src/index.js';
import { ADD_REFUND, SELECT_ORDER } from './sql.js';
import { acquireRedisLock, redisKey, releaseRedisLock } from './strategies/redis.js';
import { order, PREPARED } from './strategies/reserved.js';
import { fits } from './strategies/types.js';
import { audit, Gateway, type RefundRequest, resetTables } from './workload.js';

/** What one lock did under the pause. */
export interface FaultOutcome {
  lock: string;
  /** Gateway payouts for the order (2 = double refund). */
  payouts: number;
  /** Money paid beyond the order's total. */
  overRefund: number;
  /** The first holder found its lock gone only at release (Redis compare-and-delete returned 0). */
  lostLockNoticedAtRelease?: boolean;
  verdict: 'OK' | 'WRONG';
}

/** The scenario's figures. */
export interface FaultResult {
  ttlMs: number;
  pauseMs: number;
  orderTotal: number;
  outcomes: FaultOutcome[];
  note?: string;
}

const TOTAL = 100;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const noop = () => {};

/** Two refunds of the full order, the first holder pausing `pauseMs` after its check; the second starts 10 ms later. */
export async function faultScenario(sql: postgres.Sql, redis: Redis | undefined, ttlMs = 100, pauseMs = 300): Promise<FaultResult> {
  const totals = new Map([[1, TOTAL]]);
  const reqs: RefundRequest[] = [
    { requestId: 'fault-a', orderId: 1, amount: TOTAL, duplicate: false },
    { requestId: 'fault-b', orderId: 1, amount: TOTAL, duplicate: false },
  ];
  const outcomes: FaultOutcome[] = [];

  const measure = async (lock: string, refund: (req: RefundRequest, pause: number, gw: Gateway) => Promise<unknown>, extra = {}) => {
    await resetTables(sql, totals);
    const gateway = new Gateway(0);
    await Promise.all([refund(reqs[0]!, pauseMs, gateway), sleep(10).then(() => refund(reqs[1]!, 0, gateway))]);
    const a = await audit(sql, totals, gateway, new Set());
    outcomes.push({ lock, payouts: gateway.calls.length, overRefund: a.overRefund, verdict: a.overRefund > 0 ? 'WRONG' : 'OK', ...extra });
  };

  let note: string | undefined;
  if (redis) {
    const ctx = { retry: noop, redisTrip: noop };
    let lost = false;
    await measure('Redis SET NX PX + compare-and-delete', async (req, pause, gateway) => {
      const key = redisKey(req.orderId);
      const token = await acquireRedisLock(ctx, redis, key, ttlMs);
      try {
        const o = order(await sql.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
        if (!fits(o, req.amount)) return;
        await sleep(pause); // the "GC pause", after the check, before paying
        await gateway.pay(req);
        await sql.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      } finally {
        if (!(await releaseRedisLock(ctx, redis, key, token))) lost = true;
      }
    });
    outcomes[outcomes.length - 1]!.lostLockNoticedAtRelease = lost;
  } else note = 'Redis did not answer: only the pgcoord half of the fault scenario ran';

  await measure('pgcoord withLock (transaction-scoped advisory lock)', (req, pause, gateway) =>
    withLock(sql, req.orderId, async (tx) => {
      const o = order(await tx.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return;
      await sleep(pause);
      await gateway.pay(req);
      await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
    }),
  );
  return { ttlMs, pauseMs, orderTotal: TOTAL, outcomes, ...(note ? { note } : {}) };
}
