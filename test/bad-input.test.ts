// Bad input gets a typed error (a PgcoordError with a stable code) before any statement is sent:
// never a TypeError, a driver error, a hang, a leaked connection or a silent wrong answer.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { eq } from 'drizzle-orm';
import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { drizzle } from 'drizzle-orm/postgres-js';
import { beforeAll, describe, expect, it } from 'vitest';
import { CliUsageError, generateMigration, listLocks, purgeWithProgress } from '../src/cli/api.js';
import {
  AbortedError,
  acquireSessionLock,
  claim,
  guardedUpdate,
  InvalidIdentifierError,
  InvalidKeyError,
  InvalidOptionError,
  lockRows,
  type PgcoordError,
  retry,
  transactionWithRetry,
  updateVersioned,
  withLock,
  withRowLock,
} from '../src/index.js';
import { ShapeCache, walkTarget } from '../src/sql-target.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb();

const docs = pgTable('bi_docs', {
  id: integer('id').primaryKey(),
  note: text('note'),
  rev: integer('rev').notNull(),
});

beforeAll(async () => {
  await db.sql`create table bi_docs (id int primary key, note text default 'start', rev int not null default 0)`;
  await db.sql`insert into bi_docs (id) select g from generate_series(1, 40) g`;
  await db.sql`create table bi_log (doc_id int, note text)`;
});

// one connection whose socket writes are counted, shared by every check of this file
const counting = db.countingSql();

const nullProto = () => Object.create(null) as object;

/** The row as it is now: bad calls must leave it exactly so. */
async function row(id: number) {
  const [r] = await q(db.sql, 'select note, rev from bi_docs where id = $1', [id]);
  return r;
}

/**
 * `call` must return a promise (never throw synchronously) that rejects with an instance of
 * `type`, without one socket write (nothing sent), and leave row `id` as it was.
 */
async function refusedBeforeSending(
  call: (sql: object) => Promise<unknown>,
  type: new (...args: never[]) => PgcoordError,
  id = 1,
): Promise<PgcoordError> {
  const { sql, writes } = counting;
  await sql`select 1`; // connected: start-up writes are not the call's
  const before = await row(id);
  const sent = writes.count;
  let pending: Promise<unknown> | undefined;
  expect(() => {
    pending = call(sql);
  }).not.toThrow();
  const err = await (pending as Promise<unknown>).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(type);
  expect(writes.count).toBe(sent);
  expect(await row(id)).toEqual(before);
  return err as PgcoordError;
}

const versioned = (id: number) => ({ table: 'bi_docs', key: { id }, set: { note: 'written' }, version: 'rev', expected: 0 });
const guarded = (id: number) => ({ table: 'bi_docs', key: { id }, set: { note: 'written' }, guard: 'rev = $1', params: [0] });

