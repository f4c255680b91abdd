/**
 * Every error pgcoord raises is a {@link PgcoordError} with a stable `code`; match on the code
 * (or `instanceof`), never on the message.
 */
export class PgcoordError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
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

// Driver codes (postgres.js: CONNECTION_*, node: ECONNRESET...) and SQLSTATE classes 08 (connection
// exception) and 57P01-57P03 (admin shutdown, crash shutdown, cannot connect now).
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
    if (typeof code === 'string' && (lostCodes.has(code) || code.startsWith('08') || /^57P0[123]$/.test(code))) return true;
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
    if (code === 'ECONNREFUSED' || code === 'CONNECT_TIMEOUT' || code === 'ENOTFOUND' || code === '57P03') return true;
  }
  return false;
}
