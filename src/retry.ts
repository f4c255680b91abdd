import { performance } from 'node:perf_hooks';
import { type Isolation, inTransaction, isTransaction, type Runner, type TransactionOptions } from './driver/index.js';
import { AbortedError, InvalidOptionError, LockNotAcquiredError, LockTimeoutError, PgcoordError, sqlState } from './errors.js';
import type { HandleOf } from './handles.js';
import { VersionConflictError } from './optimistic.js';
import { RowLockedError } from './row-locks.js';
import { checkRunOptions } from './sql-target.js';
import { describe } from './text.js';
import { type TraceContext, traced } from './trace.js';

/**
 * Why a failure may be retried: another writer moved the version, Postgres aborted a serializable
 * transaction (40001) or picked it as a deadlock victim (40P01), or (only when asked) a lock was not
 * available (55P03: `nowait`, `lock_timeout`).
 */
export type RetryReason = 'version-conflict' | 'serialization' | 'deadlock' | 'lock-not-available';

const reasons: readonly RetryReason[] = ['version-conflict', 'serialization', 'deadlock', 'lock-not-available'];
const DEFAULT_RETRY_ON: readonly RetryReason[] = ['version-conflict', 'serialization', 'deadlock'];

/** What one attempt gets. */
export interface Attempt {
  /** 1 for the first try. */
  attempt: number;
  /** The caller's signal, to pass on to lock waits. */
  signal: AbortSignal | undefined;
}

/** How to retry. */
export interface RetryOptions {
  /** Total tries, the first included. Default 5. */
  attempts?: number;
  /** Stop retrying once this many ms have passed since the first try (a running attempt is not interrupted). */
  deadlineMs?: number;
  /**
   * Backoff before retry n is random in [0, min(maxMs, baseMs * 2^(n-1))] ("full jitter"). Default 10.
   * At most 2147483647 (Node's longest timer), as `maxMs`.
   */
  baseMs?: number;
  /** Default 1000; at most 2147483647. */
  maxMs?: number;
  /** Abort to stop: the pending backoff ends at once and the retry rejects with {@link AbortedError}. */
  signal?: AbortSignal;
  /** Default `['version-conflict', 'serialization', 'deadlock']`; add `'lock-not-available'` to retry 55P03. */
  retryOn?: readonly RetryReason[];
  /** Called before each backoff (for logs and metrics). */
  onRetry?: (info: { attempt: number; reason: RetryReason; error: unknown; delayMs: number }) => void;
}

/**
 * Every allowed attempt failed with a retryable error, or the deadline passed; `cause` is the last error.
 *
 * @example
 * catch (e) { if (e instanceof RetryExhaustedError) log.warn(`gave up after ${e.attempts}`, e.cause) }
 */
export class RetryExhaustedError extends PgcoordError {
  constructor(
    readonly attempts: number,
    readonly elapsedMs: number,
    last: unknown,
  ) {
    super('PGCOORD_RETRY_EXHAUSTED', `gave up after ${attempts} attempt${attempts === 1 ? '' : 's'} (${Math.round(elapsedMs)} ms)`, {
      cause: last,
    });
  }
}

/**
 * The reason `err` may be retried, or undefined. SQLSTATEs are found through `.cause`, so driver
 * errors wrapped by drizzle or by pgcoord's typed errors count.
 *
 * @example
 * retryReason(err) === 'serialization' // SQLSTATE 40001
 */
export function retryReason(err: unknown): RetryReason | undefined {
  if (err instanceof VersionConflictError) return 'version-conflict';
  const state = sqlState(err);
  if (state === '40001') return 'serialization';
  if (state === '40P01') return 'deadlock';
  if (state === '55P03' || err instanceof LockTimeoutError || err instanceof LockNotAcquiredError || err instanceof RowLockedError)
    return 'lock-not-available';
  return undefined;
}

interface Checked {
  attempts: number;
  deadlineMs: number | undefined;
  baseMs: number;
  maxMs: number;
  signal: AbortSignal | undefined;
  retryOn: readonly RetryReason[];
  onRetry: RetryOptions['onRetry'];
}

