// Leases: a named term held by one owner at a time, kept alive by renewals, ended by release or
// expiry, each term with a fencing token greater than every earlier one (statements.ts says why).
//
// Every expiry is decided on the database clock. The holder's own view is a trust window measured
// on its monotonic clock from the moment it *sent* the statement the server confirmed: the server's
// term started no earlier, so the window (send time + TTL − margin) ends before the server's term
// does. When it runs out without a confirmed renewal, the lease's signal aborts, before anyone else
// can take over. A renewal that fails for a transient reason (a lost connection, an unknown commit)
// claims nothing and is tried again while the window lasts.

import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { performance } from 'node:perf_hooks';
import { inTransaction, isTransaction, type Row, type Runner, runStatement, type Scope, type Statement } from '../driver/index.js';
import { abortedBy, noop } from '../driver/lifecycle.js';
import { CommitUnknownError, InvalidOptionError, PgcoordError, sqlState, UnsupportedRunnerError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { publishLost, traced } from '../trace.js';
import { arm, joinWaiters } from '../wake.js';
import {
  type LeaseLossReason,
  LeaseLostError,
  LeaseNotAcquiredError,
  LeasesNotMigratedError,
  LeaseTimeoutError,
  STALE_FENCE_SQLSTATE,
} from './errors.js';
import {
  abandonStatement,
  acquireStatement,
  checkFenceStatement,
  RELEASE_CHANNEL,
  releaseStatement,
  renewStatement,
} from './statements.js';

const MAX_MS = 2_147_483_647;
const MIN_TTL_MS = 100;

/** Options of {@link acquireLease}, {@link tryAcquireLease} and {@link withLease}. */
export interface LeaseOptions {
  /** How long a term lasts without renewal, in ms (100 to 2147483647), on the database clock. */
  ttlMs: number;
  /**
   * How long to wait for the lease: `0` tries once; omitted waits until it is acquired or `signal`
   * aborts. Waiters wake when the holder releases (LISTEN/NOTIFY) or its term ends.
   */
  timeoutMs?: number;
  /** Aborts the wait for the lease ({@link AbortedError}). It does not end a lease once held. */
  signal?: AbortSignal;
  /** Who holds it, for people (`pgcoord leases`). Default `<hostname>:<pid>`. */
  holder?: string;
  /**
   * Renew every this many ms while held (default a third of `ttlMs`); `false`: never by itself,
   * call `renew()`. A failed renewal is retried sooner while the trust window lasts.
   */
  renewEveryMs?: number | false;
  /**
   * Safety margin in ms: the holder's trust window ends this long before the server's term could
   * (default a fifth of `ttlMs`). It covers the time to stop work once `signal` fires.
   */
  marginMs?: number;
}

/** A held lease. Watch `signal`; pass the lease to {@link withFence} for writes that must be fenced. */
export interface Lease extends AsyncDisposable {
  /** The lease's name. */
  readonly name: string;
  /**
   * The fencing token of this term: greater than every fence handed out before it for this name.
   * Hand it to other systems so they can refuse writes carrying an older one.
   */
  readonly fence: bigint;
  /** The owner token of this term (random per acquisition). */
  readonly token: string;
  /**
   * Aborts (reason: {@link LeaseLostError}) the moment the lease is no longer safely held: the
   * server said the term is over, no renewal was confirmed within the trust window, or it was
   * released. Stop the protected work when it fires.
   */
  readonly signal: AbortSignal;
  /** Milliseconds left in the trust window (0 once the signal aborted). */
  remainingMs(): number;
  /**
   * Renew now. Resolves once the server confirmed the new term end; rejects with
   * {@link LeaseLostError} when the term is over, or with the connection's error (then the lease
   * is still held until its trust window runs out, and the heartbeat keeps trying).
   */
  renew(): Promise<void>;
  /**
   * End the term and wake waiters. Aborts `signal` first. Resolves true when this call ended the
   * term, false when it was already over; rejects when the server could not be told (the term then
   * ends at its expiry).
   */
  release(): Promise<boolean>;
}

export interface Checked {
  name: string;
  ttlMs: number;
  timeoutMs: number | undefined;
  signal: AbortSignal | undefined;
  holder: string;
  renewEveryMs: number | false;
  marginMs: number;
}

const isMs = (v: unknown, min = 0): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= MAX_MS;

/** Check a lease name: a string of 1 to 255 characters, no NUL, well-formed. */
export function checkLeaseName(name: unknown): string {
  if (typeof name !== 'string' || name.length === 0 || name.length > 255)
    throw new InvalidOptionError(`lease name must be a string of 1 to 255 characters, got ${describe(name)}`);
  const problem = textProblem(name);
  if (problem) throw new InvalidOptionError(`lease name ${problem}`);
  return name;
}

/** Check a lease's name and options (everything refused before any statement is sent). */
export function checkLeaseOptions(name: unknown, options: LeaseOptions): Checked {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('lease options must be an object with ttlMs');
  const { ttlMs, timeoutMs, signal, holder, renewEveryMs, marginMs } = options;
  const checkedName = checkLeaseName(name);
  if (!isMs(ttlMs, MIN_TTL_MS))
    throw new InvalidOptionError(`ttlMs must be an integer from ${MIN_TTL_MS} to ${MAX_MS}, got ${describe(ttlMs)}`);
  if (timeoutMs !== undefined && !isMs(timeoutMs))
    throw new InvalidOptionError(`timeoutMs must be an integer from 0 to ${MAX_MS} (or omitted to wait), got ${describe(timeoutMs)}`);
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  const margin = marginMs ?? Math.floor(ttlMs / 5);
  if (!isMs(margin) || margin >= ttlMs / 2)
    throw new InvalidOptionError(`marginMs must be an integer from 0 to less than half of ttlMs, got ${describe(marginMs)}`);
  const every = renewEveryMs ?? Math.floor(ttlMs / 3);
  if (every !== false && (!isMs(every, 10) || every >= ttlMs - margin))
    throw new InvalidOptionError(
      `renewEveryMs must be false or an integer from 10 to less than ttlMs - marginMs (${ttlMs - margin}), got ${describe(renewEveryMs)}`,
    );
  let label = `${hostname()}:${process.pid}`;
  if (holder !== undefined) {
    if (typeof holder !== 'string' || holder.length === 0 || holder.length > 200)
      throw new InvalidOptionError(`holder must be a string of 1 to 200 characters, got ${describe(holder)}`);
    const problem = textProblem(holder);
    if (problem) throw new InvalidOptionError(`holder ${problem}`);
    label = holder;
  }
  return { name: checkedName, ttlMs, timeoutMs, signal, holder: label, renewEveryMs: every, marginMs: margin };
}

/** A lease statement's failure: the table missing is a deploy step not taken; a stale fence is a lost lease. */
function leaseError(err: unknown, lease?: { name: string; fence: bigint }): unknown {
  const state = sqlState(err);
  if (state === STALE_FENCE_SQLSTATE && lease) return new LeaseLostError(lease.name, lease.fence, 'lost', { cause: err });
  if (state === '42P01' || state === '42883' || state === '3F000') return new LeasesNotMigratedError({ cause: err });
  return err;
}

export class HeldLease implements Lease {
  readonly #controller = new AbortController();
  readonly signal: AbortSignal = this.#controller.signal;
  #deadline: number;
  #deadlineTimer: ReturnType<typeof setTimeout> | undefined;
  #heartbeat: ReturnType<typeof setTimeout> | undefined;
  #renewing: Promise<void> | undefined;
  #released: Promise<boolean> | undefined;

  constructor(
    readonly runner: Runner,
    readonly name: string,
    readonly fence: bigint,
    readonly token: string,
    readonly opts: Checked,
    sentAt: number,
  ) {
    this.#deadline = sentAt + opts.ttlMs - opts.marginMs;
    this.#armDeadline();
    this.#beat(opts.renewEveryMs === false ? undefined : opts.renewEveryMs);
  }

  remainingMs(): number {
    return this.signal.aborted ? 0 : Math.max(0, this.#deadline - performance.now());
  }

  #armDeadline(): void {
    clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = setTimeout(() => this.#lose('lapsed'), Math.max(0, this.#deadline - performance.now()));
    this.#deadlineTimer.unref?.();
  }

  #beat(ms: number | undefined): void {
    clearTimeout(this.#heartbeat);
    if (ms === undefined || this.signal.aborted) return;
    this.#heartbeat = setTimeout(() => {
      this.renew().then(
        () => this.#beat(this.opts.renewEveryMs === false ? undefined : this.opts.renewEveryMs),
        // transient: try again sooner, while the window lasts (a lost lease has stopped the beat)
        () => this.#beat(Math.max(10, Math.min(ms, Math.floor(this.remainingMs() / 4)))),
      );
    }, ms);
    this.#heartbeat.unref?.();
  }

  // The term is over for this holder: abort first (the holder stops), then tidy up. A lapsed term
  // may still be ours on the server (a renewal confirmed too late, or never answered): end it so
  // the next holder need not wait for its expiry.
  #lose(reason: LeaseLossReason, cause?: unknown): void {
    if (this.signal.aborted) return;
    clearTimeout(this.#deadlineTimer);
    clearTimeout(this.#heartbeat);
    this.#controller.abort(new LeaseLostError(this.name, this.fence, reason, cause === undefined ? undefined : { cause }));
    if (reason !== 'released') publishLost(() => ({ kind: 'lease', keys: [this.name], reason }));
    if (reason === 'lapsed') runStatement(this.runner, releaseStatement(this.name, this.fence, this.token)).catch(noop);
  }

  renew(): Promise<void> {
    if (this.signal.aborted) return Promise.reject(this.signal.reason);
    this.#renewing ??= this.#renew().finally(() => {
      this.#renewing = undefined;
    });
    return this.#renewing;
  }

  async #renew(): Promise<void> {
    const sentAt = performance.now();
    let rows: unknown[];
    try {
      rows = await runStatement(this.runner, renewStatement(this.name, this.fence, this.token, this.opts.ttlMs));
    } catch (err) {
      throw leaseError(err, this);
    }
    if (this.signal.aborted) throw this.signal.reason; // lapsed or released meanwhile: claims nothing
    if (rows.length === 0) {
      this.#lose('lost');
      throw this.signal.reason;
    }
    this.#deadline = Math.max(this.#deadline, sentAt + this.opts.ttlMs - this.opts.marginMs);
    this.#armDeadline();
  }

  release(): Promise<boolean> {
    this.#released ??= (async () => {
      const over = this.signal.aborted && (this.signal.reason as LeaseLostError).reason === 'lost';
      if (!this.signal.aborted) {
        clearTimeout(this.#deadlineTimer);
        clearTimeout(this.#heartbeat);
        this.#controller.abort(new LeaseLostError(this.name, this.fence, 'released'));
      }
      if (over) return false;
      try {
        const rows = await runStatement(this.runner, releaseStatement(this.name, this.fence, this.token));
        return rows.length > 0;
      } catch (err) {
        throw leaseError(err, this);
      }
    })();
    return this.#released;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release().catch(noop);
  }
}

