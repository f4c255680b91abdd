import { createHash } from 'node:crypto';
import { InvalidKeyError } from './errors.js';
import { describe, ownCopy, textProblem } from './text.js';

/**
 * What can name an advisory lock:
 * - a `bigint` (or safe integer `number`) in the signed 64-bit range: `pg_advisory_lock(int8)`;
 * - a pair of int32 `[a, b]`: `pg_advisory_lock(int4, int4)`, a separate key space in Postgres;
 * - a non-empty string, optionally under a namespace (`{ namespace, name }`), hashed to int8.
 */
export type LockKeyInput = bigint | number | string | readonly [number, number] | { readonly namespace?: string; readonly name: string };

/** A validated key, ready for SQL. `label` is for messages and events. */
export type LockKey =
  | { readonly space: 'int8'; readonly id: bigint; readonly label: string }
  | { readonly space: 'pair'; readonly a: number; readonly b: number; readonly label: string };

const INT8_MIN = -(2n ** 63n);
const INT8_MAX = 2n ** 63n - 1n;
const INT4_MIN = -(2 ** 31);
const INT4_MAX = 2 ** 31 - 1;
const OID_MAX = 2n ** 32n - 1n;

/** The longest name, and the longest namespace, of a string lock key: 1024 UTF-16 code units (`string.length`). */
export const KEY_MAX_LENGTH = 1024;

// Hashed keys are remembered so pg_locks rows can be shown as the string that made them, within
// a bound on entries and on characters kept (oldest forgotten first), so keys made from data
// cannot grow it without bound.
const names = new Map<bigint, { namespace: string | undefined; name: string }>();
let namesChars = 0;

/** How much {@link hashKey} remembers for decoding: at most `entries` keys and `chars` characters of names and namespaces. */
export const REMEMBERED_KEYS_MAX = { entries: 10_000, chars: 1_000_000 } as const;

/** What is remembered now (see {@link REMEMBERED_KEYS_MAX}). */
export function rememberedKeys(): { entries: number; chars: number } {
  return { entries: names.size, chars: namesChars };
}

function remember(id: bigint, namespace: string | undefined, name: string): void {
  const chars = name.length + (namespace?.length ?? 0);
  while (names.size > 0 && (names.size >= REMEMBERED_KEYS_MAX.entries || namesChars + chars > REMEMBERED_KEYS_MAX.chars)) {
    const [oldest, old] = names.entries().next().value as [bigint, { namespace: string | undefined; name: string }];
    names.delete(oldest);
    namesChars -= old.name.length + (old.namespace?.length ?? 0);
  }
  names.set(id, { namespace: namespace === undefined ? undefined : ownCopy(namespace), name: ownCopy(name) });
  namesChars += chars;
}

// A name or namespace that can be hashed: a string of at most KEY_MAX_LENGTH code units, without
// NUL (the separator in the hashed bytes) and well-formed (a lone surrogate is encoded as U+FFFD,
// so 'k\uD800' and 'k\uFFFD' would be one lock).
function keyText(value: unknown, what: string, allowEmpty: boolean): string {
  if (typeof value !== 'string') throw new InvalidKeyError(`${what} must be a string, got ${describe(value)}`);
  if (value.length === 0 && !allowEmpty) throw new InvalidKeyError(`${what} must be a non-empty string`);
  if (value.length > KEY_MAX_LENGTH)
    throw new InvalidKeyError(`${what} has ${value.length} characters, at most ${KEY_MAX_LENGTH} are allowed`);
  const problem = textProblem(value);
  if (problem !== undefined) throw new InvalidKeyError(`${what} ${describe(value)} ${problem}`);
  return value;
}

/**
 * Hash a string (and optional namespace) to a signed 64-bit advisory lock key.
 *
 * The key is the first 8 bytes, big-endian two's complement, of
 * SHA-256(UTF-8(namespace) || 0x00 || UTF-8(name)) (namespace empty when absent). It is the same in
 * every process, Node version and platform. Two different strings collide with probability
 * 2^-64; among n keys in use the chance of any collision is about n² / 2^65 (1e-9 at n = 190 000).
 *
 * The name must be non-empty; name and namespace must each be at most {@link KEY_MAX_LENGTH}
 * code units, must not contain NUL (U+0000: it separates them in the hashed bytes, so
 * `{ namespace: 'a\0b', name: 'c' }` and `{ namespace: 'a', name: 'b\0c' }` would be one lock) and
 * must be well-formed UTF-16 (a lone surrogate is encoded as U+FFFD, so `'k\uD800'` and `'k\uFFFD'`
 * would be one lock). Anything else throws {@link InvalidKeyError}.
 *
 * @example
 * hashKey('order:42', 'refunds') // => a bigint, always the same
 */
