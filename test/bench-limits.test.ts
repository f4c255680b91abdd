// The limiter benchmark runs and reports both limiters in one run; no timing is asserted, only
// that pgcoord never lets a call over the quota where the client clocks disagree.
import { describe, expect, it } from 'vitest';
import { runLimitBench } from '../bench/limits.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(2);

describe('bench/limits.ts', () => {
  it('measures pgcoord and rate-limiter-flexible side by side; pgcoord is never over quota under skew', async () => {
    const r = await runLimitBench(db.url, { seconds: 0.3, clients: 4 });
    for (const v of [r.decisionsPerSecond.hotKey, r.decisionsPerSecond.keys10k]) {
      expect(v.pgcoord).toBeGreaterThan(0);
      expect(v.rlf).toBeGreaterThan(0);
    }
    expect(r.skew.pgcoord.overQuota).toBe(0);
    expect(r.skew.pgcoord.allowed).toBeGreaterThan(0);
    expect(r.skew.rlf.allowed).toBeGreaterThan(0);
  }, 60_000);
});
