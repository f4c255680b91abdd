import { eq } from 'drizzle-orm';
import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { drizzle } from 'drizzle-orm/postgres-js';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  AbortedError,
  claim,
  InvalidIdentifierError,
  InvalidOptionError,
  LockTimeoutError,
  lockRows,
  NotInTransactionError,
  RowLockedError,
  RowNotFoundError,
  withRowLock,
} from '../src/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb();

const items = pgTable('rl_items', {
  id: integer('id').primaryKey(),
  label: text('label').notNull(),
  stockCount: integer('stock_count').notNull(),
});

beforeAll(async () => {
  await db.sql`create table rl_items (id int primary key, label text not null, stock_count int not null)`;
  await db.sql`insert into rl_items select g, 'item ' || g, 10 from generate_series(1, 40) g`;
  await db.sql`create table rl_jobs (id int primary key, queue text not null, done_by int)`;
});

/** Hold FOR UPDATE on rl_items row `id` from another connection until the returned function is called. */
async function hold(id: number): Promise<() => Promise<void>> {
  const client = await db.pool.connect();
  await client.query('begin');
  await client.query('select 1 from rl_items where id = $1 for update', [id]);
  return async () => {
    await client.query('commit');
    client.release();
  };
}

/** Does another connection see the row as locked right now? */
async function lockedElsewhere(id: number): Promise<boolean> {
  try {
    await db.sql.begin((tx) => tx`select 1 from rl_items where id = ${id} for update nowait`);
    return false;
  } catch (err) {
    if ((err as { code?: string }).code === '55P03') return true;
    throw err;
  }
}

const isDrizzle = (name: string) => name.startsWith('drizzle');

