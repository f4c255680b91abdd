import { beforeAll, describe, expect, it } from 'vitest';
import { inTransaction } from '../src/driver/index.js';
import { CommitUnknownError, ConnectionLostError, InvalidOptionError, transaction } from '../src/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb(4);

beforeAll(async () => {
  await db.sql`create table tx_rows (who text)`;
});

const rows = async (who: string) => (await db.sql`select who from tx_rows where who like ${`${who}%`} order by who`).map((r) => r.who);

describe('transaction()', () => {
  for (const kind of db.runners) {
    it(`commits, rolls back and applies the isolation level through ${kind.name}`, async () => {
      const tag = `t-${kind.name}-`;
      const level = await kind.use((runner) =>
        transaction(runner, async (tx) => {
          await q(tx, 'insert into tx_rows values ($1)', [`${tag}a`]);
          return (await q(tx, 'show transaction_isolation'))[0]!.transaction_isolation;
        }),
      );
      // a caller's transaction is joined (its own level stays), pgcoord's own gets the level asked
      expect(level).toBe(kind.inTx ? 'read committed' : 'read committed');
      if (!kind.inTx) {
        const serial = await kind.use((runner) =>
          transaction(runner, async (tx) => (await q(tx, 'show transaction_isolation'))[0]!.transaction_isolation, {
            isolation: 'serializable',
          }),
        );
        expect(serial).toBe('serializable');
        // the first statement of the callback already runs inside the transaction (lazy BEGIN)
        await expect(
          kind.use((runner) =>
            transaction(runner, async (tx) => {
              await q(tx, 'insert into tx_rows values ($1)', [`${tag}b`]);
              throw new Error('undo');
            }),
          ),
        ).rejects.toThrow('undo');
      }
      expect(await rows(tag)).toEqual([`${tag}a`]);
    });
  }

  it('refuses a bad isolation level and a statement after the transaction ended', async () => {
    await expect(transaction(db.sql, () => 1, { isolation: 'sloppy' as never })).rejects.toBeInstanceOf(InvalidOptionError);
    let escaped: unknown;
    await transaction(db.sql, async (tx) => {
      escaped = tx;
      await tx`select 1`;
    });
    await expect((async () => (escaped as typeof db.sql)`select 1`)()).rejects.toBeInstanceOf(ConnectionLostError);
  });

  it("gives a postgres.js caller the reserved handle's members, guarded, detached use included, and no release()", async () => {
    type Handle = typeof db.sql & { release?: unknown };
    let escaped: Handle | undefined;
    const out = await transaction(db.sql, async (tx) => {
      const h = tx as unknown as Handle;
      escaped = h;
      expect(h.release).toBeUndefined();
      const { unsafe, json } = h; // members work detached, as drizzle and destructuring callers use them
      // (no sql.array: postgres.js 4 removed it, and the handle has what the driver has)
      const [row] = await h`select ${json({ a: 1 })}::jsonb as j, ${[1, 2]}::int[] as a, ${h.typed(7, 23)} as t`;
      const [one] = await unsafe('select 1 as one');
      return { row, one, types: h.types === (escaped as { typed?: unknown }).typed && typeof h.types === 'function' };
    });
    expect(out).toEqual({ row: { j: { a: 1 }, a: [1, 2], t: 7 }, one: { one: 1 }, types: true });
    // every member that sends a statement refuses once the transaction is over
    const h = escaped as Handle;
    const { unsafe, notify } = h;
    await expect((async () => unsafe('select 1'))()).rejects.toBeInstanceOf(ConnectionLostError);
    await expect((async () => notify('pgcoord_test', 'x'))()).rejects.toBeInstanceOf(ConnectionLostError);
    await expect((async () => h.file('/dev/null'))()).rejects.toBeInstanceOf(ConnectionLostError);
  });

  it('rolls back and gives the connection back when a callback throws synchronously', async () => {
    const one = db.newSql({ max: 1 });
    for (let i = 0; i < 3; i++) {
      const err = await transaction(one, (tx) => {
        void tx`insert into tx_rows values ('sync-throw')`; // issued, then the callback throws
        throw new Error(`boom ${i}`);
      }).catch((e: unknown) => e);
      expect((err as Error).message).toBe(`boom ${i}`);
    }
    // the single connection served every attempt and serves again: nothing held, nothing committed
    expect(await one`select 1 as one`).toEqual([{ one: 1 }]);
    expect(await rows('sync-throw')).toEqual([]);
  });
});

describe('COMMIT in the same round trip (send with commit)', () => {
  for (const [name, runner] of [
    ['postgres.js', db.sql],
    ['pg', db.pool],
  ] as const) {
    it(`commits the batch once and skips the final COMMIT through ${name}`, async () => {
      await inTransaction(runner, {}, async (scope) => {
        await scope.conn.send([{ text: 'insert into tx_rows values ($1)', params: [`c-${name}-1`] }], undefined, { commit: true });
        await expect(scope.conn.send([{ text: 'select 1' }])).rejects.toBeInstanceOf(ConnectionLostError);
      });
      expect(await rows(`c-${name}`)).toEqual([`c-${name}-1`]);
      // an error in the batch rolls back everything, COMMIT included
      await expect(
        inTransaction(runner, {}, async (scope) => {
          await scope.conn.send([{ text: 'insert into tx_rows values ($1)', params: [`c-${name}-2`] }, { text: 'select 1/0' }], undefined, {
            commit: true,
          });
        }),
      ).rejects.toMatchObject({ code: '22012' });
      expect(await rows(`c-${name}`)).toEqual([`c-${name}-1`]);
    });

    it(`reports a connection lost with COMMIT queued as CommitUnknownError, or as lost when COMMIT was never sent, through ${name}`, async () => {
      const err = await inTransaction(runner, {}, async (scope) => {
        await scope.conn.send([{ text: 'insert into tx_rows values ($1)', params: [`u-${name}`] }]);
        await scope.conn.send([{ text: 'select pg_terminate_backend(pg_backend_pid())' }], undefined, { commit: true });
      }).catch((e) => e);
      // postgres.js had COMMIT on the wire behind the dying statement: its fate is unknown. pg sends
      // one statement at a time and never sent COMMIT: it certainly did not commit.
      expect(err).toBeInstanceOf(name === 'pg' ? ConnectionLostError : CommitUnknownError);
      expect(err.code).toBe(name === 'pg' ? 'PGCOORD_CONNECTION_LOST' : 'PGCOORD_COMMIT_UNKNOWN');
      expect(await rows(`u-${name}`)).toEqual([]); // here the backend died before COMMIT ran
      expect(await transaction(runner, () => 'pool still serves')).toBe('pool still serves');
    });
  }
});
