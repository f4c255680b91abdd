import { PgcoordError } from '../errors.js';

/** `waitForLimit` did not get a turn within `timeoutMs`. */
export class RateLimitTimeoutError extends PgcoordError {
  constructor(
    readonly key: string,
    readonly timeoutMs: number,
    /** When the next turn comes, as the server last said. */
    readonly retryAfterMs: number,
  ) {
    super(
      'PGCOORD_RATE_LIMIT_TIMEOUT',
      `rate limit ${JSON.stringify(key)}: no turn within ${timeoutMs} ms (next in ${Math.ceil(retryAfterMs)} ms)`,
    );
  }
}

/** The limit tables do not exist: run `migrateLimits()` at deploy time. */
export class LimitsNotMigratedError extends PgcoordError {
  constructor(options?: { cause?: unknown }) {
    super('PGCOORD_LIMITS_NOT_MIGRATED', 'pgcoord.rate_limits does not exist: run migrateLimits() at deploy time', options);
  }
}