describe('item 7: every option of guardedUpdate and updateVersioned is checked before a statement is sent', () => {
  const badOptions: [string, unknown][] = [
    ["signal: 'x'", { signal: 'x' }],
    ['signal: {}', { signal: {} }],
    ["isolation: 'chaos'", { isolation: 'chaos' }],
    ['isolation: 5n', { isolation: 5n }],
    ['isolation: null prototype', { isolation: nullProto() }],
    ["readOnly: 'yes'", { readOnly: 'yes' }],
    ['readOnly: 1', { readOnly: 1 }],
    ['null', null],
    ['a number', 5],
  ];
  for (const [name, options] of badOptions) {
    it(`updateVersioned refuses ${name} with InvalidOptionError, the row unwritten`, async () => {
      await refusedBeforeSending((sql) => updateVersioned(sql, versioned(1), options as never), InvalidOptionError);
    });
    it(`guardedUpdate refuses ${name} with InvalidOptionError, the row unwritten`, async () => {
      await refusedBeforeSending((sql) => guardedUpdate(sql, guarded(1), options as never), InvalidOptionError);
    });
  }

  it('an already aborted signal rejects with AbortedError and sends nothing', async () => {
    const signal = AbortSignal.abort();
    await refusedBeforeSending((sql) => updateVersioned(sql, versioned(2), { signal }), AbortedError, 2);
    await refusedBeforeSending((sql) => guardedUpdate(sql, guarded(2), { signal }), AbortedError, 2);
    await refusedBeforeSending(
      (sql) =>
        updateVersioned(
          drizzle(sql as never),
          { table: docs, where: eq(docs.id, 2), set: { note: 'x' }, version: docs.rev, expected: 0 },
          { signal },
        ),
      AbortedError,
      2,
    );
    await refusedBeforeSending((sql) => transactionWithRetry(sql as never, () => 1, { signal }), AbortedError, 2);
    await db.sql.begin(async (tx) => {
      await expect(transactionWithRetry(tx, () => 1, { signal })).rejects.toBeInstanceOf(AbortedError);
    });
  });

  it('transactionWithRetry checks isolation and readOnly before any statement, and null options', async () => {
    for (const options of [{ readOnly: 'yes' }, { isolation: nullProto() }, { isolation: 5n }, null])
      await refusedBeforeSending((sql) => transactionWithRetry(sql as never, () => 1, options as never), InvalidOptionError);
  });

  it('updateVersioned takes a signal: abort cancels the wait for a locked row (raw and drizzle), nothing written', async () => {
    const client = await db.pool.connect();
    try {
      await client.query('begin');
      await client.query('select 1 from bi_docs where id = 3 for update');
      const dz = drizzle(db.sql);
      const attempts = [
        (signal: AbortSignal) => updateVersioned(db.sql, versioned(3), { signal }),
        (signal: AbortSignal) => updateVersioned(db.pool, versioned(3), { signal }),
        (signal: AbortSignal) =>
          updateVersioned(dz, { table: docs, where: eq(docs.id, 3), set: { note: 'x' }, version: docs.rev, expected: 0 }, { signal }),
        // in a caller's transaction: rolled back to a savepoint, the transaction stays usable
        (signal: AbortSignal) =>
          db.sql.begin(async (tx) => {
            const err = await updateVersioned(tx, versioned(3), { signal }).catch((e: unknown) => e);
            expect((await tx`select 1 as one`)[0]?.one).toBe(1);
            throw err;
          }),
        (signal: AbortSignal) =>
          dz.transaction(async (tx) => {
            const err = await updateVersioned(
              tx,
              { table: docs, where: eq(docs.id, 3), set: { note: 'x' }, version: docs.rev, expected: 0 },
              { signal },
            ).catch((e: unknown) => e);
            expect((await tx.select({ id: docs.id }).from(docs).where(eq(docs.id, 1)))[0]?.id).toBe(1);
            throw err;
          }),
      ];
      for (const attempt of attempts) {
        const ac = new AbortController();
        setTimeout(() => ac.abort(), 50);
        await expect(attempt(ac.signal)).rejects.toBeInstanceOf(AbortedError);
      }
    } finally {
      await client.query('rollback');
      client.release();
    }
    expect(await row(3)).toEqual({ note: 'start', rev: 0 });
    // and a live signal that never fires changes nothing
    expect(await updateVersioned(db.sql, versioned(3), { signal: new AbortController().signal })).toMatchObject({
      note: 'written',
      rev: 1,
    });
  });
});

