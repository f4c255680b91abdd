// Single-flight: a hot key computed once however many callers and instances ask at once; a caller's
// abort never cancels the work for the others; a failed computation stores nothing.
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { AbortedError, InvalidOptionError, migrateLeases, SingleFlightTimeoutError, singleFlight, tryAcquireLease } from '../src/index.js';
import { runTs, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(4);
await migrateLeases(db.sql);
await db.sql`create table computations (pid int not null, at timestamptz not null default clock_timestamp())`;
const pools = db.runners.filter((r) => !r.inTx);

describe('single-flight', () => {
  for (const kind of pools) {
    it(`1 000 callers in a process: one computation, one value; then it is served cached (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        const key = `hot:${kind.name}`;
        let runs = 0;
        const compute = async () => {
          runs++;
          await sleep(100);
          return { price: 42 };
        };
        const out = await Promise.all(Array.from({ length: 1000 }, () => singleFlight(runner, key, compute, { ttlMs: 60_000 })));
        expect(runs).toBe(1);
        expect(out.every((r) => (r.value as { price: number }).price === 42)).toBe(true);
        expect(out.filter((r) => r.source === 'computed')).toHaveLength(1);
        expect(await singleFlight(runner, key, compute, { ttlMs: 60_000 })).toEqual({ value: { price: 42 }, source: 'cached' });
        expect(runs).toBe(1);
      });
    });
  }

  it("one caller's abort fails only that caller; a failed computation stores nothing and is run again next time", async () => {
    let runs = 0;
    const slow = async () => {
      runs++;
      await sleep(200);
      return 'v';
    };
    const abort = new AbortController();
    const quitter = singleFlight(db.sql, 'abort', slow, { ttlMs: 60_000, signal: abort.signal });
    const stayer = singleFlight(db.sql, 'abort', slow, { ttlMs: 60_000 });
    abort.abort();
    await expect(quitter).rejects.toBeInstanceOf(AbortedError);
    expect((await stayer).value).toBe('v');
    expect(runs).toBe(1);

    const failing = () => Promise.reject(new Error('upstream down'));
    const both = await Promise.allSettled([0, 1].map(() => singleFlight(db.sql, 'fails', failing, { ttlMs: 60_000 })));
    expect(both.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(await singleFlight(db.sql, 'fails', () => 'recovered', { ttlMs: 60_000 })).toEqual({ value: 'recovered', source: 'computed' });
  });

  it('a caller that waits longer than waitMs for another instance: SingleFlightTimeoutError', async () => {
    const busy = await tryAcquireLease(db.pool, 'flight ["stuck"]', { ttlMs: 10_000 });
    try {
      await expect(singleFlight(db.sql, 'stuck', () => 1, { ttlMs: 1000, waitMs: 300 })).rejects.toBeInstanceOf(SingleFlightTimeoutError);
    } finally {
      await busy?.release();
    }
  });

  it('bad input: typed errors before anything is sent', async () => {
    const counting = db.countingSql();
    const before = counting.writes.count;
    for (const [key, compute, options] of [
      ['', () => 1, { ttlMs: 1000 }],
      ['k\0', () => 1, { ttlMs: 1000 }],
      ['k', () => 1, { ttlMs: 0 }],
      ['k', () => 1, { ttlMs: Number.NaN }],
      ['k', () => 1, { ttlMs: 2 ** 31 }],
      ['k', () => 1, { ttlMs: 1000, waitMs: -1 }],
      ['k', () => 1, { ttlMs: 1000, computeTtlMs: 10 }],
      ['k', undefined, { ttlMs: 1000 }],
      ['k', () => 1, null],
    ] as const) {
      await expect(singleFlight(counting.sql, key, compute as never, options as never)).rejects.toBeInstanceOf(InvalidOptionError);
    }
    expect(counting.writes.count).toBe(before);
  });

  it('examples/hot-key.ts: an expired hot key, 1 000 requests across 4 processes: computed once, every request gets the value', async () => {
    const worker = fileURLToPath(new URL('./fixtures/flight-worker.ts', import.meta.url));
    const runs = await Promise.all(
      [0, 1, 2, 3].map((i) =>
        runTs<{ ok: number; wrong: number; firstAborted: boolean; sources: Record<string, number> }>(worker, [
          db.url,
          i % 2 ? 'pg' : 'pgjs',
          '250',
          '7',
        ]),
      ),
    );
    const [computed] = await db.sql`select count(*)::int as n from computations`;
    expect(computed?.n).toBe(1);
    for (const r of runs) {
      expect(r.wrong).toBe(0);
      expect(r.ok).toBe(249);
    }
    // the instance that computes makes its callers wait 500 ms: its first caller gives up at 50 ms,
    // and that abort failed nobody else (an instance that starts late may find the value at once)
    expect(runs.some((r) => r.firstAborted)).toBe(true);
  }, 90_000);
});
