// The keyed-queue benchmark runs all three systems side by side in a tiny mode; no timing is
// asserted, only that every system ran, that pgcoord drained every job, and that the order checker
// counted no violation for pgcoord.
import { describe, expect, it } from 'vitest';
import { formatQueueBench, runQueueBench } from '../bench/queue.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(1);

describe('bench/queue.ts', () => {
  it('measures pgcoord, graphile-worker and pg-boss side by side; pgcoord keeps every key in order', async () => {
    const r = await runQueueBench(db.url, {
      quick: true,
      keys: [1, 20],
      jobs: 60,
      jobsOneKey: 30,
      minPerKey: 3,
      concurrency: 4,
      rate: 40,
      steadySeconds: 0.5,
      backlogTimeoutMs: 10_000,
      steadyTimeoutMs: 10_000,
      graphilePollMs: 100, // its default 2 s would stall the one-key backlog (see bench/queue-systems.ts)
      notifySeconds: 0.2,
      notifyRounds: 1,
    });
    expect(r.cases).toHaveLength(6);
    for (const c of r.cases) expect(c.backlog.check.started, `${c.system} at ${c.keys} keys`).toBeGreaterThan(0);
    for (const c of r.cases.filter((x) => x.system === 'pgcoord')) {
      expect(c.backlog.drained).toBe(true);
      expect(c.steady.drained).toBe(true);
      expect(c.backlog.check.distinct).toBe(c.backlog.jobs);
      expect(c.steady.check.distinct).toBe(c.steady.jobs);
      expect(c.backlog.check.violations + c.steady.check.violations).toBe(0);
      expect(c.backlog.perJob?.complete).toBeGreaterThan(0);
    }
    expect(r.notify?.newKeyNotify).toBeGreaterThan(0);
    expect(r.notify?.notifiesPerEnqueue).toBeGreaterThan(0.9);
    expect(formatQueueBench(r)).toContain('vs graphile-worker');
  }, 180_000);
});
