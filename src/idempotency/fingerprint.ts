// Request fingerprints: SHA-256 over the RFC 8785 (JCS) canonical JSON of what identifies a
// request, so the same request always hashes the same (key order, whitespace and number spelling
// do not matter) and a different one never replays another's response.

import { createHash, createHmac } from 'node:crypto';
import canonicalizeModule from 'canonicalize';
import { InvalidOptionError } from '../errors.js';

// canonicalize is CommonJS (`module.exports = fn`) with ESM-style typings: take whichever is the function.
const canonicalize = ((canonicalizeModule as unknown as { default?: unknown }).default ?? canonicalizeModule) as (
  value: unknown,
) => string | undefined;

/** Version of the fingerprint recipe below; stored with each row. Bumped if the recipe changes. */
export const FINGERPRINT_VERSION = 1;

/** What identifies an HTTP request for idempotency. */
export interface RequestIdentity {
  method: string;
  /** Path and query, e.g. `/v1/charges?expand=customer`. */
  route: string;
  /** Parsed JSON body, or raw bytes / text for other content types; `undefined` when there is none. */
  body?: unknown;
  /** Chosen request headers (names are lower-cased; absent headers are left out). */
  headers?: Record<string, string | undefined>;
}

function toJsonValue(body: unknown): unknown {
  if (body === undefined) return null;
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) return { $bytes: Buffer.from(body).toString('base64') };
  return body;
}

/**
 * The canonical JSON text of any JSON value (RFC 8785). Throws {@link InvalidOptionError} for
 * values JSON cannot represent (NaN, Infinity, BigInt, cycles).
 */
export function canonicalJson(value: unknown): string {
  try {
    const text = canonicalize(value);
    if (text === undefined) throw new Error('value is not representable in JSON');
    return text;
  } catch (err) {
    throw new InvalidOptionError(`cannot fingerprint this value as JSON: ${(err as Error).message}`);
  }
}

/**
 * SHA-256 of the canonical JSON of `value` (32 bytes). Use it to fingerprint a job's or
 * webhook's payload for {@link idempotent}.
 *
 * @example
 * fingerprintOf({ orderId: 42, amount: 200 }).equals(fingerprintOf({ amount: 200, orderId: 42 })) // true
 */
export function fingerprintOf(value: unknown): Buffer {
  return createHash('sha256').update(canonicalJson(value), 'utf8').digest();
}

/**
 * Fingerprint an HTTP request: SHA-256 over the canonical JSON of
 * `{ method (upper case), route, body, headers (lower-case names) }`.
 *
 * @example
 * requestFingerprint({ method: 'POST', route: '/charges', body: { amount: 200 } })
 */
export function requestFingerprint(req: RequestIdentity): Buffer {
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(req.headers ?? {})) if (value !== undefined) headers[name.toLowerCase()] = value;
  return fingerprintOf({
    v: FINGERPRINT_VERSION,
    method: String(req.method).toUpperCase(),
    route: String(req.route),
    body: toJsonValue(req.body),
    headers,
  });
}

/**
 * The stable key a phase passes downstream (e.g. the payment gateway's own idempotency key):
 * HMAC-SHA-256 of (scope, key, phase), hex. The same in every attempt and process, and it does not
 * depend on function names, so refactoring the handler does not change it.
 */
export function phaseKey(scope: string, key: string, phase: string, secret: string | Buffer = 'pgcoord-idempotency-v1'): string {
  return createHmac('sha256', secret)
    .update(scope, 'utf8')
    .update('\0')
    .update(key, 'utf8')
    .update('\0')
    .update(phase, 'utf8')
    .digest('hex');
}
