// What the express, fastify and hono middleware share: the Idempotency-Key header (IETF
// draft-ietf-httpapi-idempotency-key-header), problem+json answers, the body cap, what is stored
// and how a stored response is replayed. Framework files only translate requests and responses.

import { assertRunner, type Runner } from '../driver/index.js';
import { InvalidOptionError, PgcoordError } from '../errors.js';
import {
  IdempotencyBodyInvalidError,
  IdempotencyBodyTooLargeError,
  IdempotencyError,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyKeyMissingError,
  IdempotencyResponseNotStorableError,
  IdempotencyScopeRequiredError,
} from './errors.js';
import { type RequestBody, requestFingerprint } from './fingerprint.js';
import {
  beginIdempotent,
  type Checked,
  checkOptions,
  type IdempotencyOptions,
  type IdempotentAttempt,
  type StoredResponse,
} from './run.js';

/** Options of the HTTP middleware (express, fastify, hono). */
export interface HttpIdempotencyOptions<Req>
  extends Omit<IdempotencyOptions, 'scope' | 'key' | 'request' | 'fingerprint' | 'signal' | 'unscoped'> {
  /**
   * Resolve the scope of a request: tenant, user or API client (e.g. from the authenticated
   * principal). Required unless `unscoped: true`. Returning nothing answers 400 (SCOPE_REQUIRED),
   * and a scope that cannot be one (over 255 characters, NUL, a lone surrogate) 400
   * (SCOPE_INVALID); either way nothing runs.
   */
  scope?: (req: Req) => string | undefined | Promise<string | undefined>;
  /** Explicit opt-out of scoping: all clients share one key space (a key can replay another client's response). */
  unscoped?: boolean;
  /** Header name. Default `Idempotency-Key`. */
  header?: string;
  /** Answer 400 when the header is missing. Default true; false lets such requests through untouched. */
  required?: boolean;
  /** Methods the middleware applies to. Default POST and PATCH (the non-idempotent ones). */
  methods?: string[];
  /** Request headers that are part of the fingerprint besides method, route and body (e.g. `content-type`). */
  fingerprintHeaders?: string[];
  /** Response headers replayed besides Content-Type, Location and ETag. `set-cookie` is refused. */
  replayHeaders?: string[];
  /** Request body cap in bytes (413 above it, also for streamed bodies). Default 1 MiB. */
  maxBodyBytes?: number;
  /** Response body cap in bytes: a larger response cannot be stored (500, nothing committed). Default 1 MiB. */
  maxResponseBytes?: number;
  /** Which statuses are stored. Default: 2xx and the deterministic 4xx (not 401, 403, 408, 409, 423, 424, 425, 429). */
  store?: (status: number) => boolean;
}

const NOT_DETERMINISTIC = new Set([401, 403, 408, 409, 423, 424, 425, 429]);

/** The default store policy: 2xx and deterministic 4xx are stored; 5xx, 1xx, 3xx and transient 4xx are not. */
export function defaultStore(status: number): boolean {
  return (status >= 200 && status < 300) || (status >= 400 && status < 500 && !NOT_DETERMINISTIC.has(status));
}

/** Headers replayed by default. */
export const DEFAULT_REPLAY_HEADERS = ['content-type', 'location', 'etag'] as const;

/** Checked middleware configuration. */
export interface HttpConfig<Req> {
  runner: Runner;
  header: string;
  required: boolean;
  methods: Set<string>;
  fingerprintHeaders: string[];
  replayHeaders: Set<string>;
  maxBodyBytes: number;
  maxResponseBytes: number;
  store: (status: number) => boolean;
  scope: (req: Req) => string | undefined | Promise<string | undefined>;
  unscoped: boolean;
  base: Omit<IdempotencyOptions, 'key' | 'scope'>;
}

function headerName(name: unknown, what: string): string {
  if (typeof name !== 'string' || !/^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/.test(name))
    throw new InvalidOptionError(`${what} must be header names, got ${JSON.stringify(name)}`);
  return name.toLowerCase();
}

function bytes(name: string, value: unknown, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 1024 ** 3)
    throw new InvalidOptionError(`${name} must be an integer number of bytes up to 1 GiB, got ${String(value)}`);
  return value;
}

/**
 * Check middleware options once, at setup: a middleware without a scope resolver (and without
 * `unscoped: true`) refuses to be created.
 */
