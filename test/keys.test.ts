// Lock keys: one string, one lock. No database needed: these are pure functions.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { decodeLockRow, hashKey, InvalidKeyError, lockKey, lockKeys } from '../src/index.js';
import * as keys from '../src/keys.js';

// (read through the module, so each test fails on its own where one is missing)
const { candidateKeys, rememberedKeys } = keys;
const KEY_MAX_LENGTH = keys.KEY_MAX_LENGTH ?? 1024;
const REMEMBERED_KEYS_MAX = keys.REMEMBERED_KEYS_MAX ?? { entries: 10_000, chars: 1_000_000 };

/** The documented hash, written out independently: SHA-256(UTF-8(namespace) || 0x00 || UTF-8(name)), first 8 bytes. */
function reference(name: string, namespace = ''): bigint {
  return createHash('sha256')
    .update(Buffer.concat([Buffer.from(namespace, 'utf8'), Buffer.from([0]), Buffer.from(name, 'utf8')]))
    .digest()
    .readBigInt64BE(0);
}

const nullProto = () => Object.create(null) as object;

describe('string keys that would be ambiguous are refused', () => {
  it('refuses NUL in a name or a namespace (a\\0b + c and a + b\\0c were one lock)', () => {
    expect(() => lockKey({ namespace: 'a\0b', name: 'c' })).toThrow(InvalidKeyError);
    expect(() => lockKey({ namespace: 'a', name: 'b\0c' })).toThrow(InvalidKeyError);
    expect(() => lockKey('\0')).toThrow(InvalidKeyError);
    expect(() => hashKey('c', 'a\0b')).toThrow(InvalidKeyError);
    expect(() => hashKey('b\0c', 'a')).toThrow(/NUL/);
  });

  it("refuses lone surrogates ('k\\uD800', 'k\\uDFFF' and 'k\\uFFFD' were one lock); a well-formed pair is fine", () => {
    for (const bad of ['k\uD800', 'k\uDFFF', '\uDC00k', 'a\uD800b']) {
      expect(() => lockKey(bad), JSON.stringify(bad)).toThrow(InvalidKeyError);
      expect(() => lockKey({ namespace: bad, name: 'x' })).toThrow(InvalidKeyError);
      expect(() => lockKeys([bad, 'other'])).toThrow(/well-formed/);
    }
    expect(lockKey('k\uFFFD')).toMatchObject({ space: 'int8' });
    expect(lockKey('k\u{1F512}')).toMatchObject({ space: 'int8' }); // a surrogate pair
  });

  it('keeps the hash of every well-formed key it accepted before', () => {
    expect(hashKey('order:42', 'refunds')).toBe(-39854525481817862n);
    const cases: [string, string | undefined][] = [
      ['order:42', 'refunds'],
      ['order:42', undefined],
      ['k\uFFFD', undefined],
      ['🔒 ünïcödé', 'namespace with spaces'],
      ['x'.repeat(KEY_MAX_LENGTH), 'y'.repeat(KEY_MAX_LENGTH)],
      ['a', ''],
    ];
    for (const [name, namespace] of cases) expect(hashKey(name, namespace)).toBe(reference(name, namespace));
    expect(lockKey({ namespace: 'refunds', name: 'order:42' })).toMatchObject({ id: reference('order:42', 'refunds') });
  });

  it(`refuses names and namespaces longer than ${KEY_MAX_LENGTH} characters at once, even 10 MB`, () => {
    const huge = 'k'.repeat(10 * 1024 * 1024);
    const started = performance.now();
    expect(() => lockKey(huge)).toThrow(InvalidKeyError);
    expect(() => lockKey({ namespace: huge, name: 'x' })).toThrow(InvalidKeyError);
    expect(() => hashKey('x'.repeat(KEY_MAX_LENGTH + 1))).toThrow(/at most 1024/);
    expect(performance.now() - started).toBeLessThan(500);
    try {
      lockKey(huge);
    } catch (err) {
      expect((err as Error).message.length).toBeLessThan(300);
    }
  });

  it('gives InvalidKeyError, never a TypeError, for odd values (BigInt, null prototype, symbols)', () => {
    const bad: unknown[] = [
      nullProto(),
      { name: nullProto() },
      { name: 5n },
      { name: Symbol('s') },
      { namespace: nullProto(), name: 'x' },
      { namespace: 5n, name: 'x' },
      [1n, 2],
      [nullProto(), 1],
      [Symbol('a'), 1],
    ];
    for (const key of bad) expect(() => lockKey(key as never)).toThrow(InvalidKeyError);
    expect(() => hashKey(nullProto() as never)).toThrow(InvalidKeyError);
    expect(() => hashKey('x', 7n as never)).toThrow(InvalidKeyError);
  });
});

