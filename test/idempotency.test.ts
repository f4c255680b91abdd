// The framework-free wrapper, migrations and purge, on a real PostgreSQL, through postgres.js,
// drizzle (both drivers) and pg.
import { describe, expect, it } from 'vitest';
import {
  FinalFailure,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyMismatchError,
  IdempotencyNotMigratedError,
  IdempotencyScopeRequiredError,
  IdempotentFailureError,
  idempotent,
  migrate,
  purgeExpired,
} from '../src/idempotency/index.js';
import { InvalidOptionError } from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(16);
const table = { schema: 'idem_core', table: 'keys' };
const T = '"idem_core"."keys"';

describe('migrate', () => {
  it('applies the shipped migrations once, under concurrent deploys', async () => {
    const results = await Promise.all(Array.from({ length: 6 }, (_, i) => migrate(i % 2 ? db.sql : db.pool, table)));
    expect(results.flatMap((r) => r.applied)).toEqual(['0000_idempotency_keys']);
    expect(results.flatMap((r) => r.skipped)).toHaveLength(5);
    const rows = await db.sql`select target, id from pgcoord.__migrations`;
    expect(rows.map((r) => `${r.target} ${r.id}`)).toEqual(['idempotency:idem_core.keys 0000_idempotency_keys']);
    const [t] = await db.sql`select relpersistence from pg_class where oid = 'idem_core.keys'::regclass`;
    expect(t?.relpersistence).toBe('p'); // never UNLOGGED
  });

  it('rejects bad names with a typed error', async () => {
    await expect(migrate(db.sql, { schema: 'Bad-Name' })).rejects.toBeInstanceOf(InvalidOptionError);
  });
});

const runners = db.runners.filter((r) =>
  ['postgres.js sql', 'drizzle postgres-js db', 'drizzle node-postgres db', 'pg Pool'].includes(r.name),
);

