// pgcoord's overhead, measured so that a few percent can be told from noise. One short run of each
// strategy tells little on a shared 2-core machine: consecutive runs of the *same* code differ by
// 10-30 % (fsync latency, the other tenants, JIT state). So each pgcoord strategy runs against its
// hand-written twin (the same statements in the same round trips) in many short alternating runs
// (A B, B A, A B, ...), and the figure is the median of the per-pair ratios, with its quartiles.
// Noise that is slower than a pair cancels out; the quartiles say how much is left.
import type { Redis } from 'ioredis';
import type { CountedSql } from './db.js';
import { drive } from './driver.js';
import type { Strategy } from './strategies/types.js';
import type { Workload } from './workload.js';

/** pgcoord strategy → its hand-written twin of the same SQL and round trips. */
export const OVERHEAD_PAIRS: readonly (readonly [pgcoord: string, twin: string])[] = [
  ['advisory/pgcoord', 'advisory/best'],
  ['advisory/pgcoord-callback', 'advisory/same'],
  ['for-update/pgcoord', 'for-update/same'],
  ['guarded/pgcoord', 'guarded/same'],
  ['optimistic/pgcoord', 'optimistic/same'],
  ['idempotency/pgcoord-one', 'idempotency/same'],
];

/**
 * pgcoord strategy → the hand-written strategy it must keep up with, measured the same way
 * (interleaved) but sending other SQL by design, so not a twin (test/bench-twins.test.ts checks
 * only the pairs above). pgcoord's one-statement idempotent refund stores what the hand-written
 * key does not: the scope, the request's fingerprint (a reused key with another request is a 422,
 * not a silent replay), the outcome (a replay is answered from it in the same statement, where
 * the hand-written key needs a second one), a retention time (purge, reuse after expiry), in
 * pgcoord's idempotency table; and it takes over expired or abandoned keys.
 */
export const VERSUS_PAIRS: readonly (readonly [pgcoord: string, handWritten: string])[] = [
  ['idempotency/pgcoord-one', 'idempotency/plain'],
];

/**
 * The noise control: the first pair's twin against itself, interleaved the same way. Its median
 * would be 1.00× on a quiet machine; how far it strays says how far the pairs above can be trusted.
 */
export const NOISE_CONTROL = 'advisory/best';

/** The interleaved comparison of one pair at one contention level. */
export interface Overhead {
  /** The A/A noise control (a strategy against itself), not a pgcoord comparison. */
  control?: boolean;
  /** Against a hand-written strategy of other SQL ({@link VERSUS_PAIRS}), not a same-SQL twin. */
  versus?: boolean;
  pgcoord: string;
  twin: string;
  label: string;
  orders: number;
  pairs: number;
  /** Median of (pgcoord refunds/s ÷ twin refunds/s) over the pairs. */
  median: number;
  q1: number;
  q3: number;
  /** Median client CPU (user + system) per answered request, µs. */
  cpuUs: { pgcoord: number; twin: number };
  /** Both sides stayed correct in every run (no over-refund, nothing acknowledged and lost). */
  correct: boolean;
}

/** Unmeasured runs of each side before the pairs. */
const WARM_RUNS = 3;

const quantile = (xs: readonly number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))] ?? Number.NaN;
};

/**
 * Run `pairs` alternating pairs of `pgcoord` and `twin` on `work` (its requests cut to `requests`
 * per run), after unmeasured runs of each: V8 keeps compiling (and recompiling, as type feedback
 * settles) the hot path for a few thousand requests, on a background thread whose CPU would land in
 * whichever side runs meanwhile; pgcoord's hot path, being larger, takes longer to settle.
 */
export async function interleaved(
  pgcoord: Strategy,
  twin: Strategy,
  work: Workload,
  opts: { pool: CountedSql; redis?: Redis; maxAttempts: number; pairs: number; requests: number },
): Promise<Overhead> {
  const short: Workload = { ...work, requests: work.requests.slice(0, opts.requests) };
  const run = async (s: Strategy) => {
    const cpu0 = process.cpuUsage();
    const r = await drive(s, short, opts);
    const cpu = process.cpuUsage(cpu0);
    return { r, cpuUs: (cpu.user + cpu.system) / Math.max(1, r.completed + r.failed) };
  };
  for (let i = 0; i < WARM_RUNS; i++) {
    await run(pgcoord);
    await run(twin);
  }
  const ratios: number[] = [];
  const cpu = { pgcoord: [] as number[], twin: [] as number[] };
  let correct = true;
  for (let i = 0; i < opts.pairs; i++) {
    const first = i % 2 === 0 ? pgcoord : twin;
    const a = await run(first);
    const b = await run(first === pgcoord ? twin : pgcoord);
    const [p, t] = first === pgcoord ? [a, b] : [b, a];
    correct &&= p.r.verdict !== 'WRONG' && t.r.verdict !== 'WRONG' && p.r.failed === 0 && t.r.failed === 0;
    ratios.push(p.r.refundsPerSec / t.r.refundsPerSec);
    cpu.pgcoord.push(p.cpuUs);
    cpu.twin.push(t.cpuUs);
  }
  return {
    ...(pgcoord === twin ? { control: true } : {}),
    pgcoord: pgcoord.id,
    twin: twin.id,
    label: pgcoord === twin ? `noise control: ${twin.label} / itself` : `${pgcoord.label} / ${twin.label}`,
    orders: work.scenario.orders,
    pairs: opts.pairs,
    median: quantile(ratios, 0.5),
    q1: quantile(ratios, 0.25),
    q3: quantile(ratios, 0.75),
    cpuUs: { pgcoord: quantile(cpu.pgcoord, 0.5), twin: quantile(cpu.twin, 0.5) },
    correct,
  };
}
