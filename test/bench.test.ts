// Smoke test of the benchmark: `npm run bench -- --quick` as a child process against the test
// server, asserting the CORRECTNESS columns only (never speed: the machine is shared and noisy).
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, inject, it } from 'vitest';
import type { LeaseBench } from '../bench/lease.js';
import './helpers.js'; // the ProvidedContext typing of inject('databaseUrl')

interface Row {
  id: string;
  family: string;
  orders: number;
  verdict: string;
  expectCorrect: boolean;
  dedupes: boolean;
  completed: number;
  refunds: number;
  errors: Record<string, number>;
  audit: { overRefund: number; duplicateCalls: number; ackedMissing: number };
}

const dir = await mkdtemp(join(tmpdir(), 'pgcoord-bench-test-'));
afterAll(() => rm(dir, { recursive: true, force: true }));

async function quickRun(): Promise<{
  results: Row[];
  overheads: { pgcoord: string; twin: string; pairs: number; median: number; correct: boolean; control?: boolean }[];
  fault?: {
    outcomes: {
      lock: string;
      payouts: number;
      overRefund: number;
      verdict: string;
      staleWrite?: { refused: boolean; outcome: string; fence: string; takeoverFence?: string };
    }[];
  };
  lease?: LeaseBench;
}> {
  const json = join(dir, 'quick.json');
  await promisify(execFile)(process.execPath, ['--import', 'tsx', 'bench/run.ts', '--quick', '--json', json], {
    env: { ...process.env, DATABASE_URL: inject('databaseUrl') },
    maxBuffer: 16 * 1024 * 1024,
    timeout: 170_000,
  });
  return JSON.parse(await readFile(json, 'utf8'));
}

describe('npm run bench -- --quick', () => {
  it('reports every correct strategy correct and the naive control wrong', { timeout: 180_000 }, async () => {
    const { results, overheads, fault, lease } = await quickRun();
    expect(results.length).toBeGreaterThan(10);
    for (const r of results.filter((x) => x.expectCorrect)) {
      // no money beyond totals, nothing acknowledged but missing
      expect({ id: r.id, orders: r.orders, over: r.audit.overRefund }).toEqual({ id: r.id, orders: r.orders, over: 0 });
      expect({ id: r.id, orders: r.orders, missing: r.audit.ackedMissing }).toEqual({ id: r.id, orders: r.orders, missing: 0 });
      expect(r.verdict).not.toBe('WRONG');
    }
    for (const r of results.filter((x) => x.dedupes)) {
      expect({ id: r.id, orders: r.orders, dup: r.audit.duplicateCalls }).toEqual({ id: r.id, orders: r.orders, dup: 0 });
    }
    // the negative control must over-refund on the hot order
    const naiveHot = results.find((r) => r.id === 'naive/plain' && r.orders === 1);
    expect(naiveHot?.audit.overRefund).toBeGreaterThan(0);
    expect(naiveHot?.verdict).toBe('WRONG');
    // the interleaved overhead pairs ran, and the A/A noise control, both sides correct in every
    // run (speed is not asserted)
    expect(
      overheads
        .filter((o) => !o.control)
        .map((o) => o.pgcoord)
        .sort(),
    ).toEqual(
      [
        'advisory/pgcoord',
        'advisory/pgcoord-callback',
        'for-update/pgcoord',
        'guarded/pgcoord',
        'optimistic/pgcoord',
        'idempotency/pgcoord-one', // against its same-SQL twin
        'idempotency/pgcoord-one', // against the hand-written key (other SQL)
      ].sort(),
    );
    expect(overheads.filter((o) => o.control).map((o) => `${o.pgcoord} vs ${o.twin}`)).toEqual(['advisory/best vs advisory/best']);
    for (const o of overheads)
      expect({ pair: `${o.pgcoord} vs ${o.twin}`, pairs: o.pairs, correct: o.correct }).toEqual({
        pair: `${o.pgcoord} vs ${o.twin}`,
        pairs: 2,
        correct: true,
      });
    // the fault scenario: pgcoord's transaction-scoped lock never double-refunds
    const pgcoordFault = fault?.outcomes.find((o) => o.lock.startsWith('pgcoord withLock'));
    expect(pgcoordFault?.overRefund).toBe(0);
    // ... and with a lease the second holder takes over during the pause, but the first one's write
    // with its old fence is refused by Postgres: the order is refunded once
    const leaseFault = fault?.outcomes.find((o) => o.lock.startsWith('pgcoord lease'));
    expect(leaseFault).toMatchObject({ payouts: 1, overRefund: 0, verdict: 'OK', staleWrite: { refused: true } });
    expect(leaseFault?.staleWrite?.outcome).toMatch(/^LeaseLostError \(SQLSTATE PGF01\)$/);
    expect(BigInt(leaseFault?.staleWrite?.takeoverFence ?? 0)).toBeGreaterThan(BigInt(leaseFault?.staleWrite?.fence ?? 0));

    // the lease micro-benchmark: its shape and its counts (never its speed)
    expect(lease).toBeDefined();
    const l = lease as LeaseBench;
    // one statement, one round trip, for each lease operation
    expect(l.roundTrips).toMatchObject({ acquire: 1, busyTry: 1, renew: 1, release: 1 });
    const cases = ['own names', 'one hot name'];
    for (const c of cases) {
      const p = l.throughput.find((r) => r.case === c && r.impl === 'pgcoord');
      expect({ c, ops: (p?.opsPerSec ?? 0) > 0 }).toEqual({ c, ops: true });
      expect({ c, lost: p?.lostAtRelease, regressions: p?.fenceRegressions, errors: p?.errors }).toEqual({
        c,
        lost: 0,
        regressions: 0,
        errors: {},
      });
      const r = l.throughput.find((x) => x.case === c && x.impl === 'redis');
      if (r) {
        expect({ c, lost: r.lostAtRelease, errors: r.errors }).toEqual({ c, lost: 0, errors: {} });
        expect(l.ratios.find((x) => x.case === c)?.value).toBeGreaterThan(0);
      }
    }
    // acquire + release on a name of one's own: one try, two round trips
    const own = l.throughput.find((r) => r.case === 'own names' && r.impl === 'pgcoord');
    expect(own).toMatchObject({ triesPerOp: 1, roundTripsPerOp: 2 });
    const { resign, expiry } = l.failover;
    expect(resign.errors).toEqual([]);
    expect(expiry.errors).toEqual([]);
    expect(resign.samples.length).toBe(2);
    expect(expiry.samples.length).toBe(1);
    // qualitative: a resign hands over on the release's NOTIFY, not at the term's expiry
    expect(resign.minMs).toBeLessThan(resign.ttlMs);
    // a dead leader's term is never taken over before it ended (both on the database clock)
    for (const s of expiry.samples) if (s.afterExpiryMs !== undefined) expect(s.afterExpiryMs).toBeGreaterThanOrEqual(0);
  });
});
