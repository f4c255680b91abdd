import { beforeAll, describe, expect, it } from 'vitest';
import {
  AbortedError,
  InvalidOptionError,
  RetryExhaustedError,
  RowLockedError,
  retry,
  retryReason,
  sqlState,
  transactionWithRetry,
  VersionConflictError,
  withRowLock,
} from '../src/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb();

beforeAll(async () => {
  await db.sql`create table rt_rows (id int primary key, n int not null default 0)`;
  await db.sql`insert into rt_rows (id) select g from generate_series(1, 20) g`;
});

/** A real driver error with the given SQLSTATE, raised by the server. */
const raise = (handle: unknown, state: string) =>
  q(handle, `do $$ begin raise exception 'raised %', '${state}' using errcode = '${state}'; end $$`);

describe('retry', () => {
  it('re-runs the whole function on version conflicts until it succeeds', async () => {
    const seen: number[] = [];
    const retries: string[] = [];
    const out = await retry(
      async ({ attempt }) => {
        seen.push(attempt);
        if (attempt < 3) throw new VersionConflictError('doc 1', 1, 2);
        return 'done';
      },
      { baseMs: 1, onRetry: (i) => retries.push(`${i.attempt}:${i.reason}`) },
    );
    expect(out).toBe('done');
    expect(seen).toEqual([1, 2, 3]);
    expect(retries).toEqual(['1:version-conflict', '2:version-conflict']);
  });

  for (const [name, runner] of [
    ['postgres.js', () => db.sql],
    ['pg', () => db.pool],
  ] as const) {
    it(`gives up after the attempt count with the last error as cause (${name}, real 40001)`, async () => {
      let calls = 0;
      const err = await retry(
        async () => {
          calls++;
          await raise(runner(), '40001');
        },
        { attempts: 4, baseMs: 1 },
      ).catch((e: unknown) => e);
      expect(calls).toBe(4);
      expect(err).toBeInstanceOf(RetryExhaustedError);
      expect(err).toMatchObject({ code: 'PGCOORD_RETRY_EXHAUSTED', attempts: 4 });
      expect(sqlState((err as Error).cause)).toBe('40001');
    });

    it(`does not retry a non-retryable error and passes it through untouched (${name}, real 23505)`, async () => {
      let calls = 0;
      let thrown: unknown;
      const err = await retry(async () => {
        calls++;
        try {
          await q(runner(), 'insert into rt_rows (id) values (1)');
        } catch (e) {
          thrown = e;
          throw e;
        }
      }).catch((e: unknown) => e);
      expect(calls).toBe(1);
      expect(err).toBe(thrown);
      expect(sqlState(err)).toBe('23505');
    });
  }

  it('retries deadlocks by default and 55P03 only when asked', async () => {
    expect(retryReason(Object.assign(new Error('x'), { code: '40P01' }))).toBe('deadlock');
    const client = await db.pool.connect();
    await client.query('begin');
    await client.query('select 1 from rt_rows where id = 2 for update');
    try {
      const nowait = () => withRowLock(db.sql, { table: 'rt_rows', key: { id: 2 } }, (row) => row.n, { wait: 'nowait' });
      let calls = 0;
      const err = await retry(() => {
        calls++;
        return nowait();
      }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(RowLockedError);
      expect(calls).toBe(1);
      setTimeout(() => void client.query('commit'), 60);
      calls = 0;
      const n = await retry(
        () => {
          calls++;
          return nowait();
        },
        { retryOn: ['lock-not-available'], attempts: 100, baseMs: 5, maxMs: 20 },
      );
      expect(n).toBe(0);
      expect(calls).toBeGreaterThan(1);
    } finally {
      client.release();
    }
  });

  it('stops at the deadline before the attempts run out', async () => {
    let calls = 0;
    const t0 = performance.now();
    const err = await retry(
      () => {
        calls++;
        throw new VersionConflictError('x', 1, 2);
      },
      { attempts: 1000, deadlineMs: 60, baseMs: 10, maxMs: 10 },
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RetryExhaustedError);
    expect((err as RetryExhaustedError).attempts).toBe(calls);
    expect(calls).toBeLessThan(1000);
    expect(performance.now() - t0).toBeLessThan(500);
  });

  it('stops on abort, during the backoff or before the first attempt', async () => {
    const ac = new AbortController();
    let calls = 0;
    setTimeout(() => ac.abort(), 30);
    const t0 = performance.now();
    const err = await retry(
      () => {
        calls++;
        throw new VersionConflictError('x', 1, 2);
      },
      { attempts: 1000, baseMs: 10_000, maxMs: 10_000, signal: ac.signal },
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortedError);
    expect((err as Error).cause).toBeInstanceOf(VersionConflictError);
    expect(performance.now() - t0).toBeLessThan(1000);
    calls = 0;
    await expect(retry(() => calls++, { signal: ac.signal })).rejects.toBeInstanceOf(AbortedError);
    expect(calls).toBe(0);
  });

  it('rejects bad options with typed errors', async () => {
    const fn = () => 1;
    await expect(retry('x' as unknown as () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { attempts: 0 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { attempts: 1.5 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { baseMs: -1 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { maxMs: Number.NaN })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { deadlineMs: -5 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { baseMs: 3e9 })).rejects.toBeInstanceOf(InvalidOptionError); // beyond Node's timers
    await expect(retry(fn, { maxMs: 3e9 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { baseMs: Object.create(null) })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(transactionWithRetry(db.sql, fn, { readOnly: 'yes' as unknown as boolean })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(transactionWithRetry(db.sql, fn, null as never)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { retryOn: ['everything' as 'deadlock'] })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { signal: {} as AbortSignal })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(retry(fn, { onRetry: 1 as unknown as () => void })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(transactionWithRetry(db.sql, 'x' as unknown as () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(transactionWithRetry(db.sql, fn, { isolation: 'chaos' as 'serializable' })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(transactionWithRetry(db.sql, fn, { attempts: -1 })).rejects.toBeInstanceOf(InvalidOptionError);
  });
});

describe('transactionWithRetry', () => {
  for (const kind of db.runners) {
    if (!kind.inTx) {
      it(`runs at SERIALIZABLE and re-runs the whole transaction, rolled back each time (${kind.name})`, async () => {
        let calls = 0;
        const err = await kind
          .use((runner) =>
            transactionWithRetry(
              runner,
              async (tx, { attempt }) => {
                calls++;
                expect(attempt).toBe(calls);
                const [s] = await q(tx, "select current_setting('transaction_isolation') as iso");
                expect(s!.iso).toBe('serializable');
                await q(tx, 'update rt_rows set n = n + 1 where id = 10');
                await raise(tx, '40001');
              },
              { attempts: 3, baseMs: 1 },
            ),
          )
          .catch((e: unknown) => e);
        expect(calls).toBe(3);
        expect(err).toMatchObject({ code: 'PGCOORD_RETRY_EXHAUSTED', attempts: 3 });
        const [row] = await db.sql`select n from rt_rows where id = 10`;
        expect(row!.n).toBe(0);
      });
    } else {
      it(`joins a caller's transaction, runs once and lets errors through (${kind.name})`, async () => {
        let calls = 0;
        const err = await kind
          .use((runner) =>
            transactionWithRetry(runner, async (tx) => {
              calls++;
              await raise(tx, '40001');
            }),
          )
          .catch((e: unknown) => e);
        expect(calls).toBe(1);
        expect(err).not.toBeInstanceOf(RetryExhaustedError);
        expect(sqlState(err)).toBe('40001');
        // asking for an isolation the caller's transaction does not have is an error
        await expect(kind.use((runner) => transactionWithRetry(runner, () => 1, { isolation: 'serializable' }))).rejects.toBeInstanceOf(
          InvalidOptionError,
        );
        expect(await kind.use((runner) => transactionWithRetry(runner, () => 'ok', { isolation: 'read committed' }))).toBe('ok');
      });
    }
  }

  it('retries the victim of a real deadlock (40P01), and both transactions complete', async () => {
    let calls = 0;
    let arrived = 0;
    const both = new Promise<void>((resolve) => {
      const check = setInterval(() => {
        if (arrived >= 2) {
          clearInterval(check);
          resolve();
        }
      }, 2);
    });
    const cross = (first: number, second: number) =>
      transactionWithRetry(
        db.sql,
        async (tx, { attempt }) => {
          calls++;
          await tx`set local deadlock_timeout = '50ms'`;
          await tx`update rt_rows set n = n + 1 where id = ${first}`;
          if (attempt === 1) {
            arrived++;
            await both; // both hold their first row: now each asks for the other's
          }
          await tx`update rt_rows set n = n + 1 where id = ${second}`;
        },
        { isolation: 'read committed', baseMs: 1 },
      );
    await Promise.all([cross(15, 16), cross(16, 15)]);
    expect(calls).toBe(3);
    const rows = await db.sql`select n from rt_rows where id in (15, 16) order by id`;
    expect(rows.map((r) => r.n)).toEqual([2, 2]);
  });

  it('passes a non-retryable error through after one attempt', async () => {
    let calls = 0;
    const err = await transactionWithRetry(db.pool, async (tx) => {
      calls++;
      await q(tx, 'insert into rt_rows (id) values (1)');
    }).catch((e: unknown) => e);
    expect(calls).toBe(1);
    expect(sqlState(err)).toBe('23505');
  });
});
