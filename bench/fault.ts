// The fault scenario: the lock holder pauses (a GC pause, a stalled VM) longer than the Redis
// lock's TTL. Redis expires the lock on its timer and lets a second holder in while the first one
// is still inside its critical section, so both refund the full order. pgcoord's lock is
// transaction-scoped: it is held by the holder's open transaction, not by a timer, so the second
// holder waits however long the pause lasts, then sees the first refund and refuses.
//
// The same pause done right with a timer-based lock: a pgcoord lease. The lease does expire like
// the Redis lock (the second holder takes over during the pause), but each term has a fencing
// token, and the holder's write runs in a transaction whose first statement is
// `pgcoord.check_fence(name, fence)` (withFence). When the first holder wakes and writes with its
// old fence, Postgres refuses the transaction (SQLSTATE PGF01, LeaseLostError) before anything is
// paid or written: the order is refunded once.
//
// The pause is an `await sleep()` in the holder's async flow, not a blocking loop: the second
// holder runs in the same process and must keep running, as it would in another instance.
import type { Redis } from 'ioredis';
import type postgres from 'postgres';
import { sqlState } from '../src/errors.js';
import { withLock } from '../src/index.js';
import { LeaseLostError } from '../src/lease/errors.js';
import { acquireLease, withFence } from '../src/lease/lease.js';
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
  /** Lease only: what became of the paused holder's fenced write. */
  staleWrite?: StaleWrite;
  verdict: 'OK' | 'WRONG';
}

/** The paused lease holder's write, sent with its old fence after the takeover. */
export interface StaleWrite {
  /** Postgres refused the transaction (nothing paid, nothing written). */
  refused: boolean;
  /** What the holder got: the error's name and its SQLSTATE, e.g. `LeaseLostError (SQLSTATE PGF01)`; `committed` if it went through. */
  outcome: string;
  /** The paused holder's fence (a string: JSON has no bigint). */
  fence: string;
  /** The fence of the holder that took over and refunded (undefined if none did). */
  takeoverFence?: string;
  /** Why the paused holder's own `lease.signal` had fired by the time it woke ('' if it had not). */
  localSignal: string;
}

/** The scenario's figures. */
export interface FaultResult {
  /** TTL of the Redis lock and of the lease. */
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

  // The lease: the same TTL as the Redis lock, taken per order. The first holder's renewal is off:
  // a paused process renews nothing (a GC pause or a stalled VM stops its timers too). Its lease
  // lapses locally (its signal fires, and pgcoord ends the term on the server), the second holder
  // takes over with a newer fence, refunds with a fenced write, and the first holder wakes and
  // writes with its old fence. The write carries the fence alone, not the lease's signal: a frozen
  // process's first act on waking may be that write, before its timers have run, so the database's
  // check is what has to stop it (with the signal, withFence would refuse before sending).
  const leaseName = (orderId: number) => `bench:order:${orderId}`;
  const fences: string[] = [];
  let stale: StaleWrite | undefined;
  await measure('pgcoord lease + withFence (fenced write)', async (req, pause, gateway) => {
    const lease = await acquireLease(sql, leaseName(req.orderId), {
      ttlMs,
      timeoutMs: 10_000,
      holder: req.requestId,
      ...(pause > 0 ? { renewEveryMs: false } : {}),
    });
    try {
      const o = order(await sql.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return;
      await sleep(pause);
      const woke = lease.signal.aborted ? ((lease.signal.reason as LeaseLostError | undefined)?.reason ?? 'aborted') : '';
      try {
        await withFence(sql, { name: lease.name, fence: lease.fence }, async (tx: postgres.TransactionSql) => {
          await gateway.pay(req);
          await tx.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
        });
        fences.push(String(lease.fence));
        if (pause > 0) stale = { refused: false, outcome: 'committed', fence: String(lease.fence), localSignal: woke };
      } catch (err) {
        if (pause === 0) throw err;
        const state = sqlState(err);
        stale = {
          refused: err instanceof LeaseLostError,
          // the class's name: a LeaseLostError's `name` is the lease's name
          outcome: `${err instanceof Error ? err.constructor.name : String(err)}${state ? ` (SQLSTATE ${state})` : ''}`,
          fence: String(lease.fence),
          localSignal: woke,
        };
      }
    } finally {
      await lease.release().catch(noop);
    }
  });
  if (stale) {
    const takeover = fences.find((f) => f !== stale?.fence);
    if (takeover) stale.takeoverFence = takeover;
    outcomes[outcomes.length - 1]!.staleWrite = stale;
  }
  return { ttlMs, pauseMs, orderTotal: TOTAL, outcomes, ...(note ? { note } : {}) };
}

/** The note column of a fault outcome, for the terminal and HTML reports. */
export function faultNote(o: FaultOutcome): string {
  if (o.lostLockNoticedAtRelease) return 'holder learned it had lost the lock only at release';
  const w = o.staleWrite;
  if (!w) return '';
  const by = w.takeoverFence ? `after the takeover with fence ${w.takeoverFence}` : 'after its term ended';
  return w.refused
    ? `paused holder's write with fence ${w.fence} refused by Postgres ${by}: ${w.outcome}`
    : `paused holder's write with fence ${w.fence} was NOT refused (${w.outcome})`;
}
