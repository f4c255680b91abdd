// Smoke test of the benchmark: `npm run bench -- --quick` as a child process against the test
// server, asserting the CORRECTNESS columns only (never speed: the machine is shared and noisy).
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, inject, it } from 'vitest';
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
  fault?: { outcomes: { lock: string; overRefund: number }[] };
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
    const { results, overheads, fault } = await quickRun();
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
    ).toEqual(['advisory/pgcoord', 'advisory/pgcoord-callback', 'for-update/pgcoord', 'guarded/pgcoord', 'optimistic/pgcoord'].sort());
    expect(overheads.filter((o) => o.control).map((o) => `${o.pgcoord} vs ${o.twin}`)).toEqual(['advisory/best vs advisory/best']);
    for (const o of overheads)
      expect({ pair: `${o.pgcoord} vs ${o.twin}`, pairs: o.pairs, correct: o.correct }).toEqual({
        pair: `${o.pgcoord} vs ${o.twin}`,
        pairs: 2,
        correct: true,
      });
    // the fault scenario: pgcoord's transaction-scoped lock never double-refunds
    const pgcoordFault = fault?.outcomes.find((o) => o.lock.startsWith('pgcoord'));
    expect(pgcoordFault?.overRefund).toBe(0);
  });
});