describe('item 9: error messages never throw (BigInt, null prototype, symbols)', () => {
  it('the identifiers, versions and options get the typed error they were meant to get', async () => {
    await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), table: nullProto() as never }), InvalidIdentifierError);
    await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), table: 5n as never }), InvalidIdentifierError);
    await refusedBeforeSending((sql) => updateVersioned(sql, { ...versioned(1), table: nullProto() as never }), InvalidIdentifierError);
    await refusedBeforeSending((sql) => updateVersioned(sql, { ...versioned(1), version: Symbol('v') as never }), InvalidIdentifierError);
    await refusedBeforeSending((sql) => updateVersioned(sql, { ...versioned(1), expected: nullProto() as never }), InvalidOptionError);
    await refusedBeforeSending((sql) => updateVersioned(sql, { ...versioned(1), expected: Symbol('e') as never }), InvalidOptionError);
    await refusedBeforeSending(
      (sql) => withRowLock(sql, { table: 'bi_docs', key: { id: 1 } }, () => 1, { strength: 5n as never }),
      InvalidOptionError,
    );
    await refusedBeforeSending(
      (sql) => withRowLock(sql, { table: 'bi_docs', key: { id: 1 } }, () => 1, { wait: nullProto() as never }),
      InvalidOptionError,
    );
    await refusedBeforeSending(
      (sql) => withRowLock(sql, { table: 'bi_docs', key: { id: 1 } }, () => 1, { timeoutMs: nullProto() as never }),
      InvalidOptionError,
    );
    await refusedBeforeSending((sql) => acquireSessionLock(sql, 'k', { keepaliveMs: nullProto() as never }), InvalidOptionError);
  });

  it('retry options', async () => {
    for (const options of [
      { baseMs: nullProto() },
      { maxMs: Symbol('m') },
      { attempts: nullProto() },
      { deadlineMs: 5n },
      { signal: nullProto() },
    ])
      await expect(retry(() => 1, options as never)).rejects.toBeInstanceOf(InvalidOptionError);
  });

  it('CLI functions: purge and generate options', async () => {
    for (const options of [{ batchSize: Symbol('b') }, { batchSize: nullProto() }, { maxBatches: 5n }, { schema: nullProto() }, null])
      await refusedBeforeSending((sql) => purgeWithProgress(sql, options as never), CliUsageError);
    const dir = mkdtempSync(join(tmpdir(), 'pgcoord-bad-'));
    try {
      for (const options of [{ format: 5n }, { format: nullProto() }, { name: Symbol('n') }, { name: nullProto() }, { table: 5n }])
        await expect(generateMigration({ out: dir, format: 'sql', ...(options as object) })).rejects.toBeInstanceOf(CliUsageError);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('item 11: the statement shape cache is bounded by size', () => {
  it('keeps nothing of 200 one-megabyte fragments', () => {
    const cache = new ShapeCache();
    for (let i = 0; i < 200; i++) {
      const text = `${i} = ${i} and `.padEnd(1024 * 1024, 'x');
      walkTarget(cache, cache.root(), { table: 'bi_docs', key: { id: 1 }, where: { text } }, []);
    }
    expect(cache.retainedChars).toBeLessThan(1000);
  });

  it('keeps at most its character budget of parts and texts, and starts over when full', () => {
    const cache = new ShapeCache(10_000, 100_000);
    for (let i = 0; i < 1000; i++) {
      const node = walkTarget(cache, cache.root(), { table: 'bi_docs', key: { id: 1 }, where: { text: `${i}`.padEnd(1500, ' ') } }, []);
      cache.set(node, [1], { text: `select ${i}`.padEnd(500, ' '), values: [1] });
      expect(cache.retainedChars).toBeLessThanOrEqual(100_000);
    }
    // still a cache: a shape just stored is found
    const again = () => walkTarget(cache, cache.root(), { table: 'bi_docs', key: { id: 1 }, where: { text: 'fresh' } }, []);
    cache.set(again(), [1], { text: 'select fresh', values: [1] });
    expect(cache.get(again())).toBe('select fresh');
  });

  it('a shape too large to keep still runs correctly, every time', async () => {
    const guard = `rev >= $1${' and true'.repeat(500)}`; // 4 000 characters: compiled on each call
    for (const expected of [0, 1]) {
      expect(
        await guardedUpdate(db.sql, { table: 'bi_docs', key: { id: 4 }, set: 'rev = rev + 1', guard, params: [expected] }),
      ).toMatchObject({
        status: 'applied',
        row: { rev: expected + 1 },
      });
    }
    expect(
      await guardedUpdate(db.sql, { table: 'bi_docs', key: { id: 4 }, set: 'rev = rev + 1', guard: `${guard} and false`, params: [0] }),
    ).toEqual({ status: 'guard-failed' });
  });
});

describe('item 12: delays beyond Node timers are refused', () => {
  it('retry baseMs and maxMs above 2147483647', async () => {
    let calls = 0;
    for (const options of [{ baseMs: 3e9 }, { maxMs: 3e9 }, { baseMs: 2 ** 31 }]) {
      await expect(retry(() => calls++, options)).rejects.toBeInstanceOf(InvalidOptionError);
    }
    expect(calls).toBe(0);
    expect(await retry(() => 'ok', { baseMs: 2_147_483_647, maxMs: 2_147_483_647 })).toBe('ok');
  });

  it('session lock keepaliveMs above 2147483647, refused before a connection is pinned', async () => {
    await refusedBeforeSending((sql) => acquireSessionLock(sql, 'bi-keepalive', { keepaliveMs: 2 ** 31 }), InvalidOptionError);
    await refusedBeforeSending((sql) => acquireSessionLock(sql, 'bi-keepalive', { keepaliveMs: 3e9 }), InvalidOptionError);
    // the largest allowed value holds the lock
    const lock = await acquireSessionLock(db.sql, 'bi-keepalive', { keepaliveMs: 2_147_483_647 });
    try {
      await sleep(50);
      expect(lock.signal.aborted).toBe(false);
    } finally {
      await lock.release();
    }
  });
});

describe('item 13: typed errors instead of TypeErrors, driver errors or silent NULLs', () => {
  for (const kind of ['postgres.js', 'pg Pool'] as const) {
    it(`undefined values in set, params, key, where.params and insert.values are refused (${kind}), nothing written`, async () => {
      const runner = kind === 'pg Pool' ? db.pool : db.sql;
      const calls: (() => Promise<unknown>)[] = [
        () => guardedUpdate(runner, { ...guarded(5), set: { note: undefined } }),
        () => guardedUpdate(runner, { ...guarded(5), params: [undefined] }),
        // biome-ignore lint/suspicious/noSparseArray: the hole is the test
        () => guardedUpdate(runner, { ...guarded(5), guard: 'rev = $2', params: [, 0] }),
        () => guardedUpdate(runner, { ...guarded(5), key: { id: undefined } }),
        () => guardedUpdate(runner, { ...guarded(5), insert: { into: 'bi_log', values: { note: undefined }, fromRow: { doc_id: 'id' } } }),
        () => updateVersioned(runner, { ...versioned(5), set: { note: undefined } }),
        () => updateVersioned(runner, { ...versioned(5), key: undefined, where: { text: 'id = $1', params: [undefined] } }),
        () => updateVersioned(runner, { ...versioned(5), insert: { into: 'bi_log', values: { note: undefined } } }),
      ];
      for (const call of calls) await expect(call()).rejects.toBeInstanceOf(InvalidOptionError);
      expect(await row(5)).toEqual({ note: 'start', rev: 0 });
      expect(await q(db.sql, 'select count(*)::int as n from bi_log')).toEqual([{ n: 0 }]);
    });
  }

  it('claim with a limit that is not a safe integer (1e21)', async () => {
    for (const limit of [1e21, 2 ** 53, nullProto(), 5n]) {
      await refusedBeforeSending((sql) => claim(sql, { table: 'bi_docs', limit: limit as number }, () => 1), InvalidOptionError);
    }
  });

  it('a sparse orderBy array (it made \'order by , "id"\')', async () => {
    // biome-ignore lint/suspicious/noSparseArray: the hole is the test
    const orderBy = [, 'id'] as string[];
    await refusedBeforeSending((sql) => claim(sql, { table: 'bi_docs', orderBy, limit: 1 }, () => 1), InvalidIdentifierError);
    await db.sql.begin(async (tx) => {
      await expect(lockRows(tx, { table: 'bi_docs', key: { id: 1 }, orderBy })).rejects.toBeInstanceOf(InvalidIdentifierError);
    });
    await refusedBeforeSending(
      (sql) => claim(sql, { table: 'bi_docs', orderBy: `${'id'.padEnd(10 * 1024 * 1024, ' ')}desc`, limit: 1 }, () => 1),
      InvalidIdentifierError,
    );
  });

  it('null-prototype table objects', async () => {
    await refusedBeforeSending((sql) => withRowLock(sql, { table: nullProto() as never, key: { id: 1 } }, () => 1), InvalidIdentifierError);
    await refusedBeforeSending((sql) => claim(sql, { table: nullProto() as never, limit: 1 }, () => 1), InvalidIdentifierError);
    await refusedBeforeSending((sql) => updateVersioned(sql, { ...versioned(1), table: nullProto() as never }), InvalidIdentifierError);
    const dz = drizzle(db.sql);
    await expect(
      updateVersioned(dz, { table: docs, where: nullProto() as never, set: { note: 'x' }, version: docs.rev, expected: 0 }),
    ).rejects.toBeInstanceOf(InvalidOptionError);
  });

  it('listLocks options: names that are not an iterable of candidates', async () => {
    for (const options of [{ names: 5 }, { names: 'order:1' }, { names: nullProto() }, null, 7])
      await refusedBeforeSending((sql) => listLocks(sql, options as never), InvalidOptionError);
    for (const names of [[null], [5], [{ name: 5n }], [{ name: 'a\0b' }], [{ name: 'k\uD800' }], [{ namespace: nullProto(), name: 'x' }]])
      await refusedBeforeSending((sql) => listLocks(sql, { names: names as never }), InvalidKeyError);
  });

  it('generateMigration(null) and odd folders', async () => {
    await expect(generateMigration(null as never)).rejects.toBeInstanceOf(CliUsageError);
    await expect(generateMigration(5 as never)).rejects.toBeInstanceOf(CliUsageError);
    for (const out of [5, nullProto(), '', 'dir\0x', 'dir\uD800'])
      await expect(generateMigration({ out: out as never, format: 'sql' })).rejects.toBeInstanceOf(CliUsageError);
    await expect(generateMigration({ cwd: 'a\0b', format: 'sql' })).rejects.toBeInstanceOf(CliUsageError);
  });

  it('purgeWithProgress: dryRun, onBatch and signal of the wrong type', async () => {
    for (const options of [{ dryRun: 'false' }, { onBatch: 'log' }, { signal: {} }])
      await refusedBeforeSending((sql) => purgeWithProgress(sql, options as never), CliUsageError);
  });
});

describe('ill-formed unicode, NUL and huge values in keys, identifiers and SQL fragments', () => {
  const huge = 'x'.repeat(10 * 1024 * 1024);

  it('a 10 MB key or identifier is refused at once, with a short message', async () => {
    const started = performance.now();
    const errors = [
      await refusedBeforeSending((sql) => withLock(sql, huge, () => 1), InvalidKeyError),
      await refusedBeforeSending((sql) => withLock(sql, { namespace: huge, name: 'k' }, () => 1), InvalidKeyError),
      await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), table: huge }), InvalidIdentifierError),
      await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), key: { [huge]: 1 } }), InvalidIdentifierError),
      await refusedBeforeSending((sql) => updateVersioned(sql, { ...versioned(1), set: { [huge]: 1 } }), InvalidIdentifierError),
      await refusedBeforeSending((sql) => withRowLock(sql, { table: 'bi_docs', key: { [huge]: 1 } }, () => 1), InvalidIdentifierError),
      await generateMigration({ out: join(tmpdir(), 'never'), table: huge, format: 'sql' }).then(
        () => new Error('not refused'),
        (e: PgcoordError) => e,
      ),
    ];
    expect(errors.at(-1)).toBeInstanceOf(CliUsageError);
    expect(performance.now() - started).toBeLessThan(5000);
    for (const err of errors) expect(err.message.length).toBeLessThan(400);
  });

  it('NUL and lone surrogates in keys, identifiers and SQL fragments', async () => {
    for (const bad of ['k\0', 'k\uD800', 'k\uDFFF']) {
      await refusedBeforeSending((sql) => withLock(sql, bad, () => 1), InvalidKeyError);
      await refusedBeforeSending((sql) => acquireSessionLock(sql, { namespace: bad, name: 'x' }), InvalidKeyError);
      await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), table: bad }), InvalidIdentifierError);
      await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), guard: `note <> '${bad}'` }), InvalidOptionError);
      await refusedBeforeSending((sql) => guardedUpdate(sql, { ...guarded(1), set: `note = '${bad}'` }), InvalidOptionError);
      await refusedBeforeSending(
        (sql) => updateVersioned(sql, { ...versioned(1), key: undefined, where: { text: `id = 1 and note <> '${bad}'` } }),
        InvalidOptionError,
      );
      await refusedBeforeSending(
        (sql) => withRowLock(sql, { table: 'bi_docs', where: { text: `id = 1 and note <> '${bad}'` } }, () => 1),
        InvalidOptionError,
      );
    }
  });
});
