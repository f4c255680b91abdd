// Typed errors of the idempotency feature. Each has a stable `code` and, where it maps to an HTTP
// answer, the `status` the middleware sends (as application/problem+json).

import { PgcoordError, type PgcoordErrorCode } from '../errors.js';

/** Base of idempotency errors that map to an HTTP status. */
export class IdempotencyError extends PgcoordError {
  constructor(
    code: PgcoordErrorCode,
    message: string,
    readonly status: number,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

/** The request needs an `Idempotency-Key` and has none (HTTP 400). */
export class IdempotencyKeyMissingError extends IdempotencyError {
  constructor(header = 'Idempotency-Key') {
    super('PGCOORD_IDEMPOTENCY_KEY_MISSING', `this request requires an ${header} header`, 400);
  }
}

/**
 * The key is empty, too long, or has characters outside the allowed set: control characters, NUL,
 * or a lone surrogate (HTTP 400). Also raised for a phase name that cannot be an identity (NUL or
 * a lone surrogate), since it is part of the phase's own key.
 */
export class IdempotencyKeyInvalidError extends IdempotencyError {
  constructor(reason: string, what = 'idempotency key') {
    super('PGCOORD_IDEMPOTENCY_KEY_INVALID', `invalid ${what}: ${reason}`, 400);
  }
}

/**
 * No scope (tenant / user / client) for the key, and the caller did not opt out with
 * `unscoped: true`. HTTP 400: over HTTP it means the request carried no tenant / principal the
 * resolver could find (a 5xx would make clients retry a request that can never succeed).
 */
export class IdempotencyScopeRequiredError extends IdempotencyError {
  constructor(message = 'an idempotency scope is required (tenant, user or API client); pass `scope`, or `unscoped: true` to opt out') {
    super('PGCOORD_IDEMPOTENCY_SCOPE_REQUIRED', message, 400);
  }
}

/**
 * The scope is not a string, is over 255 characters, or cannot be an identity: it holds NUL or a
 * lone surrogate, which the driver would send as U+FFFD, so two tenants would share keys (HTTP 400).
 */
export class IdempotencyScopeInvalidError extends IdempotencyError {
  constructor(reason: string) {
    super('PGCOORD_IDEMPOTENCY_SCOPE_INVALID', `invalid idempotency scope: ${reason}`, 400);
  }
}

/** The key was used before with a different request (method, route, body or chosen headers) (HTTP 422). */
export class IdempotencyMismatchError extends IdempotencyError {
  constructor(
    readonly scope: string,
    readonly key: string,
  ) {
    super(
      'PGCOORD_IDEMPOTENCY_MISMATCH',
      `idempotency key ${JSON.stringify(key)} was already used with a different request; use a new key for a new request`,
      422,
    );
  }
}

/** Another attempt with this key is still running (HTTP 409 with Retry-After). */
export class IdempotencyInFlightError extends IdempotencyError {
  constructor(
    readonly scope: string,
    readonly key: string,
    /** When a retry may find the result (or the lease expired). */
    readonly retryAfterMs: number,
  ) {
    super(
      'PGCOORD_IDEMPOTENCY_IN_FLIGHT',
      `a request with idempotency key ${JSON.stringify(key)} is still being processed; retry in ${Math.ceil(retryAfterMs / 1000)} s`,
      409,
    );
  }
}

/**
 * This attempt no longer holds the key: its lease expired and another attempt took over, or its
 * heartbeat could not be confirmed before the lease ran out. Its writes were not committed.
 */
export class IdempotencyLeaseLostError extends IdempotencyError {
  constructor(
    readonly scope: string,
    readonly key: string,
    reason = 'its lease expired and another attempt may have taken over',
  ) {
    super('PGCOORD_IDEMPOTENCY_LEASE_LOST', `idempotency key ${JSON.stringify(key)} is no longer held by this attempt: ${reason}`, 503);
  }
}

/** The request body is larger than the configured cap, or not readable as a bounded body (HTTP 413). */
export class IdempotencyBodyTooLargeError extends IdempotencyError {
  constructor(readonly limitBytes: number) {
    super('PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE', `request body exceeds the idempotency limit of ${limitBytes} bytes`, 413);
  }
}

/** The request body could not be parsed (invalid JSON) (HTTP 400). */
export class IdempotencyBodyInvalidError extends IdempotencyError {
  constructor(reason: string, options?: { cause?: unknown }) {
    super('PGCOORD_IDEMPOTENCY_BODY_INVALID', `request body could not be read: ${reason}`, 400, options);
  }
}

/** The handler's response could not be stored (larger than the cap, or streamed); nothing was committed (HTTP 500). */
export class IdempotencyResponseNotStorableError extends IdempotencyError {
  constructor(reason: string) {
    super(
      'PGCOORD_IDEMPOTENCY_RESPONSE_NOT_STORABLE',
      `the response could not be stored for replay: ${reason}; nothing was committed`,
      500,
    );
  }
}

/** The idempotency table does not exist: run `migrate()` (or the shipped migrations) at deploy time. */
export class IdempotencyNotMigratedError extends IdempotencyError {
  constructor(table: string, options?: { cause?: unknown }) {
    super(
      'PGCOORD_IDEMPOTENCY_NOT_MIGRATED',
      `idempotency table ${table} does not exist: run migrateIdempotency() (or pgcoord generate) at deploy time`,
      500,
      options,
    );
  }
}

/** A migration already applied differs from the shipped one (edited after release), or the folder is unreadable. */
export class IdempotencyMigrationError extends IdempotencyError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('PGCOORD_IDEMPOTENCY_MIGRATION', message, 500, options);
  }
}

/**
 * The stored outcome of this key is a final failure (a handler threw {@link FinalFailure}). The
 * first call and every repeat get this same error, with the stored `status` and `body`.
 */
export class IdempotentFailureError extends IdempotencyError {
  constructor(
    readonly key: string,
    status: number,
    readonly body: unknown,
    readonly replayed: boolean,
  ) {
    super(
      'PGCOORD_IDEMPOTENCY_STORED_FAILURE',
      `idempotency key ${JSON.stringify(key)} ended in a stored final failure (${status})`,
      status,
    );
  }
}

/**
 * Throw from a handler to make the failure final: it is stored like a result, and repeats of the
 * key get it back (as {@link IdempotentFailureError}) without running the handler again. Any other
 * thrown error leaves the key retryable.
 *
 * @example
 * if (!card.valid) throw new FinalFailure({ error: 'card_declined' }, { status: 402 });
 */
export class FinalFailure extends Error {
  readonly status: number;
  constructor(
    readonly body: unknown,
    options: { status?: number; cause?: unknown } = {},
  ) {
    super(`final failure (${options.status ?? 422})`, { cause: options.cause });
    this.name = 'FinalFailure';
    this.status = options.status ?? 422;
  }
}