/** How one kind of lease is tried: a single name (a lease) or one of several (a semaphore's permits). */
export interface Attempt {
  /** The statement that tries once; a row with `fence` (and `name`, when not `opts.name`) is a win. */
  statement(token: string): Statement;
  /** Ends a term known only by its owner token (the try's answer was lost). */
  abandon(token: string): Statement;
  /** The names whose release may let this try win. */
  wakeOn: readonly string[];
}

/**
 * Try, and wait as the options say. A row without `fence` tells who holds it and when its term
 * ends; `retry: true` means a free name was taken by a concurrent try in between: look again.
 */
export async function take(runner: Runner, opts: Checked, attempt: Attempt): Promise<HeldLease | LeaseNotAcquiredError> {
  if (isTransaction(runner))
    throw new UnsupportedRunnerError(
      'a lease outlives a transaction: pass a pool (postgres.js sql, pg Pool or a drizzle db), not a transaction',
    );
  const { timeoutMs, signal } = opts;
  const token = randomUUID();
  const until = timeoutMs === undefined ? Number.POSITIVE_INFINITY : performance.now() + timeoutMs;
  let waiting: Awaited<ReturnType<typeof joinWaiters>> | undefined;
  try {
    for (let races = 0; ; ) {
      if (signal?.aborted) throw abortedBy(signal, `waiting for lease ${JSON.stringify(opts.name)}`);
      // interest in a release is registered before the look: one announced while the answer is on
      // its way still wakes the sleep below
      const armed = waiting ? arm(waiting.listener, attempt.wakeOn, `waiting for lease ${JSON.stringify(attempt.wakeOn[0])}`) : undefined;
      try {
        const sentAt = performance.now();
        let row: Record<string, unknown> | undefined;
        try {
          [row] = await runStatement(runner, attempt.statement(token));
        } catch (err) {
          // The answer was lost: the term may be ours. End it by its owner token, best effort.
          if (err instanceof CommitUnknownError) await runStatement(runner, attempt.abandon(token)).catch(noop);
          throw leaseError(err);
        }
        if (row?.fence != null) {
          const name = typeof row.name === 'string' ? row.name : opts.name;
          return new HeldLease(runner, name, BigInt(row.fence as string), token, opts, sentAt);
        }
        if (row?.retry === true && races++ < 100) continue;
        const holder = typeof row?.holder === 'string' ? row.holder : undefined;
        const expiresInMs = row?.expires_in_ms == null ? undefined : Number(row.expires_in_ms);
        if (timeoutMs === 0) return new LeaseNotAcquiredError(opts.name, holder, expiresInMs);
        const left = until - performance.now();
        if (left <= 0) return new LeaseTimeoutError(opts.name, holder, expiresInMs, timeoutMs as number);
        if (!armed) {
          // listen first, then look again: a release between the two is seen by the second look
          waiting = await joinWaiters(runner, RELEASE_CHANNEL);
          continue;
        }
        await armed.sleep(expiresInMs, left, signal);
      } finally {
        armed?.disarm();
      }
    }
  } finally {
    waiting?.leave();
  }
}