export function hashKey(name: string, namespace?: string): bigint {
  keyText(name, 'a string lock key', false);
  if (namespace !== undefined) keyText(namespace, 'a lock key namespace', true);
  const digest = createHash('sha256')
    .update(namespace ?? '', 'utf8')
    .update(Buffer.from([0]))
    .update(name, 'utf8')
    .digest();
  const id = digest.readBigInt64BE(0);
  if (!names.has(id)) remember(id, namespace, name);
  return id;
}

function int4(x: unknown, what: string): number {
  if (typeof x !== 'number' || !Number.isInteger(x) || x < INT4_MIN || x > INT4_MAX) {
    throw new InvalidKeyError(`${what} of a pair key must be an int32 integer, got ${describe(x)}`);
  }
  return x;
}

/**
 * Validate and normalise a lock key; throws {@link InvalidKeyError} for anything that is not one.
 * String names and namespaces follow {@link hashKey}'s rules (non-empty, at most
 * {@link KEY_MAX_LENGTH} code units, no NUL, well-formed UTF-16).
 *
 * @example
 * lockKey(42n); lockKey([1, 2]); lockKey('order:42'); lockKey({ namespace: 'refunds', name: 'order:42' })
 */
export function lockKey(input: LockKeyInput): LockKey {
  if (typeof input === 'bigint') {
    if (input < INT8_MIN || input > INT8_MAX)
      throw new InvalidKeyError(`a bigint lock key must fit in a signed 64-bit integer, got ${input}n`);
    return { space: 'int8', id: input, label: String(input) };
  }
  if (typeof input === 'number') {
    if (!Number.isSafeInteger(input))
      throw new InvalidKeyError(`a number lock key must be a safe integer, got ${input}; use a bigint for larger keys`);
    return { space: 'int8', id: BigInt(input), label: String(input) };
  }
  if (typeof input === 'string') {
    return { space: 'int8', id: hashKey(input), label: JSON.stringify(input) };
  }
  if (Array.isArray(input)) {
    if (input.length !== 2) throw new InvalidKeyError(`a pair lock key must have two int32 numbers, got ${describe(input)}`);
    const a = int4(input[0], 'the first number');
    const b = int4(input[1], 'the second number');
    return { space: 'pair', a, b, label: `[${a},${b}]` };
  }
  if (input && typeof input === 'object' && 'name' in input) {
    const { namespace, name } = input as { namespace?: unknown; name: unknown };
    keyText(name, 'the name of a named lock key', false);
    if (namespace !== undefined) keyText(namespace, 'a lock key namespace', false);
    return {
      space: 'int8',
      id: hashKey(name as string, namespace as string | undefined),
      label: namespace ? `${JSON.stringify(namespace)}:${JSON.stringify(name)}` : JSON.stringify(name),
    };
  }
  throw new InvalidKeyError(`not a lock key: ${describe(input)} (use a bigint, a safe integer, a non-empty string or [int32, int32])`);
}

/**
 * Validate several keys, drop duplicates and sort them into the one global order every pgcoord
 * caller uses (int8 keys by value, then pairs), so callers taking overlapping sets never deadlock.
 */
export function lockKeys(inputs: readonly LockKeyInput[] | LockKeyInput): LockKey[] {
  if (!Array.isArray(inputs) || isPair(inputs)) return [lockKey(inputs as LockKeyInput)]; // one key: nothing to sort
  const list = inputs as readonly LockKeyInput[];
  if (list.length === 0) throw new InvalidKeyError('at least one lock key is needed');
  const seen = new Map<string, LockKey>();
  for (const input of list) {
    const key = lockKey(input);
    seen.set(key.space === 'int8' ? `i${key.id}` : `p${key.a},${key.b}`, key);
  }
  return [...seen.values()].sort(compareKeys);
}

// [1, 2] is one pair key, not two int8 keys. A list of keys is written [[1, 2]] or [1n, 2n].
function isPair(x: readonly unknown[]): boolean {
  return x.length === 2 && typeof x[0] === 'number' && typeof x[1] === 'number';
}

function compareKeys(x: LockKey, y: LockKey): number {
  if (x.space !== y.space) return x.space === 'int8' ? -1 : 1;
  if (x.space === 'int8' && y.space === 'int8') return x.id < y.id ? -1 : x.id > y.id ? 1 : 0;
  if (x.space === 'pair' && y.space === 'pair') return x.a - y.a || x.b - y.b;
  return 0;
}

