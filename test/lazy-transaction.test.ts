// inLazyTransaction (the seam under idempotency phases): pgcoord's own transaction whose pooled
// connection is reserved by its first statement, not when it starts.
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { drizzle as drizzlePgjs } from 'drizzle-orm/postgres-js';
import type pg from 'pg';
import { describe, expect, it } from 'vitest';
import { inLazyTransaction } from '../src/driver/index.js';
import { guardedUpdate, withLock } from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';
import type postgres from './pgjs.js';

const db = await useTestDb(4);
await db.sql`create table lazy_rows (id serial primary key, note text)`;
await db.sql`create table lazy_accounts (id int primary key, n int not null)`;
await db.sql`insert into lazy_accounts values (1, 0)`;

const kinds = [
  {
    name: 'postgres.js',
    make: () => {
      const sql = db.newSql({ max: 1 });
      return { runner: sql as object, hold: async () => holdPgjs(sql) };
    },
  },
  {
    name: 'pg',
    make: () => {
      const pool = db.newPool({ max: 1 });
      return { runner: pool as object, hold: async () => holdPg(pool) };
    },
  },
  {
    name: 'drizzle postgres-js',
    make: () => {
      const sql = db.newSql({ max: 1 });
      return { runner: drizzlePgjs(sql) as object, hold: async () => holdPgjs(sql) };
    },
  },
  {
    name: 'drizzle node-postgres',
    make: () => {
      const pool = db.newPool({ max: 1 });
      return { runner: drizzlePg(pool) as object, hold: async () => holdPg(pool) };
    },
  },
];

// Take the pool's only connection; the returned function gives it back.
async function holdPgjs(sql: postgres.Sql): Promise<() => void> {
  const reserved = await sql.reserve();
  return () => reserved.release();
}
async function holdPg(pool: pg.Pool): Promise<() => void> {
  const client = await pool.connect();
  return () => client.release();
}

const notes = async (prefix: string) =>
  (await db.sql`select note from lazy_rows where note like ${`${prefix}%`} order by id`).map((r) => r.note);

