// The options of an idempotent call, its public types, and their checks: everything is refused
// before any statement is sent.

import type { Isolation } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { IdempotencyKeyInvalidError, IdempotencyScopeInvalidError, IdempotencyScopeRequiredError } from './errors.js';
import { fingerprintOf } from './fingerprint.js';
import type { IdempotencyTableNames } from './schema.js';
import { type Sql, statementsFor } from './statements.js';

/** `transactional`: one transaction for claim, work and result. `phased`: committed phases with recovery points. */
export type IdempotencyMode = 'transactional' | 'phased';

/** Options of {@link idempotent} (and of the HTTP middleware, which fills scope, key and fingerprint). */
export interface IdempotencyOptions {
  /**
   * Tenant / user / API client the key belongs to: up to 255 characters, no NUL, no lone surrogate
   * ({@link IdempotencyScopeInvalidError} otherwise). Required unless `unscoped: true`.
   */
  scope?: string;
  /** Explicit opt-out of scoping: every caller shares one key space. */
  unscoped?: boolean;
  /** The idempotency key: 1 to 255 characters, no control characters, no lone surrogate. */
  key: string;
  /**
   * What the key must keep meaning: any JSON value, fingerprinted with SHA-256 over RFC 8785 JSON
   * (see {@link canonicalJson}: values JSON cannot represent exactly are refused).
   */
  request?: unknown;
  /** A ready fingerprint (bytes), instead of `request`. */
  fingerprint?: Uint8Array;
  /** Default `'transactional'`. */
  mode?: IdempotencyMode;
  /** Phased mode: how long an attempt holds the key without a heartbeat. Default 10 000 ms. */
  leaseMs?: number;
  /** Phased mode: heartbeat period. Default a third of `leaseMs`. */
  heartbeatMs?: number;
  /** How long a result is kept for replay (and the key blocked for other requests). Default 24 h. */
  retentionMs?: number;
  /**
   * A repeat arriving while the first attempt runs waits up to this long for its result, then gets
   * {@link IdempotencyInFlightError} (HTTP 409 with Retry-After). `0`: answer 409 at once. Default 10 000 ms.
   * A waiting repeat holds no pooled connection between its short claims (50 ms each at most).
   */
  waitMs?: number;
  /** Transactional mode, pgcoord's own transaction: its isolation level. */
  isolation?: Isolation;
  /** Abort to give up waiting / cancel the running statement. */
  signal?: AbortSignal;
  /** Where the table is. Default `pgcoord.idempotency_keys`. */
  table?: IdempotencyTableNames;
  /** Secret for the per-phase downstream keys (HMAC-SHA-256). Default: a fixed public salt. */
  phaseSecret?: string | Buffer;
}

/** A stored outcome: HTTP-shaped so the middleware can replay it byte for byte. */
export interface StoredResponse {
  status: number;
  /** Allow-listed headers only, lower-case names. */
  headers: Record<string, string>;
  /** Exact body bytes. */
  body: Buffer;
}

/** What a phase callback gets besides the transaction. */
export interface PhaseContext {
  /** Stable key for this (scope, key, phase), the same in every attempt: pass it downstream. */
  key: string;
  /** Aborted when the lease is lost or the caller aborts. */
  signal: AbortSignal;
}

/** What the handler gets. */
export interface IdempotentContext<H> {
  /** Transactional mode: the transaction everything commits in. Phased mode: throws (each phase has its own). */
  readonly tx: H;
  /** Aborted when the lease is lost (phased), the connection dies, or the caller aborts. */
  readonly signal: AbortSignal;
  /** 1 for the first attempt on this key, 2 after one failed or abandoned attempt, ... */
  readonly attempt: number;
  readonly scope: string;
  readonly key: string;
  /** The last committed phase (`started` before any). */
  readonly recoveryPoint: string;
  /**
   * Run a named phase. Phased mode: runs `fn` in its own transaction that also records the phase
   * as the recovery point (fenced by the lease), and returns its (JSON) result; on a retry, a phase
   * already committed is not run again: its stored result is returned. Transactional mode: runs
   * `fn` in the one transaction.
   */
  phase<T>(name: string, fn: (tx: H, phase: PhaseContext) => Promise<T> | T): Promise<T>;
  /** The stable downstream key of a phase (see {@link PhaseContext.key}). */
  phaseKey(name: string): string;
  /** Override what happens to the outcome: `final` stores it, `retryable` does not (the key can be retried). */
  decide(outcome: 'final' | 'retryable'): void;
}

/** What {@link idempotent} resolves to. */
export interface IdempotentResult<T> {
  /** The handler's result as stored (JSON round trip), the same on the first call and on replays. */
  value: T;
  /** True when the handler did not run: this is the stored result of an earlier attempt. */
  replayed: boolean;
}

