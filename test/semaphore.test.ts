// The counting semaphore: never more than N holders, also when many race; a released permit wakes
// a waiter at once; a crashed holder's permit comes back at its expiry, and its holder is told.
import { describe, expect, it } from 'vitest';
import {
  acquirePermit,
  InvalidOptionError,
  type Lease,
  LeaseNotAcquiredError,
  migrateLeases,
  tryAcquirePermit,
  withPermit,
} from '../src/index.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(8);
await migrateLeases(db.sql);
const pools = db.runners.filter((r) => !r.inTx);

describe('semaphore', () => {
  for (const kind of pools) {
    it(`N permits: N holders, the next waits and gets the first permit released (${kind.name})`, async () => {
      await kind.use(async (pool) => {
        const key = `sem:${kind.name}`;
        const o = { permits: 3, ttlMs: 30_000 };
        const held = await Promise.all([0, 1, 2].map(() => acquirePermit(pool, key, o)));
        expect(new Set(held.map((p) => p.name)).size).toBe(3);
        expect(await tryAcquirePermit(pool, key, o)).toBeUndefined();
        await expect(acquirePermit(db.sql, key, { ...o, timeoutMs: 0 })).rejects.toBeInstanceOf(LeaseNotAcquiredError);
        // a 30 s term ahead: only the release's notification can let the waiter in within 5 s
        const waiting = acquirePermit(db.pool, key, { ...o, timeoutMs: 5000 });
        await sleep(200);
        await held[1]?.release();
        const next = await waiting;
        expect(next.name).toBe(held[1]?.name);
        expect(next.fence).toBeGreaterThan(held[1]?.fence as bigint);
        await Promise.all([held[0], held[2], next].map((p) => p?.release()));
      });
    });
  }

  it('40 racing callers on 5 permits: exactly 5 hold one', async () => {
    const o = { permits: 5, ttlMs: 30_000 };
    const got = await Promise.all(Array.from({ length: 40 }, (_, i) => tryAcquirePermit(i % 2 ? db.sql : db.pool, 'race', o)));
    const holders = got.filter((p): p is Lease => p !== undefined);
    expect(holders).toHaveLength(5);
    expect(new Set(holders.map((p) => p.name)).size).toBe(5);
    await Promise.all(holders.map((p) => p.release()));
  });

  it("a crashed holder's permit comes back at its expiry; the holder's signal said so first", async () => {
    const o = { permits: 1, ttlMs: 300, renewEveryMs: false as const };
    const crashed = await acquirePermit(db.sql, 'crash', o);
    let told = false;
    crashed.signal.addEventListener('abort', () => {
      told = true;
    });
    let next: Lease | undefined;
    while (!next) {
      next = await tryAcquirePermit(db.pool, 'crash', { permits: 1, ttlMs: 5000 });
      if (!next) await sleep(5);
    }
    expect(told).toBe(true);
    expect(next.fence).toBeGreaterThan(crashed.fence);
    await next.release();
  });

  it('withPermit releases after the callback; bad input is refused before anything is sent', async () => {
    expect(
      await withPermit(
        db.sql,
        'scoped',
        { permits: 1, ttlMs: 5000 },
        async () => (await tryAcquirePermit(db.pool, 'scoped', { permits: 1, ttlMs: 5000 })) ?? 'full',
      ),
    ).toBe('full');
    const again = await tryAcquirePermit(db.pool, 'scoped', { permits: 1, ttlMs: 5000 });
    expect(again).toBeDefined();
    await again?.release();
    const counting = db.countingSql();
    const before = counting.writes.count;
    for (const [key, options] of [
      ['k', { permits: 0, ttlMs: 1000 }],
      ['k', { permits: 1001, ttlMs: 1000 }],
      ['k', { permits: 1.5, ttlMs: 1000 }],
      ['k', { permits: 2, ttlMs: 0 }],
      ['', { permits: 2, ttlMs: 1000 }],
      ['k\0', { permits: 2, ttlMs: 1000 }],
      ['k'.repeat(201), { permits: 2, ttlMs: 1000 }],
      ['k', null],
    ] as const) {
      await expect(acquirePermit(counting.sql, key, options as never)).rejects.toBeInstanceOf(InvalidOptionError);
    }
    await expect(withPermit(counting.sql, 'k', { permits: 1, ttlMs: 1000 }, undefined as never)).rejects.toBeInstanceOf(InvalidOptionError);
    expect(counting.writes.count).toBe(before);
  });
});