describe('withRowLock on every runner kind', () => {
  db.runners.forEach((kind, i) => {
    const id = i + 1;

    it(`locks a raw-SQL row and runs the callback in the same transaction (${kind.name})`, async () => {
      const out = await kind.use((runner) =>
        withRowLock(runner, { table: 'rl_items', key: { id } }, async (row, tx) => {
          expect(await lockedElsewhere(id)).toBe(true);
          await q(tx, 'update rl_items set stock_count = stock_count - 1 where id = $1', [id]);
          return row.stock_count;
        }),
      );
      expect(out).toBe(10);
      expect(await lockedElsewhere(id)).toBe(false);
      const [r] = await db.sql`select stock_count from rl_items where id = ${id}`;
      expect(r!.stock_count).toBe(9);
    });

    it(`tells a missing row from a locked one (${kind.name})`, async () => {
      await expect(kind.use((runner) => withRowLock(runner, { table: 'rl_items', key: { id: 999 } }, () => 1))).rejects.toBeInstanceOf(
        RowNotFoundError,
      );
      await expect(
        kind.use((runner) => withRowLock(runner, { table: 'rl_items', key: { id: 999 } }, () => 1, { wait: 'skipLocked' })),
      ).rejects.toBeInstanceOf(RowNotFoundError);
      const release = await hold(id);
      try {
        await expect(
          kind.use((runner) => withRowLock(runner, { table: 'rl_items', key: { id } }, () => 1, { wait: 'nowait' })),
        ).rejects.toBeInstanceOf(RowLockedError);
        await expect(
          kind.use((runner) => withRowLock(runner, { table: 'rl_items', key: { id } }, () => 1, { wait: 'skipLocked' })),
        ).rejects.toBeInstanceOf(RowLockedError);
        const t0 = performance.now();
        const err = await kind
          .use((runner) => withRowLock(runner, { table: 'rl_items', key: { id } }, () => 1, { timeoutMs: 100 }))
          .catch((e: unknown) => e);
        expect(err).toBeInstanceOf(LockTimeoutError);
        expect(performance.now() - t0).toBeGreaterThanOrEqual(90);
        expect(performance.now() - t0).toBeLessThan(2000);
      } finally {
        await release();
      }
    });

    it(`cancels the server-side wait on abort (${kind.name})`, async () => {
      const release = await hold(id);
      try {
        const ac = new AbortController();
        setTimeout(() => ac.abort(), 80);
        const t0 = performance.now();
        const target = isDrizzle(kind.name) ? { table: items, where: eq(items.id, id) } : { table: 'rl_items', key: { id } };
        const err = await kind
          .use((runner) => withRowLock(runner, target as { table: 'rl_items'; key: { id: number } }, () => 1, { signal: ac.signal }))
          .catch((e: unknown) => e);
        expect(err).toBeInstanceOf(AbortedError);
        expect(performance.now() - t0).toBeLessThan(2000);
        // nothing left waiting on the server
        const waiting =
          await db.sql`select count(*)::int as n from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()`;
        expect(waiting[0]!.n).toBe(0);
      } finally {
        await release();
      }
    });

    if (kind.inTx) {
      it(`leaves the caller's transaction usable after nowait / timeout / abort (${kind.name})`, async () => {
        const release = await hold(id);
        try {
          const settings = await kind.use(async (tx) => {
            await q(tx, "set local lock_timeout = '7s'");
            await expect(withRowLock(tx, { table: 'rl_items', key: { id } }, () => 1, { wait: 'nowait' })).rejects.toBeInstanceOf(
              RowLockedError,
            );
            await expect(withRowLock(tx, { table: 'rl_items', key: { id } }, () => 1, { timeoutMs: 50 })).rejects.toBeInstanceOf(
              LockTimeoutError,
            );
            const ac = new AbortController();
            setTimeout(() => ac.abort(), 30);
            await expect(withRowLock(tx, { table: 'rl_items', key: { id } }, () => 1, { signal: ac.signal })).rejects.toBeInstanceOf(
              AbortedError,
            );
            // a lock with a timeout that succeeds restores the caller's settings
            await withRowLock(tx, { table: 'rl_items', key: { id: id + 20 } }, () => 1, { timeoutMs: 500 });
            return q(tx, "select current_setting('lock_timeout') as lt, current_setting('statement_timeout') as st");
          });
          expect(settings[0]).toEqual({ lt: '7s', st: '0' });
        } finally {
          await release();
        }
      });
    }

    if (isDrizzle(kind.name)) {
      it(`gives typed drizzle rows (${kind.name})`, async () => {
        const row = await kind.use((runner) =>
          withRowLock(runner, { table: items, where: eq(items.id, id + 10) }, async (item, tx) => {
            expect(await lockedElsewhere(id + 10)).toBe(true);
            await q(tx, 'select 1');
            return item;
          }),
        );
        expect(row).toEqual({ id: id + 10, label: `item ${id + 10}`, stockCount: 10 });
        const release = await hold(id + 10);
        try {
          await expect(
            kind.use((runner) => withRowLock(runner, { table: items, where: eq(items.id, id + 10) }, () => 1, { wait: 'nowait' })),
          ).rejects.toBeInstanceOf(RowLockedError);
          await expect(
            kind.use((runner) => withRowLock(runner, { table: items, where: eq(items.id, id + 10) }, () => 1, { wait: 'skipLocked' })),
          ).rejects.toBeInstanceOf(RowLockedError);
          await expect(
            kind.use((runner) => withRowLock(runner, { table: items, where: eq(items.id, id + 10) }, () => 1, { timeoutMs: 60 })),
          ).rejects.toBeInstanceOf(LockTimeoutError);
        } finally {
          await release();
        }
        await expect(
          kind.use((runner) => withRowLock(runner, { table: items, where: eq(items.id, 12345) }, () => 1, { strength: 'key share' })),
        ).rejects.toBeInstanceOf(RowNotFoundError);
      });
    }
  });
});

