// Leader election and singleton jobs on every pool runner kind, in one process (test/lease-chaos
// runs them across processes with kills and pauses).
import { describe, expect, it } from 'vitest';
import { InvalidOptionError, type Lease, leader, runSingleton, tryAcquireLease } from '../src/index.js';
import { migrateLeases } from '../src/lease/migrate.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(6);
await migrateLeases(db.sql);
const pools = db.runners.filter((r) => !r.inTx);

const until = async (check: () => boolean, ms = 10_000) => {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await sleep(10);
  }
};

describe('leader', () => {
  it('one leader among campaigns; stop() hands over at once (well inside the TTL), with a greater fence', async () => {
    const terms: { who: string; fence: bigint }[] = [];
    const campaign = (runner: object, who: string) =>
      leader(runner, 'elect', { ttlMs: 30_000 }, (lease) => {
        terms.push({ who, fence: lease.fence });
      });
    const a = campaign(db.sql, 'a');
    await until(() => terms.length === 1);
    const b = campaign(db.pool, 'b');
    await sleep(300);
    expect(terms).toHaveLength(1);
    expect(a.isLeader).toBe(true);
    expect(b.isLeader).toBe(false);
    const first = a.lease as Lease;
    await a.stop();
    expect(first.signal.aborted).toBe(true);
    expect(a.isLeader).toBe(false);
    // a 30 s term: only the resignation's notification can wake b this soon
    await until(() => terms.length === 2, 5000);
    expect(terms[1]?.who).toBe('b');
    expect(terms[1]?.fence).toBeGreaterThan(terms[0]?.fence as bigint);
    expect(b.isLeader).toBe(true);
    await b.stop();
  });

  for (const kind of pools) {
    it(`a leader whose term is lost is told by its signal and campaigns again (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        const name = `lost:${kind.name}`;
        const leases: Lease[] = [];
        const l = leader(runner, name, { ttlMs: 1000, renewEveryMs: 100 }, (lease) => {
          leases.push(lease);
        });
        await until(() => leases.length === 1);
        // the term ends behind its back (an operator, a restored backup): the next renewal finds out
        await db.sql`update pgcoord.leases set expires_at = clock_timestamp() - interval '1 second' where name = ${name}`;
        await until(() => leases[0]?.signal.aborted === true);
        expect(leases[0]?.signal.reason).toMatchObject({ code: 'PGCOORD_LEASE_LOST', reason: 'lost' });
        await until(() => leases.length === 2);
        expect(leases[1]?.fence).toBeGreaterThan(leases[0]?.fence as bigint);
        await l.stop();
      });
    });
  }

  it('onLead throwing resigns; another campaign takes over; errors go to onError', async () => {
    const errors: unknown[] = [];
    const led: string[] = [];
    const a = leader(db.sql, 'throws', { ttlMs: 30_000, backoffMs: 10_000, onError: (e) => errors.push(e) }, () => {
      led.push('a');
      throw new Error('leader work failed');
    });
    await until(() => led.length === 1);
    const b = leader(db.pool, 'throws', { ttlMs: 30_000 }, () => {
      led.push('b');
    });
    await until(() => led.includes('b'), 5000);
    expect(errors).toHaveLength(1);
    await Promise.all([a.stop(), b.stop()]);
  });

  it('stop() ends a leader whose onLead works until its signal aborts, and resigns', async () => {
    let ticks = 0;
    const l = leader(db.sql, 'loops', { ttlMs: 30_000 }, async (lease) => {
      while (!lease.signal.aborted) {
        ticks++;
        await sleep(20);
      }
    });
    await until(() => ticks > 2);
    const lease = l.lease as Lease;
    await l.stop();
    expect(lease.signal.reason).toMatchObject({ name: 'LeaseLostError', reason: 'released' });
    expect(l.isLeader).toBe(false);
    const next = await tryAcquireLease(db.pool, 'loops', { ttlMs: 1000 });
    expect(next?.fence).toBeGreaterThan(lease.fence);
    await next?.release();
  });

  it('bad options are refused at once, before anything is sent', () => {
    expect(() => leader(db.sql, 'x', { ttlMs: 0 }, () => {})).toThrow(InvalidOptionError);
    expect(() => leader(db.sql, '', { ttlMs: 1000 }, () => {})).toThrow(InvalidOptionError);
    expect(() => leader(db.sql, 'x', { ttlMs: 1000 }, undefined as never)).toThrow(InvalidOptionError);
    expect(() => leader(db.sql, 'x', { ttlMs: 1000, backoffMs: -1 }, () => {})).toThrow(InvalidOptionError);
  });
});

describe('singleton jobs', () => {
  for (const kind of pools) {
    it(`five callers, one slot: one run; waiters receive its result, a later call gets it too (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        const job = `report:${kind.name}`;
        let runs = 0;
        const report = async () => {
          runs++;
          await sleep(200);
          return { total: 42, by: 'winner' };
        };
        const out = await Promise.all(
          Array.from({ length: 5 }, () => runSingleton(runner, { job, slot: '2026-12-04', ttlMs: 5000 }, report)),
        );
        expect(runs).toBe(1);
        expect(out.filter((o) => o.status === 'ran')).toHaveLength(1);
        for (const o of out) {
          expect(o.status === 'skipped' ? undefined : o.value).toEqual({ total: 42, by: 'winner' });
        }
        expect(await runSingleton(runner, { job, slot: '2026-12-04', ttlMs: 5000 }, report)).toEqual({
          status: 'done',
          value: { total: 42, by: 'winner' },
        });
        expect(runs).toBe(1);
      });
    });
  }

  it('onBusy skip: the others return at once; a run that throws leaves the slot to the next caller', async () => {
    let runs = 0;
    const slow = async () => {
      runs++;
      await sleep(300);
      return runs;
    };
    const out = await Promise.all(
      Array.from({ length: 4 }, () => runSingleton(db.sql, { job: 'skip', slot: 's1', ttlMs: 5000, onBusy: 'skip' }, slow)),
    );
    expect(runs).toBe(1);
    expect(out.map((o) => o.status).sort()).toEqual(['ran', 'skipped', 'skipped', 'skipped']);
    expect(out.find((o) => o.status === 'skipped')).toEqual({ status: 'skipped', reason: 'running' });

    await expect(
      runSingleton(db.sql, { job: 'skip', slot: 's2', ttlMs: 5000 }, () => {
        throw new Error('report failed');
      }),
    ).rejects.toThrow('report failed');
    expect(await runSingleton(db.sql, { job: 'skip', slot: 's2', ttlMs: 5000 }, () => 'second try')).toMatchObject({
      status: 'ran',
      value: 'second try',
    });
  });

  it('overlap: an earlier slot still running makes the next one skip, wait, or run beside it', async () => {
    let release: () => void = () => {};
    const long = runSingleton(
      db.sql,
      { job: 'nightly', slot: 'monday', ttlMs: 5000 },
      () => new Promise<string>((r) => (release = () => r('monday'))),
    );
    await sleep(200);
    expect(await runSingleton(db.pool, { job: 'nightly', slot: 'tuesday', ttlMs: 5000 }, () => 'tuesday')).toEqual({
      status: 'skipped',
      reason: 'overlap',
    });
    const waited = runSingleton(db.pool, { job: 'nightly', slot: 'tuesday', ttlMs: 5000, overlap: 'wait' }, () => 'tuesday');
    await sleep(200);
    release();
    expect((await long).status).toBe('ran');
    expect(await waited).toMatchObject({ status: 'ran', value: 'tuesday' });

    let hold: () => void = () => {};
    const a = runSingleton(
      db.sql,
      { job: 'hourly', slot: '10', ttlMs: 5000, overlap: 'allow' },
      () => new Promise<number>((r) => (hold = () => r(10))),
    );
    await sleep(200);
    expect(await runSingleton(db.pool, { job: 'hourly', slot: '11', ttlMs: 5000, overlap: 'allow' }, () => 11)).toMatchObject({
      status: 'ran',
      value: 11,
    });
    hold();
    expect(await a).toMatchObject({ status: 'ran', value: 10 });
  });

  it('a run whose lease was taken over cannot record the slot (fenced); the new holder runs it', async () => {
    const first = runSingleton(db.sql, { job: 'paused', slot: 'x', ttlMs: 300, renewEveryMs: false, marginMs: 0 }, async () => {
      await sleep(800); // a pause past the TTL
      return 'stale';
    });
    await sleep(450);
    const second = await runSingleton(db.pool, { job: 'paused', slot: 'x', ttlMs: 5000 }, () => 'fresh');
    expect(second).toMatchObject({ status: 'ran', value: 'fresh' });
    await expect(first).rejects.toMatchObject({ code: 'PGCOORD_LEASE_LOST' });
    expect(await runSingleton(db.sql, { job: 'paused', slot: 'x', ttlMs: 5000 }, () => 'again')).toEqual({
      status: 'done',
      value: 'fresh',
    });
    expect(await tryAcquireLease(db.sql, 'singleton ["paused"]', { ttlMs: 1000 })).toBeDefined();
  });

  it('bad input: typed errors before anything is sent', async () => {
    const counting = db.countingSql();
    const before = counting.writes.count;
    for (const options of [
      { job: '', slot: 'x', ttlMs: 1000 },
      { job: 'j', slot: 'x'.repeat(101), ttlMs: 1000 },
      { job: 'j\0', slot: 'x', ttlMs: 1000 },
      { job: 'j', slot: '\uDC00', ttlMs: 1000 },
      { job: 'j', slot: 'x', ttlMs: -1 },
      { job: 'j', slot: 'x', ttlMs: 1000, onBusy: 'later' },
      { job: 'j', slot: 'x', ttlMs: 1000, overlap: 'sometimes' },
    ]) {
      await expect(runSingleton(counting.sql, options as never, () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    }
    await expect(runSingleton(counting.sql, { job: 'j', slot: 'x', ttlMs: 1000 }, undefined as never)).rejects.toBeInstanceOf(
      InvalidOptionError,
    );
    expect(counting.writes.count).toBe(before);
  });
});