export function httpConfig<Req>(runner: Runner, options: HttpIdempotencyOptions<Req>): HttpConfig<Req> {
  assertRunner(runner);
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('idempotency middleware options must be an object');
  const { scope, unscoped, header, required, methods, fingerprintHeaders, replayHeaders, maxBodyBytes, maxResponseBytes, store, ...base } =
    options;
  if (scope === undefined && unscoped !== true)
    throw new IdempotencyScopeRequiredError(
      'the idempotency middleware needs a `scope` resolver (tenant, user or API client), or `unscoped: true` to opt out',
    );
  if (scope !== undefined && typeof scope !== 'function') throw new InvalidOptionError('scope must be a function of the request');
  if (required !== undefined && typeof required !== 'boolean') throw new InvalidOptionError('required must be a boolean');
  if (store !== undefined && typeof store !== 'function') throw new InvalidOptionError('store must be a function of the status');
  const replay = new Set<string>(DEFAULT_REPLAY_HEADERS);
  for (const h of replayHeaders ?? []) {
    const name = headerName(h, 'replayHeaders');
    if (name === 'set-cookie')
      throw new InvalidOptionError('set-cookie is never replayed: it would hand one client another client’s cookies');
    replay.add(name);
  }
  const methodList = (methods ?? ['POST', 'PATCH']).map((m) => {
    if (typeof m !== 'string' || !/^[A-Za-z]+$/.test(m))
      throw new InvalidOptionError(`methods must be HTTP method names, got ${JSON.stringify(m)}`);
    return m.toUpperCase();
  });
  // Validate the shared options now rather than on the first request.
  checkOptions({ ...base, key: 'setup-check', unscoped: true });
  return {
    runner,
    header: headerName(header ?? 'Idempotency-Key', 'header'),
    required: required ?? true,
    methods: new Set(methodList),
    fingerprintHeaders: (fingerprintHeaders ?? []).map((h) => headerName(h, 'fingerprintHeaders')),
    replayHeaders: replay,
    maxBodyBytes: bytes('maxBodyBytes', maxBodyBytes, 1024 * 1024),
    maxResponseBytes: bytes('maxResponseBytes', maxResponseBytes, 1024 * 1024),
    store: store ?? defaultStore,
    scope: scope ?? (() => ''),
    unscoped: unscoped === true,
    base,
  };
}

/**
 * Parse an Idempotency-Key header value. The draft makes it a Structured Field string
 * (`"abc"`); bare tokens (`abc`, as Stripe clients send) are accepted too. 1 to 255 characters of
 * printable ASCII. Returns undefined when absent; throws {@link IdempotencyKeyInvalidError}.
 *
 * @example
 * parseIdempotencyKey('"8e03978e-40d5-43e8-bc93-6894a57f9324"') // '8e03978e-40d5-43e8-bc93-6894a57f9324'
 */
