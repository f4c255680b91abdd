/**
 * Every code a {@link PgcoordError} can carry, stable across releases: a `switch (err.code)` over
 * {@link PgcoordErrorCode} is checked by the compiler. (HTTP problem bodies may also say
 * `PGCOORD_INTERNAL` for an error that is not pgcoord's.)
 */
export const ERROR_CODES = [
  'PGCOORD_ABORTED',
  'PGCOORD_CLI_FAILED',
  'PGCOORD_CLI_USAGE',
  'PGCOORD_COMMIT_UNKNOWN',
  'PGCOORD_CONNECTION_LOST',
  'PGCOORD_DEADLOCK',
  'PGCOORD_IDEMPOTENCY_BODY_INVALID',
  'PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE',
  'PGCOORD_IDEMPOTENCY_IN_FLIGHT',
  'PGCOORD_IDEMPOTENCY_KEY_INVALID',
  'PGCOORD_IDEMPOTENCY_KEY_MISSING',
  'PGCOORD_IDEMPOTENCY_LEASE_LOST',
  'PGCOORD_IDEMPOTENCY_MIGRATION',
  'PGCOORD_IDEMPOTENCY_MISMATCH',
  'PGCOORD_IDEMPOTENCY_NOT_MIGRATED',
  'PGCOORD_IDEMPOTENCY_RESPONSE_NOT_STORABLE',
  'PGCOORD_IDEMPOTENCY_SCOPE_INVALID',
  'PGCOORD_IDEMPOTENCY_SCOPE_REQUIRED',
  'PGCOORD_IDEMPOTENCY_STORED_FAILURE',
  'PGCOORD_IDEMPOTENCY_UNSTABLE',
  'PGCOORD_INVALID_IDENTIFIER',
  'PGCOORD_INVALID_KEY',
  'PGCOORD_INVALID_OPTION',
  'PGCOORD_JOB_CLAIM_LOST',
  'PGCOORD_LEASES_NOT_MIGRATED',
  'PGCOORD_LEASE_LOST',
  'PGCOORD_LEASE_MIGRATION',
  'PGCOORD_LEASE_NOT_ACQUIRED',
  'PGCOORD_LEASE_TIMEOUT',
  'PGCOORD_LIMITS_NOT_MIGRATED',
  'PGCOORD_LIMIT_MIGRATION',
  'PGCOORD_LOCK_LOST',
  'PGCOORD_LOCK_NOT_ACQUIRED',
  'PGCOORD_LOCK_TIMEOUT',
  'PGCOORD_NOT_IN_TRANSACTION',
  'PGCOORD_QUEUE_MIGRATION',
  'PGCOORD_QUEUE_NOT_MIGRATED',
  'PGCOORD_RATE_LIMIT_TIMEOUT',
  'PGCOORD_RETRY_EXHAUSTED',
  'PGCOORD_ROW_LOCKED',
  'PGCOORD_ROW_NOT_FOUND',
  'PGCOORD_SINGLE_FLIGHT_TIMEOUT',
  'PGCOORD_TRANSACTION_POOLING',
  'PGCOORD_UNSUPPORTED_RUNNER',
  'PGCOORD_VERSION_CONFLICT',
] as const;

/** The union of {@link ERROR_CODES}. */
export type PgcoordErrorCode = (typeof ERROR_CODES)[number];

/**
 * Every error pgcoord raises is a {@link PgcoordError} with a stable `code`; match on the code
 * (or `instanceof`), never on the message.
 */
export class PgcoordError extends Error {
  readonly code: PgcoordErrorCode;
  constructor(code: PgcoordErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** A lock key that is not a key: empty string, unsafe or fractional number, out-of-range bigint. */
export class InvalidKeyError extends PgcoordError {
  constructor(message: string) {
    super('PGCOORD_INVALID_KEY', message);
  }
}

/** An option with a value pgcoord cannot use (negative timeout, unknown mode, ...). */
export class InvalidOptionError extends PgcoordError {
  constructor(message: string) {
    super('PGCOORD_INVALID_OPTION', message);
  }
}

/** The value passed as a runner is not a postgres.js, node-postgres or drizzle handle. */
export class UnsupportedRunnerError extends PgcoordError {
  constructor(message: string) {
    super('PGCOORD_UNSUPPORTED_RUNNER', message);
  }
}

/** The lock was not free and the caller asked not to wait (`timeoutMs: 0`). */
export class LockNotAcquiredError extends PgcoordError {
  constructor(
    readonly key: string,
    options?: { cause?: unknown },
  ) {
    super('PGCOORD_LOCK_NOT_ACQUIRED', `lock ${key} is held by another session`, options);
  }
}

/** The lock was not granted within `timeoutMs` (the server's `lock_timeout` fired). */
export class LockTimeoutError extends PgcoordError {
  constructor(
    readonly key: string,
    readonly timeoutMs: number,
    options?: { cause?: unknown },
  ) {
    super('PGCOORD_LOCK_TIMEOUT', `lock ${key} not granted within ${timeoutMs} ms`, options);
  }
}

/** Postgres detected a deadlock (SQLSTATE 40P01) and chose this transaction as the victim. */
export class DeadlockError extends PgcoordError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('PGCOORD_DEADLOCK', message, options);
  }
}