const MAX = 2_147_483_647;

function int(name: string, value: unknown, fallback: number, min: number, max = MAX): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new InvalidOptionError(`${name} must be an integer from ${min} to ${max}, got ${String(value)}`);
  }
  return value;
}

/**
 * Validate a key for the wrapper: a string of 1 to 255 characters, no control characters, well-formed
 * UTF-16 (a lone surrogate is sent as U+FFFD by the drivers: 'k\uD800' would be the key 'k\uFFFD').
 */
export function checkKey(key: unknown): string {
  if (typeof key !== 'string') throw new IdempotencyKeyInvalidError(`expected a string, got ${key === null ? 'null' : typeof key}`);
  if (key.length === 0) throw new IdempotencyKeyInvalidError('it is empty');
  if (key.length > 255) throw new IdempotencyKeyInvalidError(`it has ${key.length} characters, at most 255 are allowed`);
  const problem = textProblem(key);
  if (problem !== undefined) throw new IdempotencyKeyInvalidError(`it ${problem}`);
  // biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what is refused here
  if (/[\u0000-\u001f\u007f]/.test(key)) throw new IdempotencyKeyInvalidError('it contains control characters');
  return key;
}

/** Checked options. */
export interface Checked {
  scope: string;
  key: string;
  fingerprint: Buffer;
  mode: IdempotencyMode;
  leaseMs: number;
  heartbeatMs: number;
  retentionMs: number;
  waitMs: number;
  isolation: Isolation | undefined;
  signal: AbortSignal | undefined;
  sql: Sql;
  secret: string | Buffer | undefined;
}

/**
 * Validate a scope: a string of at most 255 characters that can be an identity. It often comes from
 * the client (a JWT claim, a header), so every problem is a typed 400, and it is checked before any
 * statement is sent: a lone surrogate would reach the server as U+FFFD, and the tenant
 * 'a\uD800' would then replay the results of the tenant 'a\uFFFD'.
 */
function checkScope(scope: unknown, unscoped: boolean): string {
  if (scope === undefined || scope === null || scope === '') {
    if (!unscoped) throw new IdempotencyScopeRequiredError();
    return '';
  }
  if (typeof scope !== 'string') throw new IdempotencyScopeInvalidError(`expected a string, got ${describe(scope)}`);
  if (scope.length > 255) throw new IdempotencyScopeInvalidError(`it has ${scope.length} characters, at most 255 are allowed`);
  const problem = textProblem(scope);
  if (problem !== undefined) throw new IdempotencyScopeInvalidError(`it ${problem}`);
  return scope;
}

export function checkOptions(o: IdempotencyOptions): Checked {
  if (o === null || typeof o !== 'object') throw new InvalidOptionError('idempotency options must be an object');
  const key = checkKey(o.key);
  const scope = checkScope(o.scope, o.unscoped === true);
  const mode = o.mode ?? 'transactional';
  if (mode !== 'transactional' && mode !== 'phased')
    throw new InvalidOptionError(`mode must be 'transactional' or 'phased', got ${JSON.stringify(mode)}`);
  const leaseMs = int('leaseMs', o.leaseMs, mode === 'phased' ? 10_000 : 60_000, 100, 86_400_000);
  const heartbeatMs = int('heartbeatMs', o.heartbeatMs, Math.max(30, Math.floor(leaseMs / 3)), 10, leaseMs - 1);
  const retentionMs = int('retentionMs', o.retentionMs, 86_400_000, 1, 366 * 86_400_000);
  const waitMs = int('waitMs', o.waitMs, 10_000, 0);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  let fingerprint: Buffer;
  if (o.fingerprint !== undefined) {
    if (!(o.fingerprint instanceof Uint8Array) || o.fingerprint.length === 0 || o.fingerprint.length > 64)
      throw new InvalidOptionError('fingerprint must be 1 to 64 bytes (a Buffer or Uint8Array)');
    fingerprint = Buffer.from(o.fingerprint);
  } else fingerprint = fingerprintOf(o.request === undefined ? null : o.request);
  if (o.phaseSecret !== undefined && typeof o.phaseSecret !== 'string' && !Buffer.isBuffer(o.phaseSecret))
    throw new InvalidOptionError('phaseSecret must be a string or a Buffer');
  let sql: Sql;
  try {
    sql = statementsFor(o.table ?? {});
  } catch (err) {
    throw err instanceof TypeError ? new InvalidOptionError(err.message) : err;
  }
  return {
    scope,
    key,
    fingerprint,
    mode,
    leaseMs,
    heartbeatMs,
    retentionMs,
    waitMs,
    isolation: o.isolation,
    signal: o.signal,
    sql,
    secret: o.phaseSecret,
  };
}