export function parseIdempotencyKey(value: string | string[] | undefined | null): string | undefined {
  if (value === undefined || value === null) return undefined;
  if (Array.isArray(value)) {
    if (value.length === 0) return undefined;
    if (value.length > 1) throw new IdempotencyKeyInvalidError('more than one Idempotency-Key header');
    value = value[0] as string;
  }
  const v = value.trim();
  let key: string;
  if (v.startsWith('"')) {
    const m = /^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$/.exec(v);
    if (!m)
      throw new IdempotencyKeyInvalidError('not a valid structured-field string (printable ASCII in double quotes, \\" and \\\\ escapes)');
    key = (m[1] as string).replace(/\\(["\\])/g, '$1');
  } else {
    if (v.length > 0 && !/^[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+$/.test(v))
      throw new IdempotencyKeyInvalidError(
        'only printable ASCII without spaces, quotes, commas, semicolons or backslashes is allowed unquoted',
      );
    key = v;
  }
  if (key.length === 0) throw new IdempotencyKeyInvalidError('it is empty');
  if (key.length > 255) throw new IdempotencyKeyInvalidError(`it has ${key.length} characters, at most 255 are allowed`);
  return key;
}

/** An HTTP answer built here: a problem or a replay. */
export type HttpAnswer = StoredResponse;

const PROBLEM_TITLES: Record<string, string> = {
  PGCOORD_IDEMPOTENCY_KEY_MISSING: 'Idempotency-Key is missing',
  PGCOORD_IDEMPOTENCY_KEY_INVALID: 'Idempotency-Key is invalid',
  PGCOORD_IDEMPOTENCY_MISMATCH: 'Idempotency-Key reused with a different request',
  PGCOORD_IDEMPOTENCY_IN_FLIGHT: 'A request with this Idempotency-Key is being processed',
  PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE: 'Request body too large',
  PGCOORD_IDEMPOTENCY_BODY_INVALID: 'Request body is invalid',
  PGCOORD_IDEMPOTENCY_SCOPE_REQUIRED: 'Idempotency scope could not be resolved',
  PGCOORD_IDEMPOTENCY_SCOPE_INVALID: 'Idempotency scope is invalid',
  PGCOORD_IDEMPOTENCY_LEASE_LOST: 'The request lost its idempotency lease',
  PGCOORD_IDEMPOTENCY_RESPONSE_NOT_STORABLE: 'The response could not be stored',
  PGCOORD_IDEMPOTENCY_NOT_MIGRATED: 'Idempotency storage is not set up',
};

/**
 * An RFC 9457 problem+json answer for an idempotency error: `type` is `urn:pgcoord:problem:<code>`,
 * `code` is the error's stable code; 409 carries Retry-After (seconds).
 */
export function problemResponse(err: unknown): HttpAnswer {
  const headers: Record<string, string> = { 'content-type': 'application/problem+json' };
  if (err instanceof IdempotencyInFlightError) headers['retry-after'] = String(Math.max(1, Math.ceil(err.retryAfterMs / 1000)));
  const known = err instanceof IdempotencyError;
  const code = err instanceof PgcoordError ? err.code : 'PGCOORD_INTERNAL';
  const status = known ? err.status : 500;
  const body = {
    type: `urn:pgcoord:problem:${code
      .replace(/^PGCOORD_/, '')
      .toLowerCase()
      .replace(/_/g, '-')}`,
    title: PROBLEM_TITLES[code] ?? (known ? 'Idempotency error' : 'The outcome of this request could not be stored'),
    status,
    detail: err instanceof PgcoordError ? err.message : 'internal error while storing the outcome; retry with the same Idempotency-Key',
    code,
  };
  return { status, headers, body: Buffer.from(JSON.stringify(body)) };
}

/** A stored response as replayed: its status, its allow-listed headers and exact body, plus `Idempotent-Replayed: true`. */
export function replayResponse(stored: StoredResponse): HttpAnswer {
  return { status: stored.status, headers: { ...stored.headers, 'idempotent-replayed': 'true' }, body: stored.body };
}

/** Whether a Content-Type is JSON (`application/json`, `application/*+json`). */
export function isJson(contentType: string | string[] | undefined): boolean {
  return typeof contentType === 'string' && /^application\/([a-z0-9.+-]*\+)?json\b/i.test(contentType.trim());
}

/**
 * The body of raw request bytes, tagged for the fingerprint: none (zero bytes), parsed JSON for
 * JSON content types (400 when it is not JSON), else the bytes themselves.
 */
export function parseBody(raw: Buffer, contentType: string | undefined): RequestBody {
  if (raw.length === 0) return { kind: 'none' };
  if (!isJson(contentType)) return { kind: 'bytes', bytes: raw };
  try {
    return { kind: 'json', value: JSON.parse(raw.toString('utf8')) };
  } catch (err) {
    throw new IdempotencyBodyInvalidError('invalid JSON', { cause: err });
  }
}

/** Reject a declared Content-Length above the cap before reading anything. */
export function checkContentLength(value: string | string[] | undefined | null, limit: number): void {
  if (value === undefined || value === null) return;
  const n = Number(Array.isArray(value) ? value[0] : value);
  if (Number.isFinite(n) && n > limit) throw new IdempotencyBodyTooLargeError(limit);
}

/** Read an async-iterable body (Node request, web stream) up to `limit` bytes; above it, 413. */
export async function readCapped(stream: AsyncIterable<Uint8Array | string>, limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stream) {
    const b = typeof chunk === 'string' ? Buffer.from(chunk) : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    size += b.length;
    if (size > limit) throw new IdempotencyBodyTooLargeError(limit);
    chunks.push(b);
  }
  return Buffer.concat(chunks);
}

/** What a framework tells the shared logic about a request. */
export interface HttpRequestInfo {
  method: string;
  /** Path and query. */
  route: string;
  header(name: string): string | string[] | undefined;
  /** The body, tagged with its kind (what the fingerprint covers). */
  body: RequestBody;
}

/** What to do with a request. */
export type Prepared<H> = { kind: 'pass' } | { kind: 'answer'; answer: HttpAnswer } | { kind: 'run'; attempt: IdempotentAttempt<H> };

/**
 * Validate the key, resolve the scope, fingerprint the request and claim the key. Idempotency
 * errors (every problem with the client's input among them: 4xx) come back as problem answers;
 * anything else is thrown (a 500 from the framework: a fault of the server or its setup).
 */
export async function prepare<Req, H>(cfg: HttpConfig<Req>, info: HttpRequestInfo, req: Req): Promise<Prepared<H>> {
  if (!cfg.methods.has(info.method.toUpperCase())) return { kind: 'pass' };
  try {
    const key = parseIdempotencyKey(info.header(cfg.header));
    if (key === undefined) {
      if (cfg.required) throw new IdempotencyKeyMissingError(cfg.header);
      return { kind: 'pass' };
    }
    const scope = await cfg.scope(req);
    if (!scope && !cfg.unscoped)
      throw new IdempotencyScopeRequiredError('the scope resolver returned no scope for this request; nothing was run');
    const headers: Record<string, string | undefined> = {};
    for (const name of cfg.fingerprintHeaders) {
      const v = info.header(name);
      headers[name] = Array.isArray(v) ? v.join(', ') : v;
    }
    const fingerprint = requestFingerprint({ method: info.method, route: info.route, body: info.body, headers });
    const c: Checked = checkOptions({ ...cfg.base, key, scope: scope || undefined, unscoped: cfg.unscoped, fingerprint });
    const start = await beginIdempotent<H>(cfg.runner, c);
    if (start.kind === 'replay') return { kind: 'answer', answer: replayResponse(start.response) };
    return { kind: 'run', attempt: start.attempt };
  } catch (err) {
    if (err instanceof IdempotencyError) return { kind: 'answer', answer: problemResponse(err) };
    throw err;
  }
}

/** The handler's response as captured by a framework adapter; `body` undefined when it was streamed or over the cap. */
export interface CapturedResponse {
  status: number;
  headers: Record<string, unknown>;
  body: Buffer | undefined;
}

function storedHeaders(cfg: HttpConfig<unknown>, headers: Record<string, unknown>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    const n = name.toLowerCase();
    if (!cfg.replayHeaders.has(n) || value === undefined || value === null) continue;
    out[n] = Array.isArray(value) ? value.join(', ') : String(value);
  }
  return out;
}

/**
 * End the attempt with the handler's response: store it (committing the transaction in
 * transactional mode) or leave the key retryable. Resolves to `original` (send the handler's
 * response as it is: it was committed, or deliberately not stored) or a problem answer to send
 * instead (the response could not be stored or committed; its effects were rolled back).
 */
export async function settle<Req, H>(
  cfg: HttpConfig<Req>,
  attempt: IdempotentAttempt<H>,
  res: CapturedResponse,
): Promise<{ kind: 'original' } | { kind: 'answer'; answer: HttpAnswer }> {
  let response: StoredResponse;
  try {
    const store = attempt.decision ? attempt.decision === 'final' : cfg.store(res.status);
    if (!store) {
      await attempt.fail(undefined);
      return { kind: 'original' };
    }
    if (res.body === undefined || res.body.length > cfg.maxResponseBytes)
      throw new IdempotencyResponseNotStorableError(
        res.body === undefined ? 'it was streamed' : `its body has ${res.body.length} bytes, over the ${cfg.maxResponseBytes}-byte cap`,
      );
    response = { status: res.status, headers: storedHeaders(cfg as HttpConfig<unknown>, res.headers), body: res.body };
  } catch (err) {
    // Whatever failed before the outcome could be stored (the app's `store` policy, a header that
    // cannot be stored, a body over the cap) ends the attempt: nothing is stored, the transaction
    // rolls back, the key stays retryable and the connection goes back to the pool.
    await attempt.fail(err);
    return { kind: 'answer', answer: problemResponse(err) };
  }
  try {
    await attempt.finish(response, true);
  } catch (err) {
    // Not committed (lease lost), or the commit's fate is unknown (connection lost during COMMIT):
    // the handler's response must not be sent as if it had been stored.
    return { kind: 'answer', answer: problemResponse(err) };
  }
  return { kind: 'original' };
}
