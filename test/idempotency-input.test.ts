// The wrapper's input edges on a real PostgreSQL: identities that would collide on the server
// (lone surrogates, NUL), fingerprints that must tell different requests apart, results that
// cannot be stored (the attempt must still end: no stuck key, no leaked connection), and the
// migration's NOTICEs.
import { describe, expect, it, vi } from 'vitest';
import {
  canonicalJson,
  FinalFailure,
  fingerprintOf,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyScopeInvalidError,
  idempotent,
  migrate,
  phaseKey,
  requestFingerprint,
} from '../src/idempotency/index.js';
import { InvalidOptionError } from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(8);
const table = { schema: 'idem_input', table: 'keys' };
await migrate(db.sql, table);

/** Connections of this file's database left 'idle in transaction' (polls briefly: a ROLLBACK may be on its way). */
async function idleInTransaction(): Promise<number> {
  let n = 0;
  for (let i = 0; i < 20; i++) {
    const [row] = await db.sql`select count(*)::int as n from pg_stat_activity
      where datname = current_database() and state like 'idle in transaction%'`;
    n = row!.n as number;
    if (n === 0) return 0;
    await sleep(50);
  }
  return n;
}

describe('identities that would collide on the server are refused before any statement', () => {
  const bad: [string, string][] = [
    ['a lone high surrogate', 'tenant\uD800'],
    ['a lone low surrogate', 'tenant\uDFFF'],
    ['NUL', 'ten\0ant'],
  ];

  it('a scope with a lone surrogate does not replay the U+FFFD scope (cross-tenant)', async () => {
    const first = await idempotent(db.sql, { scope: 'tenant\uFFFD', key: 'k-cross', table }, () => 'tenant \\uFFFD result');
    expect(first.replayed).toBe(false);
    const err = await idempotent(db.sql, { scope: 'tenant\uD800', key: 'k-cross', table }, () => 'other tenant').catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyScopeInvalidError);
    expect(err.code).toBe('PGCOORD_IDEMPOTENCY_SCOPE_INVALID');
    expect(err.status).toBe(400);
  });

  for (const [what, text] of bad) {
    it(`scope with ${what} → PGCOORD_IDEMPOTENCY_SCOPE_INVALID, nothing sent`, async () => {
      const { sql, writes } = db.countingSql();
      const err = await idempotent(sql, { scope: text, key: 'k', table }, () => 1).catch((e) => e);
      expect(err).toBeInstanceOf(IdempotencyScopeInvalidError);
      expect(writes.count).toBe(0);
    });

    it(`key with ${what} → PGCOORD_IDEMPOTENCY_KEY_INVALID, nothing sent`, async () => {
      const { sql, writes } = db.countingSql();
      const err = await idempotent(sql, { scope: 's', key: `key-${text}`, table }, () => 1).catch((e) => e);
      expect(err).toBeInstanceOf(IdempotencyKeyInvalidError);
      expect(err.code).toBe('PGCOORD_IDEMPOTENCY_KEY_INVALID');
      expect(writes.count).toBe(0);
    });

    it(`phase name with ${what} is refused before the phase runs (phased and transactional)`, async () => {
      for (const mode of ['phased', 'transactional'] as const) {
        let ran = false;
        const err = await idempotent(db.sql, { scope: 's', key: `phase-${mode}-${what}`, table, mode }, async (ctx) => {
          await ctx.phase(`ship-${text}`, () => {
            ran = true;
          });
        }).catch((e) => e);
        expect(err, mode).toBeInstanceOf(IdempotencyKeyInvalidError);
        expect(ran).toBe(false);
        expect(() => phaseKey('s', 'k', `ship-${text}`)).toThrow(IdempotencyKeyInvalidError);
      }
    });
  }

  it('a scope over 255 characters is the typed scope error too', async () => {
    const err = await idempotent(db.sql, { scope: 'x'.repeat(256), key: 'k', table }, () => 1).catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyScopeInvalidError);
  });
});

