// The keyed queue: a key's jobs one at a time in enqueue (commit) order, keys in parallel; the job
// exists iff the enqueuing transaction commits; a failing job is retried as its key's head, then
// dead, without holding up other keys; a dead job can be retried or skipped; a stale claim can
// neither complete nor write fenced; bad input is refused before anything is sent.
import { describe, expect, it } from 'vitest';
import {
  enqueue,
  InvalidOptionError,
  type Job,
  JobClaimLostError,
  listQueueKeys,
  migrateQueue,
  QueueNotMigratedError,
  queueStats,
  retryDeadJob,
  skipDeadJob,
  UnsupportedRunnerError,
  withJobFence,
  work,
} from '../src/index.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(8);
await migrateQueue(db.sql);

const until = async (check: () => boolean | Promise<boolean>, ms = 10_000) => {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await sleep(20);
  }
};

describe('keyed queue', () => {
  for (const kind of db.runners) {
    it(`enqueue joins the caller's transaction or runs on its own; the worker runs them in order (${kind.name})`, async () => {
      const queue = `q-${kind.name}`;
      await kind.use(async (runner) => {
        for (let i = 0; i < 3; i++) {
          const r = await enqueue(runner, queue, 'k', { i });
          expect(r.enqueued).toBe(true);
          expect(typeof r.id).toBe('bigint');
        }
      });
      if (kind.inTx) {
        // rolled back: the job never exists
        await kind
          .use(async (runner) => {
            await enqueue(runner, queue, 'k', { i: 99 });
            throw new Error('rollback');
          })
          .catch(() => {});
      }
      const seen: number[] = [];
      const pool = kind.inTx ? db.sql : await kind.use(async (r) => r);
      const worker = work<{ i: number }>(pool, queue, (job) => {
        seen.push(job.payload.i);
      });
      await until(() => seen.length >= 3);
      await sleep(100);
      await worker.stop();
      expect(seen).toEqual([0, 1, 2]);
      expect(await queueStats(db.sql, queue)).toEqual([]);
    });
  }

  it('one key at a time, keys in parallel, order kept per key under concurrent enqueues', async () => {
    const queue = 'parallel';
    const keys = ['a', 'b', 'c', 'd'];
    // 4 keys, 200 jobs, enqueued by 8 concurrent callers
    await Promise.all(
      Array.from({ length: 8 }, async (_, w) => {
        for (let n = 0; n < 25; n++) {
          const key = keys[(w + n) % 4] as string;
          await db.sql.begin((tx) => enqueue(tx, queue, key, { w, n }));
        }
      }),
    );
    const enqueued = await db.sql`select key, id::text as id from pgcoord.queue_jobs j where queue = ${queue} order by j.id`;
    const running = new Set<string>();
    let maxParallel = 0;
    let overlap = 0;
    const done: Record<string, string[]> = {};
    const handler = async (job: Job) => {
      if (running.has(job.key)) overlap++;
      running.add(job.key);
      maxParallel = Math.max(maxParallel, running.size);
      await sleep(2);
      running.delete(job.key);
      done[job.key] = [...(done[job.key] ?? []), String(job.id)];
    };
    const workers = [work(db.sql, queue, handler, { concurrency: 3 }), work(db.pool, queue, handler, { concurrency: 3, batch: 2 })];
    await until(() => Object.values(done).flat().length === enqueued.length);
    await Promise.all(workers.map((w) => w.stop()));
    expect(overlap).toBe(0);
    expect(maxParallel).toBeGreaterThan(1);
    for (const key of keys) expect(done[key]).toEqual(enqueued.filter((r) => r.key === key).map((r) => r.id));
  });

  it('a failing job is retried as its key head, then dead; other keys go on; retry and skip', async () => {
    const queue = 'failing';
    await enqueue(db.sql, queue, 'bad', { n: 1 });
    await enqueue(db.sql, queue, 'bad', { n: 2 });
    await enqueue(db.sql, queue, 'good', { n: 3 });
    const ran: string[] = [];
    let fail = true;
    const errors: unknown[] = [];
    const worker = work<{ n: number }>(
      db.sql,
      queue,
      (job) => {
        ran.push(`${job.key}:${job.payload.n}:${job.attempt}`);
        if (job.key === 'bad' && job.payload.n === 1 && fail) throw new Error('boom\0 with a NUL');
      },
      { maxAttempts: 3, retryDelayMs: () => 10, onError: (err) => errors.push(err) },
    );
    await until(async () => (await listQueueKeys(db.sql, queue, { dead: true })).length === 1);
    expect(ran.filter((r) => r.startsWith('bad'))).toEqual(['bad:1:1', 'bad:1:2', 'bad:1:3']);
    expect(ran).toContain('good:3:1');
    expect(errors).toHaveLength(3);
    const [dead] = await listQueueKeys(db.sql, queue, { dead: true });
    expect(dead).toMatchObject({ key: 'bad', state: 'dead', jobs: 2, attempts: 3 });
    expect(dead?.lastError).toContain('boom');
    expect((await queueStats(db.sql, queue))[0]).toMatchObject({ jobs: 2, keys: 1, dead: 1 });
    // retry: the dead job runs again first (attempt 1), then the key's next job
    fail = false;
    expect(await retryDeadJob(db.sql, queue, 'bad')).toBe(dead?.headId);
    await until(() => ran.includes('bad:2:1'));
    expect(ran.slice(-2)).toEqual(['bad:1:1', 'bad:2:1']);
    // skip: a dead head is dropped and the key goes on
    fail = true;
    await enqueue(db.sql, queue, 'bad', { n: 1 });
    await enqueue(db.sql, queue, 'bad', { n: 4 });
    await until(async () => (await listQueueKeys(db.sql, queue, { dead: true })).length === 1);
    expect(await skipDeadJob(db.sql, queue, 'bad')).toBeTypeOf('bigint');
    expect(await skipDeadJob(db.sql, queue, 'bad')).toBeUndefined();
    await until(() => ran.includes('bad:4:1'));
    await worker.stop();
    expect(await retryDeadJob(db.sql, queue, 'bad')).toBeUndefined();
  });

  it('dedupeKey: a second enqueue while the first is queued does nothing', async () => {
    const a = await enqueue(db.sql, 'dedupe', 'k', 1, { dedupeKey: 'x' });
    const b = await enqueue(db.sql, 'dedupe', 'k2', 2, { dedupeKey: 'x' });
    expect(a.enqueued).toBe(true);
    expect(b).toEqual({ enqueued: false });
    const delayed = await enqueue(db.sql, 'dedupe', 'later', 3, { delayMs: 60_000 });
    expect(delayed.enqueued).toBe(true);
    const keys = await listQueueKeys(db.sql, 'dedupe');
    expect(keys.map((k) => [k.key, k.state])).toEqual([
      ['k', 'ready'],
      ['later', 'waiting'],
    ]);
  });

  it('a claim taken over: the old worker is told, its fenced write and its completion are refused, the job runs again', async () => {
    const queue = 'takeover';
    await db.sql`create table if not exists takeover_effects (job text, fence bigint)`;
    await enqueue(db.sql, queue, 'k', {});
    let first: Job | undefined;
    let release: () => void = () => {};
    const held = new Promise<void>((r) => {
      release = r;
    });
    const stale = work(
      db.sql,
      queue,
      async (job) => {
        first = job;
        await held;
      },
      { claimTtlMs: 1000 },
    );
    await until(() => first !== undefined);
    // freeze the stale worker's renewals: its claim runs out on the database clock
    await db.sql`update pgcoord.queue_keys set ready_at = clock_timestamp() where queue = ${queue}`;
    const again: Job[] = [];
    const fresh = work(db.pool, queue, async (job) => {
      again.push(job);
      await withJobFence(db.pool, job, (c: { query(t: string, p: unknown[]): Promise<unknown> }) =>
        c.query('insert into takeover_effects values ($1, $2)', [String(job.id), String(job.fence)]),
      );
    });
    await until(() => again.length === 1);
    expect(again[0]?.fence).toBeGreaterThan(first?.fence as bigint);
    expect(again[0]?.attempt).toBe(2);
    await until(() => first?.signal.aborted === true);
    expect(first?.signal.reason).toBeInstanceOf(JobClaimLostError);
    await expect(withJobFence(db.sql, { ...first!, signal: new AbortController().signal }, () => 1)).rejects.toBeInstanceOf(
      JobClaimLostError,
    );
    release();
    await stale.stop();
    await fresh.stop();
    const effects = await db.sql`select fence::text from takeover_effects`;
    expect(effects.map((e) => e.fence)).toEqual([String(again[0]?.fence)]);
  });

  it("a long fenced transaction on one key does not hold up the renewal of the worker's other keys", async () => {
    const queue = 'fenced-long';
    await enqueue(db.sql, queue, 'slow', {});
    await enqueue(db.sql, queue, 'other', {});
    const other: Job[] = [];
    let otherStillHeld: boolean | undefined;
    let fencedDone = false;
    const worker = work(
      db.pool,
      queue,
      async (job) => {
        if (job.key === 'slow') {
          // holds the key's row FOR SHARE for 1.6 claim TTLs (the renewal used to wait for it)
          await withJobFence(db.pool, job, () => sleep(1600));
          fencedDone = true;
        } else {
          other.push(job);
          await sleep(2000); // two TTLs: kept only by renewals
          otherStillHeld = !job.signal.aborted;
        }
      },
      { concurrency: 2, claimTtlMs: 1000 },
    );
    await until(() => otherStillHeld !== undefined && fencedDone, 15_000);
    await worker.stop();
    expect(otherStillHeld).toBe(true);
    expect(other).toHaveLength(1);
  });

  it('an enqueue still open while its key empties: its job runs once it commits; one rolled back leaves nothing', async () => {
    const queue = 'race';
    const ran: number[] = [];
    let inPlace: () => void = () => {};
    const enqueued = new Promise<void>((r) => {
      inPlace = r;
    });
    const worker = work<{ n: number }>(db.sql, queue, async (job) => {
      if (job.payload.n === 1) await enqueued; // job 1 ends only once job 2's enqueue is open
      ran.push(job.payload.n);
    });
    await enqueue(db.sql, queue, 'k', { n: 1 });
    let commit: () => void = () => {};
    const committed = new Promise<void>((r) => {
      commit = r;
    });
    const open = db.sql.begin(async (tx) => {
      await enqueue(tx, queue, 'k', { n: 2 }); // holds the key's order row until commit
      inPlace();
      await committed;
    });
    try {
      await until(() => ran.includes(1)); // job 1 done while job 2's enqueue is open: the key cannot be removed
      await sleep(300);
      // the worker found the key empty but could not lock its order row: the key stays, looked at again shortly
      expect(await db.sql`select key from pgcoord.queue_keys where queue = ${queue}`).toHaveLength(1);
    } finally {
      commit(); // also on failure: an open transaction would hold up every later test
      await open;
    }
    await until(() => ran.includes(2));
    await db.sql
      .begin(async (tx) => {
        await enqueue(tx, queue, 'other', { n: 3 });
        throw new Error('rolled back');
      })
      .catch(() => {});
    await sleep(300);
    await worker.stop();
    expect(ran).toEqual([1, 2]);
    expect(await db.sql`select * from pgcoord.queue_keys where queue = ${queue}`).toHaveLength(0);
    expect(await db.sql`select * from pgcoord.queue_order where queue = ${queue}`).toHaveLength(0);
  });

  it('a delayed job runs at its time, not before, and an idle worker does not sleep past it', async () => {
    const queue = 'delayed';
    let startedAt = 0;
    const worker = work(db.sql, queue, () => {
      startedAt = performance.now();
    });
    await sleep(300); // the worker is idle, listening
    const t0 = performance.now();
    await enqueue(db.sql, queue, 'k', {}, { delayMs: 800 });
    await until(() => startedAt > 0);
    await worker.stop();
    expect(startedAt - t0).toBeGreaterThanOrEqual(790);
    // polling alone would wake it up to 5 s later: the new key's notification told it when to look
    expect(startedAt - t0).toBeLessThan(4000);
  });

  it('payloads round-trip as JSON; a missing table is QueueNotMigratedError', async () => {
    const payload = { s: 'émoji 🎉', n: 12.5, big: 2 ** 53 - 1, a: [null, true, { x: 'y' }], when: new Date(0) };
    const got: unknown[] = [];
    await enqueue(db.pool, 'json', 'k', payload);
    const worker = work(db.pool, 'json', (job) => {
      got.push(job.payload);
    });
    await until(() => got.length === 1);
    await worker.stop();
    expect(got[0]).toEqual(JSON.parse(JSON.stringify(payload)));
    await db.sql
      .begin(async (tx) => {
        await tx`drop table pgcoord.queue_jobs cascade`;
        await expect(enqueue(tx, 'json', 'k', 1)).rejects.toBeInstanceOf(QueueNotMigratedError);
        throw new Error('roll the drop back');
      })
      .catch((err: Error) => expect(err.message).toBe('roll the drop back'));
  });

  it('bad input: typed errors before anything is sent', async () => {
    const bad: [string, () => unknown][] = [
      ['empty queue', () => enqueue(db.sql, '', 'k', 1)],
      ['empty key', () => enqueue(db.sql, 'q', '', 1)],
      ['NUL key', () => enqueue(db.sql, 'q', 'a\0b', 1)],
      ['lone surrogate queue', () => enqueue(db.sql, 'q\uD800', 'k', 1)],
      ['long key', () => enqueue(db.sql, 'q', 'k'.repeat(256), 1)],
      ['undefined payload', () => enqueue(db.sql, 'q', 'k', undefined)],
      ['function payload', () => enqueue(db.sql, 'q', 'k', () => 1)],
      ['bigint payload', () => enqueue(db.sql, 'q', 'k', { n: 1n })],
      ['NaN payload', () => enqueue(db.sql, 'q', 'k', { n: Number.NaN })],
      ['NUL in a payload string', () => enqueue(db.sql, 'q', 'k', { s: 'a\0' })],
      ['lone surrogate payload key', () => enqueue(db.sql, 'q', 'k', { 'a\uDC00': 1 })],
      ['huge payload', () => enqueue(db.sql, 'q', 'k', 'x'.repeat(2_000_000))],
      [
        'cyclic payload',
        () =>
          enqueue(
            db.sql,
            'q',
            'k',
            (() => {
              const o: Record<string, unknown> = {};
              o.o = o;
              return o;
            })(),
          ),
      ],
      ['bad runAt', () => enqueue(db.sql, 'q', 'k', 1, { runAt: new Date(Number.NaN) })],
      ['negative delay', () => enqueue(db.sql, 'q', 'k', 1, { delayMs: -1 })],
      ['runAt and delay', () => enqueue(db.sql, 'q', 'k', 1, { runAt: new Date(), delayMs: 1 })],
      ['bad dedupe', () => enqueue(db.sql, 'q', 'k', 1, { dedupeKey: '' })],
      ['worker without handler', () => work(db.sql, 'q', 1 as never)],
      ['worker concurrency 0', () => work(db.sql, 'q', () => {}, { concurrency: 0 })],
      ['worker ttl too short', () => work(db.sql, 'q', () => {}, { claimTtlMs: 10 })],
      ['worker bad queue', () => work(db.sql, '\0', () => {})],
      ['stats bad queue', () => queueStats(db.sql, '')],
      ['skip bad key', () => skipDeadJob(db.sql, 'q', '\uD800')],
    ];
    for (const [what, call] of bad) {
      const outcome = await (async () => call())().then(
        () => 'resolved',
        (err: unknown) => err,
      );
      expect(outcome, what).toBeInstanceOf(InvalidOptionError);
    }
    await db.sql.begin(async (tx) => {
      expect(() => work(tx, 'q', () => {})).toThrow(UnsupportedRunnerError);
    });
    expect(await queueStats(db.sql, 'q')).toEqual([]);
  });
});
