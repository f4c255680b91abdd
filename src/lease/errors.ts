import { PgcoordError, type PgcoordErrorCode, sqlState } from '../errors.js';

/**
 * SQLSTATE raised by `pgcoord.check_fence(name, fence)` when the fence is not the lease's current
 * term (taken over, released or expired): the statement, and the transaction it is in, fail.
 */
export const STALE_FENCE_SQLSTATE = 'PGF01';

/** Why a lease's signal fired. */
export type LeaseLossReason =
  /** The server answered that this term is over: expired, or taken over with a newer fence. */
  | 'lost'
  /** No renewal was confirmed in time: the local trust window (send time + TTL − margin) ran out. */
  | 'lapsed'
  /** The holder released it (`release()`, the end of `withLease`, `stop()`). */
  | 'released';

/**
 * A lease is no longer safely held. As the reason of a lease's `signal`, from `renew()`, and from a
 * fenced write whose fence is not current (pgcoord's own statements map SQLSTATE `PGF01` to it).
 */
export class LeaseLostError extends PgcoordError {
  constructor(
    /** The lease's name. */
    readonly lease: string,
    readonly fence: bigint,
    readonly reason: LeaseLossReason,
    options?: { cause?: unknown; message?: string },
  ) {
    super(
      'PGCOORD_LEASE_LOST',
      options?.message ??
        (reason === 'released'
          ? `lease ${JSON.stringify(lease)} (fence ${fence}) was released`
          : reason === 'lapsed'
            ? `lease ${JSON.stringify(lease)} (fence ${fence}): no renewal confirmed within its TTL; stop work that needs it`
            : `lease ${JSON.stringify(lease)} (fence ${fence}) is no longer held: it expired or was taken over with a newer fence`),
      options && 'cause' in options ? { cause: options.cause } : undefined,
    );
  }
}

/** The lease is held by someone else and the caller asked not to wait (`timeoutMs: 0`). */
export class LeaseNotAcquiredError extends PgcoordError {
  constructor(
    /** The lease's name. */
    readonly lease: string,
    /** The current holder's label, when the server told it. */
    readonly holder: string | undefined,
    /** Milliseconds until the current term expires unless renewed (database clock), when known. */
    readonly expiresInMs: number | undefined,
    code: PgcoordErrorCode = 'PGCOORD_LEASE_NOT_ACQUIRED',
    after = '',
  ) {
    super(
      code,
      `lease ${JSON.stringify(lease)} is held${holder ? ` by ${JSON.stringify(holder)}` : ''}${
        expiresInMs === undefined ? '' : ` (its term ends in ${Math.ceil(expiresInMs)} ms unless renewed)`
      }${after}`,
    );
  }
}

/** The lease was not acquired within `timeoutMs`. */
export class LeaseTimeoutError extends LeaseNotAcquiredError {
  constructor(
    name: string,
    holder: string | undefined,
    expiresInMs: number | undefined,
    readonly timeoutMs: number,
  ) {
    super(name, holder, expiresInMs, 'PGCOORD_LEASE_TIMEOUT', `; not acquired within ${timeoutMs} ms`);
  }
}

/** The lease tables do not exist: run `migrateLeases()` (or `pgcoord generate`'s migration) at deploy time. */
export class LeasesNotMigratedError extends PgcoordError {
  constructor(options?: { cause?: unknown }) {
    super('PGCOORD_LEASES_NOT_MIGRATED', 'pgcoord.leases does not exist: run migrateLeases() at deploy time', options);
  }
}

/**
 * True when `err` says a lease's fence was refused or the lease is lost: a {@link LeaseLostError},
 * or a driver error (drizzle's wrapped one included) with SQLSTATE `PGF01` from
 * `pgcoord.check_fence` in a statement of the caller's own.
 */
export function isLeaseLost(err: unknown): boolean {
  if (err instanceof LeaseLostError) return true;
  return sqlState(err) === STALE_FENCE_SQLSTATE;
}