function takeLease(runner: Runner, name: unknown, options: LeaseOptions): Promise<HeldLease | LeaseNotAcquiredError> {
  const opts = checkLeaseOptions(name, options);
  return take(runner, opts, {
    statement: (token) => acquireStatement(opts.name, token, opts.holder, opts.ttlMs),
    abandon: (token) => abandonStatement(opts.name, token),
    wakeOn: [opts.name],
  });
}

/**
 * Acquire the lease `name` for `ttlMs` (database clock), waiting for it unless `timeoutMs` says
 * otherwise. The lease renews itself every `renewEveryMs` until released; its `signal` aborts the
 * moment it is no longer safely held. One statement per try, renewal and release.
 *
 * Needs the lease table: run {@link migrateLeases} at deploy time.
 *
 * @throws {@link LeaseNotAcquiredError} (`timeoutMs: 0`), {@link LeaseTimeoutError},
 * {@link AbortedError}, {@link ConnectionLostError}, {@link LeasesNotMigratedError},
 * {@link InvalidOptionError} (before anything is sent).
 *
 * @example
 * await using lease = await acquireLease(sql, 'report:daily', { ttlMs: 30_000 });
 * await buildReport({ signal: lease.signal, fence: lease.fence });
 */
export function acquireLease(runner: Runner, name: string, options: LeaseOptions): Promise<Lease> {
  return traced('lease', leaseContext('acquireLease', name), async () => {
    const got = await takeLease(runner, name, options);
    if (got instanceof PgcoordError) throw got;
    return got;
  });
}

