// The one order checker every system of the keyed-queue benchmark (bench/queue.ts) is judged by,
// and the latency figures of its steady-state run.
//
// Every job carries (key, seq): seq is assigned by the key's only producer in enqueue order (1, 2,
// 3, … per key), and a producer sends a key's next job only once the previous enqueue of that key
// committed. The handler calls start() as it begins and finish() as it ends, after yielding to the
// event loop at least once, so that another job of the same key, were a system to hand it out
// early, would start while the first is still running and be seen. A start is a violation when
//   - another job of its key is running (two of a key at once), or
//   - its seq is not the one after the last finished job of its key (out of order, a skip, or a
//     job run again after a later one).
// finish() records the seq as the key's last finished job, whatever it was.

/** The payload of every benchmark job, the same for every system. */
export interface BenchPayload {
  /** The key (the system's per-key ordering unit). */
  k: string;
  /** Its producer's sequence number within the key: 1, 2, 3, … in enqueue order. */
  s: number;
  /** performance.now() when the enqueue was sent (same process, same time origin). */
  t: number;
}

/** Percentile of a sorted array (nearest rank); NaN when empty. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}

/** What one phase of one system saw. */
export interface CheckSummary {
  /** Handler starts (a job run twice counts twice). */
  started: number;
  /** Handler ends. */
  finished: number;
  /** Distinct (key, seq) that finished. */
  distinct: number;
  /** Starts that broke the per-key rule (the sum of the two below). */
  violations: number;
  /** Starts while another job of the key was running. */
  overlaps: number;
  /** Starts whose seq was not the key's last finished seq + 1. */
  outOfOrder: number;
  /** Enqueue-to-start latency in ms, when recorded: p50, p99, max. */
  latency?: { p50: number; p99: number; max: number; n: number };
}

/** The order checker and clock of one phase (a backlog run, or a steady-state run). */
export class OrderChecker {
  private readonly running = new Map<string, number>();
  private readonly lastDone = new Map<string, number>();
  private readonly done = new Set<string>();
  private readonly latencies: number[] = [];
  private waiters: { target: number; resolve: () => void }[] = [];
  started = 0;
  finished = 0;
  overlaps = 0;
  outOfOrder = 0;
  /** performance.now() of the first start and the last finish. */
  firstStart = Number.NaN;
  lastFinish = Number.NaN;

  constructor(private readonly recordLatency: boolean) {}

  start(p: BenchPayload): void {
    const now = performance.now();
    if (this.started === 0) this.firstStart = now;
    this.started++;
    if (this.recordLatency) this.latencies.push(now - p.t);
    let bad = false;
    if (this.running.has(p.k)) {
      this.overlaps++;
      bad = true;
    }
    if (p.s !== (this.lastDone.get(p.k) ?? 0) + 1 && !bad) this.outOfOrder++;
    this.running.set(p.k, p.s);
  }

  finish(p: BenchPayload): void {
    this.lastFinish = performance.now();
    this.finished++;
    if (this.running.get(p.k) === p.s) this.running.delete(p.k);
    this.lastDone.set(p.k, p.s);
    this.done.add(`${p.k}\u0000${p.s}`);
    for (const w of this.waiters.filter((x) => this.done.size >= x.target)) w.resolve();
  }

  /** Resolves true once `n` distinct jobs finished, false after `ms`. */
  waitFor(n: number, ms: number): Promise<boolean> {
    if (this.done.size >= n) return Promise.resolve(true);
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        resolve(false);
      }, ms);
      const waiter = {
        target: n,
        resolve: () => {
          clearTimeout(timer);
          this.waiters = this.waiters.filter((w) => w !== waiter);
          resolve(true);
        },
      };
      this.waiters.push(waiter);
    });
  }

  summary(): CheckSummary {
    const s: CheckSummary = {
      started: this.started,
      finished: this.finished,
      distinct: this.done.size,
      violations: this.overlaps + this.outOfOrder,
      overlaps: this.overlaps,
      outOfOrder: this.outOfOrder,
    };
    if (this.recordLatency && this.latencies.length) {
      const sorted = [...this.latencies].sort((a, b) => a - b);
      s.latency = { p50: percentile(sorted, 50), p99: percentile(sorted, 99), max: sorted[sorted.length - 1] as number, n: sorted.length };
    }
    return s;
  }
}

/** The handler every system runs: start, yield to the event loop (or work `workMs`), finish. */
export function benchHandler(current: () => OrderChecker, workMs: number): (p: BenchPayload) => Promise<void> {
  return async (p) => {
    const checker = current();
    checker.start(p);
    await new Promise<void>((resolve) => (workMs > 0 ? setTimeout(resolve, workMs) : setImmediate(resolve)));
    checker.finish(p);
  };
}