/** A session lock may no longer be held (its connection closed or stopped answering). */
export class LockLostError extends PgcoordError {
  constructor(
    readonly key: string,
    options?: { cause?: unknown },
  ) {
    super('PGCOORD_LOCK_LOST', `session lock ${key} may no longer be held: its connection was lost`, options);
  }
}

/** The caller's AbortSignal fired; whatever was waiting was cancelled on the server. */
export class AbortedError extends PgcoordError {
  constructor(message = 'operation aborted', options?: { cause?: unknown }) {
    super('PGCOORD_ABORTED', message, options);
  }
}

/**
 * The connection died under a pgcoord operation. The transaction did not commit and no statement
 * of it was sent on another connection; it is safe to retry the whole operation.
 */
export class ConnectionLostError extends PgcoordError {
  constructor(message = 'database connection lost; the transaction did not commit', options?: { cause?: unknown }) {
    super('PGCOORD_CONNECTION_LOST', message, options);
  }
}

/** Session locks were asked for behind a transaction-mode pooler (PgBouncer) where they cannot work. */
export class TransactionPoolingError extends PgcoordError {
  constructor() {
    super(
      'PGCOORD_TRANSACTION_POOLING',
      'the backend changed between two statements on one connection (transaction-mode pooler such as PgBouncer): session locks cannot work here; use transaction-scoped locks (withLock)',
    );
  }
}

/**
 * The SQLSTATE of an error from any driver, looking through `.cause` (drizzle wraps driver
 * errors: the code is on `err.cause.code`).
 */
export function sqlState(err: unknown): string | undefined {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code)) return code;
  }
  return undefined;
}

// Driver codes (postgres.js: CONNECTION_*, node: ECONNRESET...) and the SQLSTATEs a server sends
// as it ends the session: class 08 (connection exception), 57P01-57P03 and 57P05 (admin shutdown,
// crash shutdown, cannot connect now, idle session timeout) and 25P03 (idle in transaction
// session timeout). Only errors of pgcoord's own statements are judged by this: an error thrown
// by a caller's callback (a payment gateway's ECONNREFUSED) says nothing about the connection.
const lostCodes = new Set([
  'CONNECTION_CLOSED',
  'CONNECTION_ENDED',
  'CONNECTION_DESTROYED',
  'CONNECT_TIMEOUT',
  'ECONNRESET',
  'EPIPE',
  'ECONNREFUSED',
  'ETIMEDOUT',
]);

/** True when the error means the connection is gone (so the transaction cannot have committed). */
export function isConnectionLost(err: unknown): boolean {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    if (e instanceof ConnectionLostError) return true;
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && (lostCodes.has(code) || code.startsWith('08') || /^57P0[1235]$/.test(code) || code === '25P03'))
      return true;
    const message = (e as { message?: unknown }).message;
    if (typeof message === 'string' && /Connection terminated|Client was closed|not queryable/i.test(message)) return true;
  }
  return false;
}

/**
 * The connection died while COMMIT was in flight: the transaction may or may not have committed.
 * Check the data (or use an idempotency key) before retrying.
 */
export class CommitUnknownError extends PgcoordError {
  constructor(options?: { cause?: unknown; message?: string }) {
    super(
      'PGCOORD_COMMIT_UNKNOWN',
      options?.message ?? 'database connection lost during COMMIT: the transaction may or may not have committed',
      options && 'cause' in options ? { cause: options.cause } : undefined,
    );
  }
}

/** The connection could not even be opened (refused, timed out connecting): nothing was sent. */
export function isConnectFailure(err: unknown): boolean {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (code === 'ECONNREFUSED' || code === 'CONNECT_TIMEOUT' || code === 'ENOTFOUND' || code === '57P03' || code === '53300') return true;
  }
  return false;
}