const leaseContext = (operation: string, name: unknown) => () => ({ operation, keys: typeof name === 'string' ? [name] : [] });

/**
 * {@link acquireLease} that resolves `undefined` instead of throwing when the lease is held by
 * someone else (tries once unless `timeoutMs` is given).
 *
 * @example
 * const lease = await tryAcquireLease(sql, 'cron:cleanup', { ttlMs: 60_000 });
 * if (!lease) return; // another instance has it
 */
export function tryAcquireLease(runner: Runner, name: string, options: LeaseOptions): Promise<Lease | undefined> {
  return traced('lease', leaseContext('tryAcquireLease', name), async (ctx) => {
    const got = await takeLease(runner, name, { timeoutMs: 0, ...options });
    if (ctx) ctx.outcome = got instanceof PgcoordError ? 'not-acquired' : 'acquired';
    return got instanceof PgcoordError ? undefined : got;
  });
}

/**
 * Run `fn` holding the lease `name`, and release it after (also when `fn` throws). `fn` gets the
 * lease: stop when `lease.signal` aborts, and fence the writes that matter with {@link withFence}.
 *
 * @example
 * await withLease(sql, `order:${id}`, { ttlMs: 10_000 }, async (lease) => {
 *   const approved = await gateway.refund(id, { signal: lease.signal });
 *   await withFence(sql, lease, (tx) => tx`update orders set refunded = refunded + ${approved} where id = ${id}`);
 * });
 */