describe('lockRows', () => {
  it('locks several rows in order inside a caller transaction, skipping locked ones on request', async () => {
    const release = await hold(32);
    try {
      await db.sql.begin(async (tx) => {
        const rows = await lockRows(
          tx,
          { table: 'rl_items', where: { text: 'id between $1 and $2', params: [30, 33] }, orderBy: 'id desc' },
          {
            wait: 'skipLocked',
          },
        );
        expect(rows.map((r) => r.id)).toEqual([33, 31, 30]);
        expect(await lockedElsewhere(31)).toBe(true);
      });
    } finally {
      await release();
    }
  });

  it('gives typed rows for a drizzle tx and refuses a pool', async () => {
    const dz = drizzle(db.sql);
    const rows = await dz.transaction((tx) => lockRows(tx, { table: items, where: eq(items.id, 35) }, { strength: 'share' }));
    expect(rows[0]?.stockCount).toBe(10);
    await expect(lockRows(db.sql, { table: 'rl_items', key: { id: 1 } })).rejects.toBeInstanceOf(NotInTransactionError);
    await expect(lockRows(db.pool, { table: 'rl_items', key: { id: 1 } })).rejects.toBeInstanceOf(NotInTransactionError);
  });
});

describe('claim', () => {
  it('gives concurrent workers disjoint rows without waiting, until the queue is empty', async () => {
    await db.sql`insert into rl_jobs select g, 'mail' from generate_series(1, 30) g`;
    await db.sql`insert into rl_jobs select g, 'sms' from generate_series(31, 35) g`;
    const sqls = Array.from({ length: 5 }, () => db.newSql({ max: 1 }));
    let batches = 0;
    await Promise.all(
      sqls.map(async (s, worker) => {
        for (;;) {
          const n = await claim(
            s,
            { table: 'rl_jobs', where: { text: 'queue = $1 and done_by is null', params: ['mail'] }, orderBy: 'id', limit: 4 },
            async (jobs, tx) => {
              if (jobs.length === 0) return 0;
              await tx`select pg_sleep(0.02)`; // hold the claim while others claim
              await tx`update rl_jobs set done_by = ${worker} where id in ${tx(jobs.map((j) => j.id as number))}`;
              return jobs.length;
            },
          );
          if (n === 0) return;
          batches++;
        }
      }),
    );
    const rows = await db.sql`select done_by, queue from rl_jobs order by id`;
    expect(rows.filter((r) => r.queue === 'mail').every((r) => r.done_by !== null)).toBe(true);
    expect(rows.filter((r) => r.queue === 'sms').every((r) => r.done_by === null)).toBe(true);
    expect(new Set(rows.filter((r) => r.queue === 'mail').map((r) => r.done_by)).size).toBeGreaterThan(1);
    expect(batches).toBeGreaterThanOrEqual(8);
  });

  it('claims from a whole table and from a drizzle table through every runner kind', async () => {
    for (const kind of db.runners) {
      const got = await kind.use((runner) =>
        isDrizzle(kind.name)
          ? claim(runner, { table: items, where: eq(items.label, 'item 40'), limit: 5 }, (rows) => rows.map((r) => r.stockCount))
          : claim(runner, { table: 'rl_items', orderBy: ['id'], limit: 2 }, (rows) => rows.map((r) => r.id)),
      );
      expect(got).toEqual(isDrizzle(kind.name) ? [10] : [1, 2]);
    }
  });
});