function nonNegative(name: string, value: unknown): void {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0)
    throw new InvalidOptionError(`${name} must be a finite number >= 0, got ${describe(value)}`);
}

// Node's timers take at most 2^31 - 1 ms; a longer delay fires at once (with a warning).
const TIMER_MAX = 2_147_483_647;

function delayBound(name: string, value: unknown): void {
  nonNegative(name, value);
  if ((value as number) > TIMER_MAX)
    throw new InvalidOptionError(`${name} must be at most ${TIMER_MAX} (Node's longest timer), got ${value}`);
}

function check(options: RetryOptions): Checked {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError(`options must be an object, got ${describe(options)}`);
  const { attempts = 5, deadlineMs, baseMs = 10, maxMs = 1000, signal, retryOn = DEFAULT_RETRY_ON, onRetry } = options;
  if (typeof attempts !== 'number' || !Number.isInteger(attempts) || attempts < 1)
    throw new InvalidOptionError(`attempts must be an integer >= 1, got ${describe(attempts)}`);
  if (deadlineMs !== undefined) nonNegative('deadlineMs', deadlineMs);
  delayBound('baseMs', baseMs);
  delayBound('maxMs', maxMs);
  if (signal !== undefined && !(signal instanceof AbortSignal))
    throw new InvalidOptionError(`signal must be an AbortSignal, got ${describe(signal)}`);
  if (retryOn !== DEFAULT_RETRY_ON && !(Array.isArray(retryOn) && retryOn.every((r) => reasons.includes(r))))
    throw new InvalidOptionError(`retryOn must list reasons among ${reasons.map((r) => `'${r}'`).join(', ')}`);
  if (onRetry !== undefined && typeof onRetry !== 'function') throw new InvalidOptionError('onRetry must be a function');
  return { attempts, deadlineMs, baseMs, maxMs, signal, retryOn, onRetry };
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = () => {
      signal?.removeEventListener('abort', abort);
      resolve();
    };
    const timer = setTimeout(done, ms);
    const abort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener('abort', abort, { once: true });
  });
}

/**
 * Run `fn` until it succeeds, retrying only failures that are safe to retry (see
 * {@link retryReason}) with exponential backoff and full jitter. `fn` must be the whole
 * read-modify-write (read, decide, write), never just the write: a retry re-reads.
 * Non-retryable errors pass through untouched, on the first attempt.
 *
 * Inside a caller's transaction only version conflicts can be retried usefully: after 40001 or
 * 40P01 that transaction is aborted, so retry where the transaction is opened
 * ({@link transactionWithRetry}).
 *
 * @throws {@link RetryExhaustedError} (attempt count, last error as `cause`), {@link AbortedError}.
 *
 * @example
 * await retry(async () => {
 *   const [o] = await sql`select * from orders where id = ${id}`;
 *   if (o.refunded + amount > o.total) return false;
 *   await updateVersioned(sql, { table: 'orders', key: { id }, set: { refunded: o.refunded + amount }, expected: o.version });
 *   return true;
 * }, { attempts: 10, deadlineMs: 2000 });
 */
export function retry<T>(fn: (attempt: Attempt) => Promise<T> | T, options: RetryOptions = {}): Promise<T> {
  return traced(
    'retry',
    () => ({ operation: 'retry' }),
    async (ctx) => {
      if (typeof fn !== 'function') throw new InvalidOptionError('the callback must be a function');
      return loop(fn, check(options), ctx);
    },
  );
}

async function loop<T>(fn: (attempt: Attempt) => Promise<T> | T, o: Checked, ctx: TraceContext | undefined): Promise<T> {
  const started = performance.now();
  let last: unknown;
  for (let attempt = 1; ; attempt++) {
    if (o.signal?.aborted) throw new AbortedError('retry aborted', { cause: last ?? o.signal.reason });
    if (ctx) ctx.attempts = attempt;
    try {
      return await fn({ attempt, signal: o.signal });
    } catch (err) {
      const reason = retryReason(err);
      if (reason === undefined || !o.retryOn.includes(reason)) throw err;
      if (ctx) ctx.reasons = [...(ctx.reasons ?? []), reason];
      last = err;
      if (o.signal?.aborted) throw new AbortedError('retry aborted', { cause: err });
      const elapsed = performance.now() - started;
      if (attempt >= o.attempts) throw new RetryExhaustedError(attempt, elapsed, err);
      // (the exponent is capped: 2^1024 is Infinity, and 0 * Infinity is NaN)
      const delayMs = Math.random() * Math.min(o.maxMs, o.baseMs * 2 ** Math.min(attempt - 1, 31));
      if (o.deadlineMs !== undefined && elapsed + delayMs >= o.deadlineMs) throw new RetryExhaustedError(attempt, elapsed, err);
      o.onRetry?.({ attempt, reason, error: err, delayMs });
      try {
        await sleep(delayMs, o.signal);
      } catch {
        throw new AbortedError('retry aborted', { cause: err });
      }
    }
  }
}