/** An advisory lock as `pg_locks` shows it (`locktype = 'advisory'`): oids as numbers or digit strings. */
export interface AdvisoryLockRow {
  classid: number | string | bigint;
  objid: number | string | bigint;
  objsubid: number | string | bigint;
}

/** A string a lock key may have been made from: a name, and the namespace when there was one. */
export interface KeyCandidate {
  namespace?: string;
  name: string;
}

/** A `pg_locks` advisory row decoded back to its key (and to the string, when this process hashed it). */
export type DecodedKey =
  | { space: 'int8'; id: bigint; namespace?: string | undefined; name?: string | undefined }
  | { space: 'pair'; a: number; b: number };

/**
 * Hash each candidate once: key → the candidate that makes it (the last one, when several do).
 * Throws {@link InvalidKeyError} when `candidates` is not an iterable of `{ namespace?, name }`
 * or one of them is not a valid key (see {@link hashKey}).
 *
 * @example
 * candidateKeys([{ namespace: 'refunds', name: 'order:42' }]).get(hashKey('order:42', 'refunds')) // { namespace: 'refunds', name: 'order:42' }
 */
export function candidateKeys(candidates: Iterable<KeyCandidate>): Map<bigint, KeyCandidate> {
  if (candidates === null || typeof candidates !== 'object' || typeof (candidates as Iterable<unknown>)[Symbol.iterator] !== 'function')
    throw new InvalidKeyError(`key candidates must be an iterable of { namespace?, name }, got ${describe(candidates)}`);
  const byKey = new Map<bigint, KeyCandidate>();
  for (const c of candidates as Iterable<unknown>) {
    if (c === null || typeof c !== 'object') throw new InvalidKeyError(`a key candidate must be { namespace?, name }, got ${describe(c)}`);
    const { namespace, name } = c as { namespace?: unknown; name?: unknown };
    byKey.set(hashKey(name as string, namespace as string | undefined), {
      namespace: namespace as string | undefined,
      name: name as string,
    });
  }
  return byKey;
}

// An oid column of pg_locks (classid, objid): an integer from 0 to 2^32 - 1.
function oid(value: unknown, what: string): bigint {
  const n =
    typeof value === 'bigint'
      ? value
      : typeof value === 'number' && Number.isInteger(value)
        ? BigInt(value)
        : typeof value === 'string' && /^\d{1,10}$/.test(value)
          ? BigInt(value)
          : -1n;
  if (n < 0n || n > OID_MAX)
    throw new InvalidKeyError(`${what} of a pg_locks row must be an oid (0 to 4294967295), got ${describe(value)}`);
  return n;
}

/**
 * Decode a `pg_locks` advisory row to the key that made it. Postgres stores an int8 key as
 * classid = high 32 bits, objid = low 32 bits, objsubid = 1; a pair as classid = a, objid = b,
 * objsubid = 2 (both as unsigned oids). A string key is named when this process hashed it
 * recently (see {@link REMEMBERED_KEYS_MAX}) or when it is among `known`.
 *
 * @throws {@link InvalidKeyError} for a row that is not an advisory lock row, or bad candidates.
 *
 * @example
 * decodeLockRow({ classid: 0, objid: 7, objsubid: 1 }) // { space: 'int8', id: 7n }
 */
export function decodeLockRow(row: AdvisoryLockRow, known?: Iterable<KeyCandidate>): DecodedKey {
  if (row === null || typeof row !== 'object') throw new InvalidKeyError(`not a pg_locks advisory row: ${describe(row)}`);
  const hi = oid(row.classid, 'classid');
  const lo = oid(row.objid, 'objid');
  const sub = row.objsubid;
  const kind = typeof sub === 'number' || typeof sub === 'bigint' || typeof sub === 'string' ? String(sub) : '';
  if (kind !== '1' && kind !== '2')
    throw new InvalidKeyError(`objsubid of an advisory pg_locks row is 1 (int8 key) or 2 (pair), got ${describe(sub)}`);
  const candidates = known === undefined ? undefined : candidateKeys(known);
  if (kind === '2') return { space: 'pair', a: Number(BigInt.asIntN(32, hi)), b: Number(BigInt.asIntN(32, lo)) };
  const id = BigInt.asIntN(64, (hi << 32n) | lo);
  const named = names.get(id) ?? candidates?.get(id);
  return named ? { space: 'int8', id, namespace: named.namespace, name: named.name } : { space: 'int8', id };
}
