import { createHash } from 'node:crypto';
import { InvalidKeyError } from './errors.js';

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

// Hashed keys are remembered (bounded) so pg_locks rows can be shown as the string that made them.
const names = new Map<bigint, { namespace: string | undefined; name: string }>();
const NAMES_MAX = 10_000;

/**
 * Hash a string (and optional namespace) to a signed 64-bit advisory lock key.
 *
 * The key is the first 8 bytes, big-endian two's complement, of
 * SHA-256(UTF-8(namespace) || 0x00 || UTF-8(name)) (namespace empty when absent). It is the same in
 * every process, Node version and platform. Two different strings collide with probability
 * 2^-64; among n keys in use the chance of any collision is about n² / 2^65 (1e-9 at n = 190 000).
 *
 * @example
 * hashKey('order:42', 'refunds') // => a bigint, always the same
 */
export function hashKey(name: string, namespace?: string): bigint {
  if (typeof name !== 'string' || name.length === 0) throw new InvalidKeyError('a string lock key must be non-empty');
  if (namespace !== undefined && typeof namespace !== 'string') throw new InvalidKeyError('a lock key namespace must be a string');
  const digest = createHash('sha256')
    .update(namespace ?? '', 'utf8')
    .update(Buffer.from([0]))
    .update(name, 'utf8')
    .digest();
  const id = digest.readBigInt64BE(0);
  if (!names.has(id)) {
    if (names.size >= NAMES_MAX) names.delete(names.keys().next().value as bigint);
    names.set(id, { namespace, name });
  }
  return id;
}

function int4(x: unknown, what: string): number {
  if (typeof x !== 'number' || !Number.isInteger(x) || x < INT4_MIN || x > INT4_MAX) {
    throw new InvalidKeyError(`${what} of a pair key must be an int32 integer, got ${describe(x)}`);
  }
  return x;
}

function describe(x: unknown): string {
  if (typeof x === 'bigint') return `${x}n`;
  if (typeof x === 'string') return JSON.stringify(x);
  if (x === null) return 'null';
  if (Array.isArray(x)) return `an array of ${x.length}`;
  return typeof x === 'number' ? String(x) : typeof x;
}

/**
 * Validate and normalise a lock key; throws {@link InvalidKeyError} for anything that is not one.
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
    if (typeof name !== 'string' || name.length === 0) throw new InvalidKeyError('a named lock key must have a non-empty string name');
    if (namespace !== undefined && (typeof namespace !== 'string' || namespace.length === 0)) {
      throw new InvalidKeyError('a lock key namespace must be a non-empty string');
    }
    return {
      space: 'int8',
      id: hashKey(name, namespace as string | undefined),
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

/** An advisory lock as `pg_locks` shows it (`locktype = 'advisory'`). */
export interface AdvisoryLockRow {
  classid: number | string;
  objid: number | string;
  objsubid: number | string;
}

/** A `pg_locks` advisory row decoded back to its key (and to the string, when this process hashed it). */
export type DecodedKey =
  | { space: 'int8'; id: bigint; namespace?: string | undefined; name?: string | undefined }
  | { space: 'pair'; a: number; b: number };

/**
 * Decode a `pg_locks` advisory row to the key that made it. Postgres stores an int8 key as
 * classid = high 32 bits, objid = low 32 bits, objsubid = 1; a pair as classid = a, objid = b,
 * objsubid = 2 (both as unsigned oids).
 */
export function decodeLockRow(row: AdvisoryLockRow, known?: Iterable<{ namespace?: string; name: string }>): DecodedKey {
  const hi = BigInt(row.classid);
  const lo = BigInt(row.objid);
  if (Number(row.objsubid) === 2) return { space: 'pair', a: Number(BigInt.asIntN(32, hi)), b: Number(BigInt.asIntN(32, lo)) };
  const id = BigInt.asIntN(64, (hi << 32n) | lo);
  let named = names.get(id);
  if (!named && known) {
    for (const k of known) if (hashKey(k.name, k.namespace) === id) named = { namespace: k.namespace, name: k.name };
  }
  return named ? { space: 'int8', id, namespace: named.namespace, name: named.name } : { space: 'int8', id };
}