/** Options for {@link transactionWithRetry}: isolation (default `'serializable'`), read only, and retry options. */
export interface TransactionRetryOptions extends RetryOptions, TransactionOptions {}

const rank: Record<Isolation, number> = { 'read committed': 1, 'repeatable read': 2, serializable: 3 };

/**
 * Run `fn` in a transaction at `isolation` (default `'serializable'`) and run the whole
 * transaction again, from BEGIN, when it fails with a serialization failure (40001), a deadlock
 * (40P01) or a version conflict, with the backoff of {@link retry}. `fn` may run several times:
 * keep side effects outside the database out of it, or make them idempotent.
 *
 * Given a caller's transaction it cannot retry (the failed transaction belongs to the caller):
 * it joins, runs `fn` once, and lets every error through untouched so the code that opened the
 * transaction can retry it. If you pass `isolation` explicitly, it checks that the caller's
 * transaction is at least that strict and throws {@link InvalidOptionError} otherwise.
 *
 * @example
 * const ok = await transactionWithRetry(sql, async (tx) => {
 *   const [o] = await tx`select total, refunded from orders where id = ${id}`;
 *   if (o.refunded + amount > o.total) return false;
 *   await tx`update orders set refunded = refunded + ${amount} where id = ${id}`;
 *   return true;
 * }, { attempts: 20 });
 */
export function transactionWithRetry<R extends Runner, T>(
  runner: R,
  fn: (tx: HandleOf<R>, attempt: Attempt) => Promise<T> | T,
  options: TransactionRetryOptions = {},
): Promise<T> {
  return traced(
    'retry',
    () => ({ operation: 'transactionWithRetry' }),
    (ctx) => retried(runner, fn, options, ctx),
  );
}

async function retried<R extends Runner, T>(
  runner: R,
  fn: (tx: HandleOf<R>, attempt: Attempt) => Promise<T> | T,
  options: TransactionRetryOptions,
  ctx: TraceContext | undefined,
): Promise<T> {
  if (typeof fn !== 'function') throw new InvalidOptionError('the callback must be a function');
  checkRunOptions(options); // null, isolation, readOnly, signal: before any statement is sent
  const { isolation, readOnly, ...retryOptions } = options;
  check(retryOptions);
  if (isTransaction(runner)) {
    if (retryOptions.signal?.aborted) throw new AbortedError('retry aborted', { cause: retryOptions.signal.reason });
    return inTransaction<HandleOf<R>, T>(runner, {}, async (scope) => {
      if (isolation !== undefined) {
        const [rows] = await scope.conn.send([{ text: "select current_setting('transaction_isolation') as iso" }]);
        const current = String(rows?.[0]?.iso) as Isolation;
        if ((rank[current] ?? 0) < rank[isolation])
          throw new InvalidOptionError(`the caller's transaction runs at ${current}, weaker than the ${isolation} asked for`);
      }
      return scope.call((tx) => fn(tx, { attempt: 1, signal: retryOptions.signal }));
    });
  }
  const txOptions: TransactionOptions = { isolation: isolation ?? 'serializable', readOnly };
  return loop(
    (attempt) =>
      inTransaction<HandleOf<R>, T>(runner, txOptions, async (scope) => {
        await scope.conn.send([]); // BEGIN (with the isolation level) before fn runs
        return scope.call((tx) => fn(tx, attempt));
      }),
    check(retryOptions),
    ctx,
  );
}