describe('fingerprints are injective over JSON values', () => {
  it('refuses values JSON would silently drop or rewrite instead of collapsing them', () => {
    const fn = () => 1;
    for (const v of [
      { a: fn },
      [fn],
      { a: Symbol('x') },
      [undefined],
      { a: 1n },
      { m: new Map([[1, 2]]) },
      { s: new Set([1]) },
      { b: Buffer.from('hi') },
      Number.NaN,
    ])
      expect(() => fingerprintOf(v), String(canonicalOr(v))).toThrow(InvalidOptionError);
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    expect(() => fingerprintOf(cyclic)).toThrow(InvalidOptionError);
  });

  it('a request with a nested function does not replay the request without it', async () => {
    await idempotent(db.sql, { scope: 's', key: 'fp-fn', table, request: { amount: 1 } }, () => 'first');
    const err = await idempotent(db.sql, { scope: 's', key: 'fp-fn', table, request: { amount: 1, cb: () => 2 } }, () => 'x').catch(
      (e) => e,
    );
    expect(err).toBeInstanceOf(InvalidOptionError);
  });

  it('matches RFC 8785 (same text as before for JSON values) and does not recurse', () => {
    expect(canonicalJson({ b: [1, 2.5, -0, 1e21, 'é\u2028'], a: null, c: { y: true, x: 'q"' }, u: undefined })).toBe(
      '{"a":null,"b":[1,2.5,0,1e+21,"é\u2028"],"c":{"x":"q\\"","y":true}}',
    );
    expect(canonicalJson({ '\u20ac': 1, '\ud83d\ude00': 2, a: 3 })).toBe('{"a":3,"\u20ac":1,"\ud83d\ude00":2}');
    expect(canonicalJson({ d: new Date(0) })).toBe('{"d":"1970-01-01T00:00:00.000Z"}');
    const deep = JSON.parse(`${'['.repeat(100_000)}${']'.repeat(100_000)}`);
    expect(canonicalJson(deep)).toHaveLength(200_000);
  });

  it('tags the body kind: absent, JSON null, JSON string, raw bytes and a look-alike JSON object all differ', () => {
    const base = { method: 'POST', route: '/x' };
    const prints = [
      requestFingerprint({ ...base }),
      requestFingerprint({ ...base, body: { kind: 'none' } }),
      requestFingerprint({ ...base, body: { kind: 'json', value: null } }),
      requestFingerprint({ ...base, body: { kind: 'json', value: 'hello' } }),
      requestFingerprint({ ...base, body: { kind: 'bytes', bytes: Buffer.from('hello') } }),
      requestFingerprint({ ...base, body: { kind: 'json', value: { $bytes: 'aGVsbG8=' } } }),
      requestFingerprint({ ...base, body: { kind: 'json', value: { kind: 'bytes', bytes: 'aGVsbG8=' } } }),
      requestFingerprint({ ...base, body: { kind: 'parsed', value: 'hello' } }),
    ].map((b) => b.toString('hex'));
    expect(prints[0]).toBe(prints[1]); // no body is no body
    expect(new Set(prints.slice(1)).size).toBe(prints.length - 1);
    expect(() => requestFingerprint({ ...base, body: { amount: 1 } as never })).toThrow(InvalidOptionError);
  });
});

function canonicalOr(v: unknown): string {
  try {
    return canonicalJson(v);
  } catch {
    return 'refused';
  }
}

describe('a result that cannot be stored ends the attempt', () => {
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  const bodies: [string, unknown][] = [
    ['BigInt', { amount: 10n }],
    ['cyclic', cyclic],
    ['function', () => 'no'],
    ['Symbol', Symbol('no')],
  ];
  for (const mode of ['transactional', 'phased'] as const) {
    for (const [what, body] of bodies) {
      it(`FinalFailure with a ${what} body (${mode}): typed error, no connection idle in transaction, the key is retryable`, async () => {
        const key = `final-${mode}-${what}`;
        const opts = { scope: 's', key, table, mode, waitMs: 0 };
        const err = await idempotent(db.sql, opts, async (ctx) => {
          if (mode === 'transactional') await q(ctx.tx, 'select 1');
          else await ctx.phase('one', () => 1);
          throw new FinalFailure(body, { status: 402 });
        }).catch((e) => e);
        expect(err).toBeInstanceOf(InvalidOptionError);
        expect(await idleInTransaction()).toBe(0);
        const retry = await idempotent(db.sql, opts, () => 'retried').catch((e) => e);
        expect(retry).not.toBeInstanceOf(IdempotencyInFlightError);
        expect(retry).toEqual({ value: 'retried', replayed: false });
      });
    }
  }

  it('a handler result that is not JSON (a function) is a typed error and leaves the key retryable', async () => {
    const opts = { scope: 's', key: 'result-fn', table, waitMs: 0 };
    const err = await idempotent(db.sql, opts, () => (() => 1) as unknown).catch((e) => e);
    expect(err).toBeInstanceOf(InvalidOptionError);
    expect(await idleInTransaction()).toBe(0);
    expect(await idempotent(db.sql, opts, () => 2)).toEqual({ value: 2, replayed: false });
  });
});

describe('migrate', () => {
  it('sends no NOTICE to the driver, applied or not (postgres.js and pg)', async () => {
    const onnotice = vi.fn();
    const sql = db.newSql({ onnotice });
    const names = { schema: 'idem_notice', table: 'keys' };
    await migrate(sql, names);
    await migrate(sql, names);
    await migrate(sql, table);
    expect(onnotice).not.toHaveBeenCalled();
    const pool = db.newPool();
    const notice = vi.fn();
    pool.on('connect', (client) => client.on('notice', notice));
    await migrate(pool, names);
    expect(notice).not.toHaveBeenCalled();
    // the caller's own setting is left as it was
    await sql.begin(async (tx) => {
      await tx`set local client_min_messages = notice`;
      await migrate(tx, names);
      const [row] = await tx`select current_setting('client_min_messages') as v`;
      expect(row!.v).toBe('notice');
    });
  });
});