export async function withLease<T>(runner: Runner, name: string, options: LeaseOptions, fn: (lease: Lease) => Promise<T> | T): Promise<T> {
  if (typeof fn !== 'function') throw new InvalidOptionError('withLease needs a callback');
  const lease = await acquireLease(runner, name, options);
  try {
    return await fn(lease);
  } finally {
    await lease.release().catch(noop);
  }
}

/** What {@link withFence} needs of a lease: its name and the fence of the term that writes. */
export interface Fence {
  readonly name: string;
  readonly fence: bigint;
  /** A held lease's signal: an aborted one refuses before anything is sent. */
  readonly signal?: AbortSignal;
}

/**
 * Run `fn` in a transaction that commits only if `lease` is still the current, unexpired term:
 * the first statement (`pgcoord.check_fence`, pipelined with BEGIN where the driver can) takes a
 * share lock on the lease row, so no takeover can happen until this transaction ends, and a write
 * of a term already taken over is refused by the database ({@link LeaseLostError}, nothing
 * written). Given a pool it opens the transaction; given a transaction it joins it.
 *
 * In raw SQL, the same guard is `select pgcoord.check_fence($name, $fence)` as a statement of the
 * transaction (it raises SQLSTATE `PGF01`; see {@link isLeaseLost}).
 *
 * @example
 * await withFence(sql, lease, (tx) => tx`update orders set refunded = refunded + 200 where id = 1`);
 */
export function withFence<H, T>(runner: Runner, lease: Fence, fn: (tx: H) => Promise<T> | T): Promise<T> {
  try {
    checkFence(lease);
    if (typeof fn !== 'function') throw new InvalidOptionError('withFence needs a callback');
    if (lease.signal?.aborted) throw lease.signal.reason;
  } catch (err) {
    return Promise.reject(err);
  }
  return traced('lease', leaseContext('withFence', lease.name), () => fenced<H, T>(runner, lease, [], (scope) => scope.call(fn)));
}

/**
 * A transaction on `runner` whose first statements are the fence check and `statements` (one
 * round trip where the driver pipelines), then `then` with the scope and their rows. For pgcoord's
 * own fenced statements and for {@link withFence}.
 */
export function fenced<H, T>(
  runner: Runner,
  lease: Fence,
  statements: readonly Statement[],
  then: (scope: Scope<H>, rows: Row[][]) => Promise<T>,
): Promise<T> {
  return inTransaction<H, T>(runner, {}, async (scope) => {
    let rows: Row[][];
    try {
      rows = await scope.conn.send([checkFenceStatement(lease.name, lease.fence), ...statements]);
    } catch (err) {
      throw leaseError(err, lease);
    }
    return then(scope, rows.slice(1));
  });
}

function checkFence(lease: Fence): void {
  if (lease === null || typeof lease !== 'object') throw new InvalidOptionError('withFence needs a lease (an object with name and fence)');
  checkLeaseName(lease.name);
  if (typeof lease.fence !== 'bigint' || lease.fence < 1n || lease.fence > 9_223_372_036_854_775_807n)
    throw new InvalidOptionError(`fence must be a positive bigint, got ${describe(lease.fence)}`);
  if (lease.signal !== undefined && !(lease.signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
}