describe('inLazyTransaction', () => {
  for (const kind of kinds) {
    describe(kind.name, () => {
      it('takes no connection before its first statement (a one-connection pool serves meanwhile)', async () => {
        const { runner, hold } = kind.make();
        const release = await hold(); // the pool's only connection is busy elsewhere
        const done = inLazyTransaction(runner, async () => {
          await sleep(50);
          return 'nothing sent';
        });
        expect(await done).toBe('nothing sent');
        release();
        // a statement after a wait, then the connection is the transaction's
        let release2!: () => void;
        const gate = new Promise<void>((r) => (release2 = r));
        const tx = inLazyTransaction(runner, async (scope) => {
          await gate;
          return scope.call(async (h) => {
            await q(h, 'insert into lazy_rows (note) values ($1)', [`${kind.name} one`]);
            return (await q(h, 'select count(*)::int as n from lazy_rows where note = $1', [`${kind.name} one`]))[0]?.n;
          });
        });
        const other = await q(runner, 'select 2 as two'); // the pool is free while the transaction waits
        expect(Number(other[0]?.two)).toBe(2);
        release2();
        expect(await tx).toBe(1);
        expect(await notes(`${kind.name} one`)).toEqual([`${kind.name} one`]);
      });

      it('commits its statements, and rolls them back on a throw', async () => {
        const { runner } = kind.make();
        const err = await inLazyTransaction(runner, async (scope) => {
          await scope.call((h) => q(h, 'insert into lazy_rows (note) values ($1)', [`${kind.name} rolled back`]));
          throw new Error('no');
        }).catch((e: unknown) => e);
        expect((err as Error).message).toBe('no');
        await inLazyTransaction(runner, async (scope) => {
          await scope.conn.send([{ text: 'insert into lazy_rows (note) values ($1)', params: [`${kind.name} kept (conn)`] }]);
          await scope.call((h) => q(h, 'insert into lazy_rows (note) values ($1)', [`${kind.name} kept (handle)`]));
        });
        expect(await notes(`${kind.name} rolled`)).toEqual([]);
        expect(await notes(`${kind.name} kept`)).toEqual([`${kind.name} kept (conn)`, `${kind.name} kept (handle)`]);
      });

      it('a pgcoord call as the first statement joins it (and rolls back with it)', async () => {
        const { runner } = kind.make();
        const before = Number((await db.sql`select n from lazy_accounts where id = 1`)[0]?.n);
        await inLazyTransaction(runner, async (scope) => {
          await scope.call(async (h) => {
            const r = await guardedUpdate(h as object, { table: 'lazy_accounts', key: { id: 1 }, set: 'n = n + 1', guard: 'true' });
            expect(r.status).toBe('applied');
            await withLock(h as object, `lazy-${kind.name}`, async () => {});
          });
          throw new Error('undo');
        }).catch(() => {});
        expect(Number((await db.sql`select n from lazy_accounts where id = 1`)[0]?.n)).toBe(before);
      });

      it('a reservation still pending when the transaction ends goes back to the pool', async () => {
        const { runner, hold } = kind.make();
        const release = await hold();
        let late: Promise<unknown> | undefined;
        await inLazyTransaction(runner, async (scope) => {
          // issued, not awaited: waits for the busy connection
          late = scope.call((h) => q(h, 'select 1')).catch((e: unknown) => e);
        });
        release();
        const err = (await late) as { code?: string; cause?: { code?: string } };
        expect(err.code ?? err.cause?.code).toBe('PGCOORD_CONNECTION_LOST'); // (drizzle wraps it)
        // the pool's one connection is free again
        expect(Number((await q(runner, 'select 3 as three'))[0]?.three)).toBe(3);
      });
    });
  }

  it('postgres.js: statements issued before the reservation keep their order and their modifiers, in one transaction', async () => {
    const sql = db.newSql({ max: 1 });
    const out = await inLazyTransaction(sql, (scope) =>
      scope.call(async (tx) => {
        const t = tx as postgres.TransactionSql;
        const [a, b, c] = await Promise.all([
          t`insert into lazy_rows (note) values ('pgjs order 1') returning txid_current()::text as x`,
          t`insert into lazy_rows (note) values ('pgjs order 2') returning txid_current()::text as x`.values(),
          t.unsafe('select txid_current()::text as x'),
        ]);
        const seen: number[] = [];
        await t`select generate_series(1, 3) as n`.forEach((row) => {
          seen.push(Number(row.n));
        });
        const batches: number[] = [];
        for await (const rows of t`select generate_series(1, 4) as n`.cursor(2)) batches.push(rows.length);
        return { ids: [a[0]?.x, (b[0] as unknown[])[0], c[0]?.x], seen, batches };
      }),
    );
    expect(new Set(out.ids).size).toBe(1); // one transaction
    expect(out.seen).toEqual([1, 2, 3]);
    expect(out.batches).toEqual([2, 2]);
    expect(await notes('pgjs order')).toEqual(['pgjs order 1', 'pgjs order 2']);
  });

  it('pg: queries issued before the checkout keep their order, in one transaction', async () => {
    const pool = db.newPool({ max: 1 });
    const ids = await inLazyTransaction(pool, (scope) =>
      scope.call(async (client) => {
        const c = client as pg.PoolClient;
        const rs = await Promise.all([
          c.query(`insert into lazy_rows (note) values ('pg order 1') returning txid_current()::text as x`),
          c.query(`insert into lazy_rows (note) values ('pg order 2') returning txid_current()::text as x`),
        ]);
        return rs.map((r) => r.rows[0]?.x);
      }),
    );
    expect(new Set(ids).size).toBe(1);
    expect(await notes('pg order')).toEqual(['pg order 1', 'pg order 2']);
  });
});