describe('decodeLockRow', () => {
  it('decodes int8 and pair rows given as numbers, digit strings or bigints', () => {
    const id = hashKey('decode-me', 'ns');
    const hi = BigInt.asUintN(32, id >> 32n);
    const lo = BigInt.asUintN(32, id);
    expect(decodeLockRow({ classid: String(hi), objid: String(lo), objsubid: '1' })).toEqual({
      space: 'int8',
      id,
      namespace: 'ns',
      name: 'decode-me',
    });
    expect(decodeLockRow({ classid: Number(hi), objid: lo, objsubid: 1n })).toMatchObject({ id });
    expect(decodeLockRow({ classid: 4294967295, objid: 4294967292, objsubid: 2 })).toEqual({ space: 'pair', a: -1, b: -4 });
    expect(decodeLockRow({ classid: 0, objid: 7, objsubid: 1 }, [{ name: 'x' }])).toEqual({ space: 'int8', id: 7n });
  });

  it('names a key from the candidates, hashing each once', () => {
    const id = reference('never-hashed-here', 'cands');
    const known = [{ name: 'other' }, { namespace: 'cands', name: 'never-hashed-here' }];
    const row = { classid: String(BigInt.asUintN(32, id >> 32n)), objid: String(BigInt.asUintN(32, id)), objsubid: 1 };
    expect(decodeLockRow(row, known)).toEqual({ space: 'int8', id, namespace: 'cands', name: 'never-hashed-here' });
    expect(candidateKeys(known).get(id)).toEqual({ namespace: 'cands', name: 'never-hashed-here' });
  });

  it('refuses what is not an advisory pg_locks row, and bad candidates, with InvalidKeyError', () => {
    const rows: unknown[] = [
      null,
      undefined,
      5,
      'row',
      {},
      nullProto(),
      { classid: -1, objid: 0, objsubid: 1 },
      { classid: 2 ** 32, objid: 0, objsubid: 1 },
      { classid: 'x', objid: 0, objsubid: 1 },
      { classid: '1e3', objid: 0, objsubid: 1 },
      { classid: 1.5, objid: 0, objsubid: 1 },
      { classid: 0, objid: nullProto(), objsubid: 1 },
      { classid: 0, objid: 0, objsubid: 3 },
      { classid: 0, objid: 0, objsubid: nullProto() },
      { classid: 0, objid: 0 },
    ];
    for (const row of rows) expect(() => decodeLockRow(row as never)).toThrow(InvalidKeyError);
    const row = { classid: 0, objid: 1, objsubid: 1 };
    for (const known of [5, 'names', [null], [{ name: 5 }], [{ name: 'a\0b' }], [nullProto()], nullProto()])
      expect(() => decodeLockRow(row, known as never)).toThrow(InvalidKeyError);
  });
});

describe('remembered key names (for decoding) are bounded by size, not only by count', () => {
  it(`keeps at most ${REMEMBERED_KEYS_MAX.chars} characters, however long the keys`, () => {
    // 3 000 distinct keys of 2 000 characters: 6 M characters offered, 12 MB as UTF-16
    for (let i = 0; i < 3000; i++) hashKey(`${i}:${'n'.repeat(995)}`, `${i}:${'s'.repeat(995)}`);
    const kept = rememberedKeys();
    expect(kept.chars).toBeLessThanOrEqual(REMEMBERED_KEYS_MAX.chars);
    expect(kept.entries).toBeLessThanOrEqual(REMEMBERED_KEYS_MAX.entries);
    expect(kept.entries).toBeGreaterThan(0);
    // the newest is still decoded
    const last = hashKey(`2999:${'n'.repeat(995)}`, `2999:${'s'.repeat(995)}`);
    const row = { classid: String(BigInt.asUintN(32, last >> 32n)), objid: String(BigInt.asUintN(32, last)), objsubid: 1 };
    expect(decodeLockRow(row)).toMatchObject({ namespace: `2999:${'s'.repeat(995)}` });
  });

  it('keeps nothing of keys it refuses (200 one-megabyte keys)', () => {
    const before = rememberedKeys().chars;
    for (let i = 0; i < 200; i++) expect(() => hashKey(`${i}`.padEnd(1024 * 1024, 'x'))).toThrow(InvalidKeyError);
    expect(rememberedKeys().chars).toBe(before);
  });

  it('counts entries too: many short keys stay within the entry bound', () => {
    for (let i = 0; i < REMEMBERED_KEYS_MAX.entries + 500; i++) hashKey(`short:${i}`);
    expect(rememberedKeys().entries).toBeLessThanOrEqual(REMEMBERED_KEYS_MAX.entries);
    expect(rememberedKeys().chars).toBeLessThanOrEqual(REMEMBERED_KEYS_MAX.chars);
  });
});
