// Request fingerprints: SHA-256 over the RFC 8785 (JCS) canonical JSON of what identifies a
// request, so the same request always hashes the same (key order, whitespace and number spelling
// do not matter) and a different one never replays another's response.
//
// Injectivity is the point: two values that differ must never serialize alike. So the serializer
// below refuses what JSON.stringify would silently drop or rewrite into something else (a function
// or symbol, `undefined` in an array, BigInt, NaN, a Map or Set, nested bytes, a cycle) instead of
// collapsing it, and an HTTP body is tagged with its kind (none / JSON / raw bytes / parsed by the
// app), so raw bytes never meet a JSON value that happens to look like their encoding.

import { createHash, createHmac } from 'node:crypto';
import { InvalidOptionError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { IdempotencyKeyInvalidError } from './errors.js';

/**
 * Version of the fingerprint recipe below; stored with each row. Rows of another version are not
 * compared (they neither match nor mismatch). 2: HTTP bodies are tagged with their kind.
 */
export const FINGERPRINT_VERSION = 2;

/**
 * An HTTP request body, tagged with what it is, so that different bodies never share a fingerprint:
 * - `none`: no body (zero bytes);
 * - `json`: parsed from JSON (a JSON content type): fingerprinted as its canonical JSON, so key
 *   order and whitespace do not matter;
 * - `bytes`: the raw bytes (any other content type); a string is taken as its UTF-8 bytes;
 * - `parsed`: a value some other body parser of the app produced (e.g. a urlencoded form) when the
 *   raw bytes are gone: fingerprinted as JSON, apart from the JSON kind.
 */
export type RequestBody =
  | { kind: 'none' }
  | { kind: 'json'; value: unknown }
  | { kind: 'bytes'; bytes: Uint8Array | string }
  | { kind: 'parsed'; value: unknown };

/** What identifies an HTTP request for idempotency. */
export interface RequestIdentity {
  method: string;
  /** Path and query, e.g. `/v1/charges?expand=customer`. */
  route: string;
  /** The body with its kind; absent means no body. */
  body?: RequestBody;
  /** Chosen request headers (names are lower-cased; absent headers are left out). */
  headers?: Record<string, string | undefined>;
}

const NO_BODY: RequestBody = { kind: 'none' };

function taggedBody(body: RequestBody | undefined): unknown {
  if (body === undefined) return { kind: 'none' };
  if (body === null || typeof body !== 'object')
    throw new InvalidOptionError(`a request body must be { kind: 'none' | 'json' | 'bytes' | 'parsed', ... }, got ${describe(body)}`);
  switch (body.kind) {
    case 'none':
      return { kind: 'none' };
    case 'json':
    case 'parsed':
      return { kind: body.kind, value: body.value };
    case 'bytes': {
      const b = body.bytes;
      if (typeof b !== 'string' && !(b instanceof Uint8Array))
        throw new InvalidOptionError(`bytes of a request body must be a Uint8Array or a string, got ${describe(b)}`);
      return {
        kind: 'bytes',
        base64: (typeof b === 'string' ? Buffer.from(b, 'utf8') : Buffer.from(b.buffer, b.byteOffset, b.byteLength)).toString('base64'),
      };
    }
    default:
      throw new InvalidOptionError(
        `a request body must be { kind: 'none' | 'json' | 'bytes' | 'parsed', ... }, got kind ${describe((body as { kind?: unknown }).kind)}`,
      );
  }
}

// ---------------------------------------------------------------- canonical JSON (RFC 8785)

class NotJson extends Error {}

// What JSON.stringify would serialize in place of `v` (found under `key`): toJSON() applied, boxed
// primitives unwrapped. Refuses what JSON would drop or rewrite (see the top of the file); returns
// undefined only for `undefined` itself (an object member that JSON omits).
function jsonValue(v: unknown, key: string): unknown {
  if (v !== null && typeof v === 'object') {
    if (ArrayBuffer.isView(v) || v instanceof ArrayBuffer)
      throw new NotJson(`bytes (${describe(v)}) inside a JSON value; encode them as a string (e.g. base64)`);
    const toJSON = (v as { toJSON?: unknown }).toJSON;
    if (typeof toJSON === 'function') v = toJSON.call(v, key);
    if (v instanceof Number || v instanceof String || v instanceof Boolean) v = v.valueOf();
  }
  switch (typeof v) {
    case 'undefined':
    case 'string':
    case 'boolean':
      return v;
    case 'number':
      if (!Number.isFinite(v)) throw new NotJson(`${v} is not a JSON number`);
      return v;
    case 'object':
      if (
        v instanceof Map ||
        v instanceof Set ||
        v instanceof WeakMap ||
        v instanceof WeakSet ||
        v instanceof RegExp ||
        v instanceof Promise
      )
        throw new NotJson(`${describe(v)} has no JSON form (JSON would write {})`);
      return v;
    default: // bigint, symbol, function
      throw new NotJson(`${describe(v)} is not a JSON value`);
  }
}

type Frame = { array: readonly unknown[]; i: number } | { object: Record<string, unknown>; keys: string[]; i: number; first: boolean };

/**
 * The canonical JSON text of any JSON value (RFC 8785): object members sorted by UTF-16 code
 * units, numbers and strings as ECMAScript serializes them, no whitespace. Values are taken as
 * JSON.stringify takes them (`toJSON()` applies, object members that are `undefined` are left
 * out), except that what JSON would silently drop or rewrite is refused: functions, symbols,
 * BigInt, NaN and Infinity, `undefined` in an array, Map / Set / RegExp, bytes, cycles. Never
 * recursive: any nesting depth is fine.
 *
 * @throws {@link InvalidOptionError} for a value with no exact JSON form.
 */
export function canonicalJson(value: unknown): string {
  const out: string[] = [];
  const stack: Frame[] = [];
  const open = new Set<object>(); // containers being written: meeting one again is a cycle
  // Write a value already passed through jsonValue(): a primitive, or open a container.
  const write = (v: unknown) => {
    if (v === null || typeof v !== 'object') {
      out.push(JSON.stringify(v));
      return;
    }
    if (open.has(v)) throw new NotJson('a cyclic value');
    open.add(v);
    if (Array.isArray(v)) {
      out.push('[');
      stack.push({ array: v, i: 0 });
    } else {
      out.push('{');
      stack.push({ object: v as Record<string, unknown>, keys: Object.keys(v).sort(), i: 0, first: true });
    }
  };
  try {
    const top = jsonValue(value, '');
    if (top === undefined) throw new NotJson('undefined is not a JSON value');
    write(top);
    while (stack.length > 0) {
      const f = stack[stack.length - 1] as Frame;
      if ('array' in f) {
        if (f.i < f.array.length) {
          const i = f.i++;
          const v = jsonValue(f.array[i], String(i));
          if (v === undefined) throw new NotJson('undefined (or a hole) in an array; JSON would write null');
          if (i > 0) out.push(',');
          write(v);
          continue;
        }
        out.push(']');
        open.delete(f.array);
      } else {
        let wrote = false;
        while (f.i < f.keys.length) {
          const k = f.keys[f.i++] as string;
          const v = jsonValue(f.object[k], k);
          if (v === undefined) continue; // as JSON: an undefined member is an absent member
          out.push(f.first ? '' : ',', JSON.stringify(k), ':');
          f.first = false;
          write(v);
          wrote = true;
          break;
        }
        if (wrote) continue;
        out.push('}');
        open.delete(f.object);
      }
      stack.pop();
    }
  } catch (err) {
    throw new InvalidOptionError(`cannot fingerprint this value as JSON: ${(err as Error).message}`);
  }
  return out.join('');
}

/**
 * SHA-256 of the canonical JSON of `value` (32 bytes). Use it to fingerprint a job's or
 * webhook's payload for {@link idempotent}.
 *
 * @throws {@link InvalidOptionError} for a value with no exact JSON form (see {@link canonicalJson}).
 * @example
 * fingerprintOf({ orderId: 42, amount: 200 }).equals(fingerprintOf({ amount: 200, orderId: 42 })) // true
 */
export function fingerprintOf(value: unknown): Buffer {
  return createHash('sha256').update(canonicalJson(value), 'utf8').digest();
}

/**
 * Fingerprint an HTTP request: SHA-256 over the canonical JSON of
 * `{ v, method (upper case), route, body (tagged with its kind), headers (lower-case names) }`.
 *
 * @example
 * requestFingerprint({ method: 'POST', route: '/charges', body: { kind: 'json', value: { amount: 200 } } })
 */
export function requestFingerprint(req: RequestIdentity): Buffer {
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(req.headers ?? {})) if (value !== undefined) headers[name.toLowerCase()] = value;
  return fingerprintOf({
    v: FINGERPRINT_VERSION,
    method: String(req.method).toUpperCase(),
    route: String(req.route),
    body: taggedBody(req.body ?? NO_BODY),
    headers,
  });
}

/**
 * The stable key a phase passes downstream (e.g. the payment gateway's own idempotency key):
 * HMAC-SHA-256 of (scope, key, phase), hex. The same in every attempt and process, and it does not
 * depend on function names, so refactoring the handler does not change it.
 *
 * @throws {@link IdempotencyKeyInvalidError} when a part holds NUL (the separator) or a lone
 * surrogate (hashed as U+FFFD, it would share the key of another name).
 */
export function phaseKey(scope: string, key: string, phase: string, secret: string | Buffer = 'pgcoord-idempotency-v1'): string {
  for (const [what, part] of [
    ['idempotency scope', scope],
    ['idempotency key', key],
    ['phase name', phase],
  ] as const) {
    const problem = typeof part === 'string' ? textProblem(part) : `expected a string, got ${describe(part)}`;
    if (problem !== undefined) throw new IdempotencyKeyInvalidError(typeof part === 'string' ? `it ${problem}` : problem, what);
  }
  return createHmac('sha256', secret)
    .update(scope, 'utf8')
    .update('\0')
    .update(key, 'utf8')
    .update('\0')
    .update(phase, 'utf8')
    .digest('hex');
}