describe('bad input', () => {
  const ok = { table: 'rl_items', key: { id: 1 } };
  it('rejects bad identifiers, options and callbacks with typed errors, sending nothing', async () => {
    await expect(withRowLock(db.sql, { table: 'rl_items; drop table rl_items', key: { id: 1 } }, () => 1)).rejects.toBeInstanceOf(
      InvalidIdentifierError,
    );
    await expect(withRowLock(db.sql, { table: 'rl_items', key: { 'id = id or true --': 1 } }, () => 1)).rejects.toBeInstanceOf(
      InvalidIdentifierError,
    );
    await expect(withRowLock(db.sql, { table: 'a.b.c', key: { id: 1 } }, () => 1)).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(withRowLock(db.sql, { ...ok, orderBy: 'id; select 1' }, () => 1)).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(withRowLock(db.sql, { table: 'rl_items' }, () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, ok, () => 1, { strength: 'exclusive' as 'update' })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, ok, () => 1, { wait: 'later' as 'block' })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, ok, () => 1, { wait: 'nowait', timeoutMs: 10 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, ok, () => 1, { timeoutMs: -1 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, ok, () => 1, { signal: {} as AbortSignal })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, ok, 'nope' as unknown as () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, { table: items, where: eq(items.id, 1) }, () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(claim(db.sql, { table: 'rl_jobs', limit: 0 }, () => 1)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(
      claim(db.sql, { table: 'rl_jobs', limit: 1 }, () => 1, { wait: 'block' } as unknown as { strength: 'update' }),
    ).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(withRowLock(db.sql, { table: 'rl_items', where: { text: 'id < $1', params: [5] } }, () => 1)).rejects.toBeInstanceOf(
      InvalidOptionError, // more than one row
    );
  });

  it('timeoutMs: 0 means nowait', async () => {
    const release = await hold(3);
    try {
      await expect(withRowLock(db.sql, { table: 'rl_items', key: { id: 3 } }, () => 1, { timeoutMs: 0 })).rejects.toBeInstanceOf(
        RowLockedError,
      );
    } finally {
      await release();
    }
  });
});

describe('withRowLock with a { write } plan: [BEGIN, lock] then [writes, COMMIT]', () => {
  db.runners.forEach((kind, i) => {
    const id = 20 + i;
    it(`never sells more than the stock under a race (${kind.name})`, async () => {
      const sell = (r: object) =>
        withRowLock(
          r,
          { table: 'rl_items', key: { id } },
          {
            write: async (row, tx) => {
              if (Number(row.stock_count) < 3) return [];
              const h = tx as { unsafe?: (t: string, p: unknown[]) => PromiseLike<unknown> };
              // postgres.js: unawaited queries ride with COMMIT; other handles run them in order
              return [
                typeof h.unsafe === 'function'
                  ? h.unsafe('update rl_items set stock_count = stock_count - 3 where id = $1', [id])
                  : q(tx, 'update rl_items set stock_count = stock_count - 3 where id = $1', [id]),
              ];
            },
          },
        );
      const results = await Promise.all(Array.from({ length: 6 }, () => kind.use(sell)));
      expect(results.filter((r) => r.written.length === 1)).toHaveLength(3);
      expect(results.every((r) => Number(r.row.id) === id)).toBe(true);
      const [row] = await q(db.sql, 'select stock_count from rl_items where id = $1', [id]);
      expect(row!.stock_count).toBe(1);
    });
  });

  it('takes two round trips on a postgres.js pool; a failing write rolls back; a bad write is a typed error', async () => {
    const { sql: counting, writes } = db.countingSql();
    const plan = {
      write: (_row: Record<string, unknown>, tx: { unsafe(t: string, p?: unknown[], o?: object): PromiseLike<unknown> }) => [
        tx.unsafe('update rl_items set stock_count = stock_count - 1 where id = $1', [30], { prepare: true }),
      ],
    };
    await withRowLock(counting, { table: 'rl_items', key: { id: 30 } }, plan as never); // warm-up: statements get prepared
    writes.count = 0;
    const r = await withRowLock(counting, { table: 'rl_items', key: { id: 30 } }, plan as never);
    expect((r as { written: unknown[] }).written).toHaveLength(1);
    expect(writes.count).toBe(2);
    await expect(
      withRowLock(
        counting,
        { table: 'rl_items', key: { id: 30 } },
        {
          write: (_row, tx) => [tx`update rl_items set stock_count = 0 where id = 30`, tx`select 1/0`],
        },
      ),
    ).rejects.toMatchObject({ code: '22012' });
    const [row] = await q(db.sql, 'select stock_count from rl_items where id = 30');
    expect(row!.stock_count).toBe(8);
    await expect(withRowLock(db.sql, { table: 'rl_items', key: { id: 30 } }, { write: () => 5 as never })).rejects.toBeInstanceOf(
      InvalidOptionError,
    );
    await expect(withRowLock(db.sql, { table: 'rl_items', key: { id: 30 } }, { write: 5 } as never)).rejects.toBeInstanceOf(
      InvalidOptionError,
    );
  });
});