describe('idempotent(), transactional', () => {
  for (const kind of runners) {
    it(`50 parallel calls with one key run the handler once (${kind.name})`, async () => {
      await kind.use(async (runner) => {
        const key = `k-${kind.name}`;
        let runs = 0;
        const results = await Promise.all(
          Array.from({ length: 50 }, () =>
            idempotent(runner, { scope: 'tenant-a', key, request: { amount: 200 }, table, waitMs: 20_000 }, async (ctx) => {
              runs++;
              await q(ctx.tx, 'select pg_sleep(0.05)');
              return { charged: 200, attempt: ctx.attempt };
            }),
          ),
        );
        expect(runs).toBe(1);
        expect(results.filter((r) => !r.replayed)).toHaveLength(1);
        for (const r of results) expect(r.value).toEqual({ charged: 200, attempt: 1 });
      });
    });
  }

  it('commits the handler writes with the stored result, and rolls both back on a throw', async () => {
    await db.sql`create table if not exists idem_ledger (id serial primary key, note text)`;
    await expect(
      idempotent(db.sql, { scope: 's', key: 'tx-1', table }, async ({ tx }) => {
        await q(tx, `insert into idem_ledger (note) values ('failed')`);
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(await db.sql`select * from idem_ledger`).toHaveLength(0);
    expect(await db.sql.unsafe(`select * from ${T} where key = 'tx-1'`)).toHaveLength(0); // retryable: nothing left
    const r = await idempotent(db.sql, { scope: 's', key: 'tx-1', table }, async ({ tx }) => {
      await q(tx, `insert into idem_ledger (note) values ('ok')`);
      return 'done';
    });
    expect(r).toEqual({ value: 'done', replayed: false });
    expect((await db.sql`select note from idem_ledger`).map((x) => x.note)).toEqual(['ok']);
  });

  it('joins a caller transaction, and leaves it usable after a failure', async () => {
    await db.sql.begin(async (tx) => {
      await expect(
        idempotent(tx, { scope: 's', key: 'join-1', table }, async () => {
          throw new Error('no');
        }),
      ).rejects.toThrow('no');
      const r = await idempotent(tx, { scope: 's', key: 'join-1', table }, () => 7);
      expect(r.value).toBe(7);
      const again = await idempotent(tx, { scope: 's', key: 'join-1', table }, () => 8);
      expect(again).toEqual({ value: 7, replayed: true });
    });
  });

  it('refuses a different request under the same key (mismatch), replays nothing across scopes', async () => {
    await idempotent(db.sql, { scope: 'a', key: 'm-1', request: { amount: 1 }, table }, () => 'a1');
    await expect(idempotent(db.sql, { scope: 'a', key: 'm-1', request: { amount: 2 }, table }, () => 'x')).rejects.toBeInstanceOf(
      IdempotencyMismatchError,
    );
    // key order does not matter (RFC 8785)
    const same = await idempotent(db.sql, { scope: 'a', key: 'm-1', request: { amount: 1 }, table }, () => 'x');
    expect(same).toEqual({ value: 'a1', replayed: true });
    const other = await idempotent(db.sql, { scope: 'b', key: 'm-1', request: { amount: 2 }, table }, () => 'b1');
    expect(other).toEqual({ value: 'b1', replayed: false });
  });

  it('stores a FinalFailure and replays it as the same error', async () => {
    let runs = 0;
    const call = () =>
      idempotent(db.sql, { scope: 's', key: 'final-1', table }, () => {
        runs++;
        throw new FinalFailure({ error: 'card_declined' }, { status: 402 });
      });
    const first = await call().catch((e) => e);
    const second = await call().catch((e) => e);
    expect(runs).toBe(1);
    for (const e of [first, second]) {
      expect(e).toBeInstanceOf(IdempotentFailureError);
      expect(e.status).toBe(402);
      expect(e.body).toEqual({ error: 'card_declined' });
    }
    expect([first.replayed, second.replayed]).toEqual([false, true]);
  });

  it('answers in flight at once with waitMs: 0', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const first = idempotent(db.sql, { scope: 's', key: 'busy-1', table }, async () => {
      await gate;
      return 1;
    });
    await sleep(100);
    const err = await idempotent(db.sql, { scope: 's', key: 'busy-1', table, waitMs: 0 }, () => 2).catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyInFlightError);
    expect(err.code).toBe('PGCOORD_IDEMPOTENCY_IN_FLIGHT');
    expect(err.retryAfterMs).toBeGreaterThan(0);
    release();
    expect((await first).value).toBe(1);
  });

  it('decide("retryable") returns the value without storing it', async () => {
    let runs = 0;
    const call = () =>
      idempotent(db.sql, { scope: 's', key: 'retry-1', table }, (ctx) => {
        runs++;
        ctx.decide('retryable');
        return runs;
      });
    expect((await call()).value).toBe(1);
    expect((await call()).value).toBe(2);
  });
});

describe('bad input', () => {
  const ok = { scope: 's', key: 'k', table };
  const cases: [string, object, new (...a: never[]) => Error, string][] = [
    ['no scope', { key: 'k', table }, IdempotencyScopeRequiredError, 'PGCOORD_IDEMPOTENCY_SCOPE_REQUIRED'],
    ['empty key', { ...ok, key: '' }, IdempotencyKeyInvalidError, 'PGCOORD_IDEMPOTENCY_KEY_INVALID'],
    ['long key', { ...ok, key: 'x'.repeat(256) }, IdempotencyKeyInvalidError, 'PGCOORD_IDEMPOTENCY_KEY_INVALID'],
    ['control chars', { ...ok, key: 'a\nb' }, IdempotencyKeyInvalidError, 'PGCOORD_IDEMPOTENCY_KEY_INVALID'],
    ['number key', { ...ok, key: 5 }, IdempotencyKeyInvalidError, 'PGCOORD_IDEMPOTENCY_KEY_INVALID'],
    ['bad mode', { ...ok, mode: 'fast' }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
    ['bad lease', { ...ok, leaseMs: -1 }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
    ['heartbeat >= lease', { ...ok, mode: 'phased', leaseMs: 1000, heartbeatMs: 1000 }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
    ['bad wait', { ...ok, waitMs: 1.5 }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
    ['bad table', { ...ok, table: { table: 'x; drop' } }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
    ['NaN request', { ...ok, request: { a: Number.NaN } }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
    ['bad fingerprint', { ...ok, fingerprint: 'abc' }, InvalidOptionError, 'PGCOORD_INVALID_OPTION'],
  ];
  for (const [name, options, type, code] of cases) {
    it(`${name} → ${code}`, async () => {
      const err = await idempotent(db.sql, options as never, () => 1).catch((e) => e);
      expect(err).toBeInstanceOf(type);
      expect(err.code).toBe(code);
    });
  }

  it('unscoped: true opts out of the scope', async () => {
    const r = await idempotent(db.sql, { unscoped: true, key: 'u-1', table }, () => 'u');
    expect(r.value).toBe('u');
  });

  it('phased mode refuses a caller transaction', async () => {
    const err = await db.sql.begin((tx) => idempotent(tx, { ...ok, mode: 'phased' }, () => 1)).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidOptionError);
  });

  it('a missing table is a typed error that says to migrate', async () => {
    const err = await idempotent(db.sql, { ...ok, table: { schema: 'nowhere', table: 'keys' } }, () => 1).catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyNotMigratedError);
    expect(err.code).toBe('PGCOORD_IDEMPOTENCY_NOT_MIGRATED');
  });
});

describe('purgeExpired', () => {
  it('removes exactly the expired rows, in batches', async () => {
    for (let i = 0; i < 7; i++) await idempotent(db.sql, { scope: 'purge', key: `old-${i}`, table, retentionMs: 1 }, () => i);
    for (let i = 0; i < 3; i++) await idempotent(db.sql, { scope: 'purge', key: `new-${i}`, table }, () => i);
    await sleep(20);
    const before = await db.sql.unsafe(`select count(*)::int as n from ${T}`);
    const r = await purgeExpired(db.sql, { ...table, batchSize: 3 });
    expect(r).toEqual({ deleted: 7, batches: 3 });
    const after = await db.sql.unsafe(`select count(*)::int as n from ${T}`);
    expect(after[0]!.n).toBe(before[0]!.n - 7);
    expect(await db.sql.unsafe(`select key from ${T} where scope = 'purge' order by key`)).toEqual([
      { key: 'new-0' },
      { key: 'new-1' },
      { key: 'new-2' },
    ]);
  });

  it('validates its options', async () => {
    await expect(purgeExpired(db.sql, { ...table, batchSize: 0 })).rejects.toBeInstanceOf(InvalidOptionError);
  });
});
