// Runs one strategy over one workload: `clients` concurrent loops pull requests from the shared
// stream until it is exhausted or the time cap passes, each answer timed into an HdrHistogram.
import { performance } from 'node:perf_hooks';
import type { Redis } from 'ioredis';
import { type CountedSql, countedSql, openConnections } from './db.js';
import { type StrategyResult, verdictOf } from './result.js';
import { histogram, latency } from './stats.js';
import type { Strategy, StrategyContext } from './strategies/types.js';
import { audit, Gateway, type RefundRequest, resetTables, type Workload } from './workload.js';

/** What the driver needs from the run. */
export interface DriveOptions {
  /** A counted pool of `clients` connections, opened (see {@link openPool}), shared by the strategies of a level. */
  pool: CountedSql;
  redis?: Redis;
  maxAttempts: number;
}

function errorKey(err: unknown): string {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && code.length > 0) return code;
  }
  return err instanceof Error ? err.name : 'unknown';
}

/** How long past its time cap a run waits for requests still in flight before calling them stuck. */
const GRACE_MS = 3000;

async function pump(
  strategy: Strategy,
  ctx: StrategyContext,
  requests: readonly RefundRequest[],
  clients: number,
  deadline: number,
  onAnswer: (req: RefundRequest, outcome: string, us: number) => void,
) {
  let next = 0;
  // A request that never settles (a driver or library bug) must not hang the whole benchmark:
  // past the cap plus a grace period it is counted as an error 'STUCK' and abandoned.
  let timer: NodeJS.Timeout | undefined;
  const stuck = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve('error:STUCK'), Math.max(0, deadline - performance.now()) + GRACE_MS);
  });
  let gaveUp = false;
  const loop = async () => {
    while (!gaveUp && next < requests.length && performance.now() < deadline) {
      const req = requests[next++]!;
      const t0 = performance.now();
      const outcome = await Promise.race([strategy.refund(ctx, req).catch((err: unknown) => `error:${errorKey(err)}`), stuck]);
      if (outcome === 'error:STUCK') gaveUp = true;
      onAnswer(req, outcome, (performance.now() - t0) * 1000);
    }
  };
  try {
    await Promise.all(Array.from({ length: clients }, loop));
  } finally {
    clearTimeout(timer);
  }
}

/** Open a counted pool of `clients` connections, all connected, for {@link drive}. */
export async function openPool(url: string, clients: number): Promise<CountedSql> {
  const pool = countedSql(url, clients);
  await openConnections(pool.sql, clients);
  return pool;
}

/**
 * Run `strategy` on `work`: a warm-up (prepared statements, code paths), fresh tables, then the
 * measured run and its audit. The tables must hold the level's orders (see {@link resetTables}).
 */
export async function drive(strategy: Strategy, work: Workload, opts: DriveOptions): Promise<StrategyResult> {
  const { scenario } = work;
  const { sql, trips } = opts.pool;
  const gateway = new Gateway(scenario.gatewayMs);
  let attempts = 0;
  let redisTrips = 0;
  const ctx: StrategyContext = {
    sql,
    gateway,
    redis: opts.redis,
    maxAttempts: opts.maxAttempts,
    retry: () => void attempts++,
    redisTrip: () => void redisTrips++,
  };
  // the warm-up runs on whatever state the previous strategy left (run.ts fills the tables at the
  // start of each level); the measured run starts from fresh tables
  await pump(strategy, ctx, work.warmup, scenario.clients, performance.now() + 2000, () => {});
  await resetTables(sql, work.totals);
  gateway.reset();
  attempts = 0;
  redisTrips = 0;
  trips.count = 0;

  const h = histogram();
  const acked = new Set<string>();
  const errors: Record<string, number> = {};
  const counts = { refunds: 0, rejected: 0, replays: 0, failed: 0 };
  const t0 = performance.now();
  // the negative control gets a longer cap: it must reach the orders' exhaustion to show its over-refund
  const cap = scenario.maxSeconds * (strategy.expectCorrect ? 1 : 3);
  await pump(strategy, ctx, work.requests, scenario.clients, t0 + cap * 1000, (req, outcome, us) => {
    attempts++;
    if (outcome.startsWith('error:')) {
      const key = outcome.slice(6);
      errors[key] = (errors[key] ?? 0) + 1;
      counts.failed++;
      return;
    }
    h.recordValue(Math.max(1, Math.round(us)));
    if (outcome === 'refunded') {
      counts.refunds++;
      acked.add(req.requestId);
    } else if (outcome === 'rejected') counts.rejected++;
    else {
      counts.replays++;
      if (outcome === 'replayed-refunded') acked.add(req.requestId);
    }
  });
  const seconds = (performance.now() - t0) / 1000;
  const pgTrips = trips.count;
  const checked = await audit(sql, work.totals, gateway, acked);
  const completed = counts.refunds + counts.rejected + counts.replays;
  const answered = Math.max(1, completed + counts.failed);
  return {
    id: strategy.id,
    family: strategy.family,
    impl: strategy.impl,
    label: strategy.label,
    orders: scenario.orders,
    verdict: verdictOf(checked),
    expectCorrect: strategy.expectCorrect,
    dedupes: strategy.dedupes,
    completed,
    ...counts,
    seconds,
    refundsPerSec: counts.refunds / seconds,
    latency: latency(h),
    attemptsPerSuccess: completed ? attempts / completed : 0,
    roundTripsPerRequest: pgTrips / answered,
    ...(strategy.needsRedis ? { redisTripsPerRequest: redisTrips / answered } : {}),
    errors,
    audit: checked,
  };
}
