import { eq } from 'drizzle-orm';
import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  AbortedError,
  InvalidIdentifierError,
  InvalidOptionError,
  RowNotFoundError,
  updateVersioned,
  VersionConflictError,
} from '../src/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb();

const docs = pgTable('op_docs', {
  id: integer('id').primaryKey(),
  bodyText: text('body_text').notNull(),
  rev: integer('rev').notNull(),
});

beforeAll(async () => {
  await db.sql`create table op_docs (id int primary key, body_text text not null, rev int not null default 0)`;
  await db.sql`insert into op_docs (id, body_text) select g, 'v0' from generate_series(1, 40) g`;
});

const isDrizzle = (name: string) => name.startsWith('drizzle');

describe('updateVersioned on every runner kind', () => {
  db.runners.forEach((kind, i) => {
    const id = i + 1;
    it(`updates only at the expected version, bumps it, returns the new row (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        const row = await updateVersioned(runner, { table: 'op_docs', key: { id }, set: { body_text: 'v1' }, version: 'rev', expected: 0 });
        expect(row).toEqual({ id, body_text: 'v1', rev: 1 });
        const stale = await updateVersioned(runner, {
          table: 'op_docs',
          key: { id },
          set: { body_text: 'lost' },
          version: 'rev',
          expected: 0,
        }).catch((e: unknown) => e);
        expect(stale).toBeInstanceOf(VersionConflictError);
        expect(stale).toMatchObject({ code: 'PGCOORD_VERSION_CONFLICT', expected: 0, current: 1 });
        await expect(
          updateVersioned(runner, { table: 'op_docs', key: { id: 999 }, set: { body_text: 'x' }, version: 'rev', expected: 0 }),
        ).rejects.toBeInstanceOf(RowNotFoundError);
        // a conflict is an answer, not an SQL error: a caller's transaction stays usable
        if (kind.inTx) expect(await q(runner, 'select 1 as one')).toEqual([{ one: 1 }]);
      });
      const [r] = await db.sql`select body_text, rev from op_docs where id = ${id}`;
      expect(r).toEqual({ body_text: 'v1', rev: 1 });
    });

    if (isDrizzle(kind.name)) {
      it(`gives typed rows for a drizzle table (${kind.name})`, async () => {
        const did = id + 20;
        await kind.use(async (runner) => {
          const row = await updateVersioned(runner, {
            table: docs,
            where: eq(docs.id, did),
            set: { bodyText: 'typed' },
            version: docs.rev,
            expected: 0,
          });
          expect(row).toEqual({ id: did, bodyText: 'typed', rev: 1 });
          const stale = await updateVersioned(runner, {
            table: docs,
            where: eq(docs.id, did),
            set: { bodyText: 'lost' },
            version: docs.rev,
            expected: 0,
          }).catch((e: unknown) => e);
          expect(stale).toMatchObject({ code: 'PGCOORD_VERSION_CONFLICT', expected: 0, current: 1 });
          await expect(
            updateVersioned(runner, { table: docs, where: eq(docs.id, 999), set: { bodyText: 'x' }, version: docs.rev, expected: 0 }),
          ).rejects.toBeInstanceOf(RowNotFoundError);
        });
      });
    }
  });
});

describe('concurrent writers with the same version', () => {
  it('lets exactly one of 12 win; the others get a conflict with the new version', async () => {
    const results = await Promise.allSettled(
      Array.from({ length: 12 }, (_, w) =>
        updateVersioned(w % 2 ? db.sql : db.pool, {
          table: 'op_docs',
          key: { id: 30 },
          set: { body_text: `writer ${w}` },
          version: 'rev',
          expected: 0,
        }),
      ),
    );
    const won = results.filter((r) => r.status === 'fulfilled');
    const lost = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
    expect(won).toHaveLength(1);
    expect(lost).toHaveLength(11);
    for (const r of lost) expect(r.reason).toMatchObject({ code: 'PGCOORD_VERSION_CONFLICT', current: 1 });
    const [row] = await db.sql`select rev from op_docs where id = 30`;
    expect(row!.rev).toBe(1);
  });
});

describe('updateVersioned bad input', () => {
  it('rejects bad identifiers and options with typed errors', async () => {
    const base = { table: 'op_docs', key: { id: 1 }, set: { body_text: 'x' }, version: 'rev', expected: 1 };
    await expect(updateVersioned(db.sql, { ...base, table: 'op_docs--' })).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(updateVersioned(db.sql, { ...base, version: 'rev + 1' })).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(updateVersioned(db.sql, { ...base, set: { 'body_text = 1, rev': 1 } })).rejects.toBeInstanceOf(InvalidIdentifierError);
    await expect(updateVersioned(db.sql, { ...base, set: { rev: 5 } })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, { ...base, expected: 1.5 })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, { ...base, expected: 'one' })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, { ...base, set: null as unknown as {} })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, { ...base, set: { body_text: undefined } })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, base, { signal: 'x' as unknown as AbortSignal })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, base, { readOnly: 'yes' as unknown as boolean })).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, base, null as never)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(updateVersioned(db.sql, base, { signal: AbortSignal.abort() })).rejects.toBeInstanceOf(AbortedError);
    await expect(
      updateVersioned(db.sql, { table: docs, where: eq(docs.id, 1), set: { bodyText: 'x' }, version: docs.rev, expected: 1 }),
    ).rejects.toBeInstanceOf(InvalidOptionError);
    const { drizzle } = await import('drizzle-orm/postgres-js');
    const dz = drizzle(db.sql);
    await expect(
      updateVersioned(dz, { table: docs, where: eq(docs.id, 2), set: { rev: 3 }, version: docs.rev, expected: 0 }),
    ).rejects.toBeInstanceOf(InvalidOptionError);
  });
});
