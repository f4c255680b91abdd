import { performance } from 'node:perf_hooks';
import { type Conn, commitWith, inTransaction, type Row, type Runner, type Statement, type TransactionOptions } from './driver/index.js';
import { AbortedError, DeadlockError, InvalidOptionError, LockNotAcquiredError, LockTimeoutError, sqlState } from './errors.js';
import { publish, watched } from './events.js';
import type { HandleOf } from './handles.js';
import { type LockKey, type LockKeyInput, lockKeys } from './keys.js';
import { describe } from './text.js';
import { holdSite, type TraceContext, traced, watchHold } from './trace.js';

/** Exclusive (one holder) or shared (many shared holders, no exclusive one). */
export type LockMode = 'exclusive' | 'shared';

/** How to take an advisory lock. */
export interface LockOptions extends TransactionOptions {
  /** Default `'exclusive'`. */
  mode?: LockMode;
  /**
   * Omit to wait as long as it takes; `0` to try once without waiting; N to wait at most N ms.
   * The wait happens on the server (`lock_timeout`), so Postgres's deadlock detector sees it. A
   * server that never answers (a network partition) is given up at twice the timeout plus a second.
   */
  timeoutMs?: number;
  /**
   * Abort to cancel the wait on the server; the operation rejects with {@link AbortedError}. If the
   * server answers nothing even then (a partition), the connection is dropped a few seconds later
   * and the operation rejects with {@link ConnectionLostError} (nothing committed).
   */
  signal?: AbortSignal;
}

/** Checked options, shared by transaction and session locks. */
export interface LockRequest {
  keys: LockKey[];
  shared: boolean;
  timeoutMs: number | undefined;
  signal: AbortSignal | undefined;
  labels: string[];
}

export function lockRequest(input: readonly LockKeyInput[] | LockKeyInput, options: LockOptions = {}): LockRequest {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('options must be an object');
  const { mode = 'exclusive', timeoutMs, signal } = options;
  if (mode !== 'exclusive' && mode !== 'shared')
    throw new InvalidOptionError(`mode must be 'exclusive' or 'shared', got ${describe(mode)}`);
  if (
    timeoutMs !== undefined &&
    (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 2_147_483_647)
  ) {
    throw new InvalidOptionError(`timeoutMs must be an integer from 0 to 2147483647 (or omitted to wait), got ${describe(timeoutMs)}`);
  }
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  const keys = lockKeys(input);
  return { keys, shared: mode === 'shared', timeoutMs, signal, labels: keys.map((k) => k.label) };
}

// One statement per key space, keys already sorted and deduplicated by lockKeys, so every caller
// takes overlapping sets in the same order. unnest() emits array elements in order and the
// aggregate calls the lock function once per row in that order. The texts are made once per lock
// function: the same string object every time is also the driver's prepared-statement cache key.
export function lockStatements(req: LockRequest, fn: string): Statement[] {
  const texts = lockTexts(fn);
  if (req.keys.length === 1) {
    const k = req.keys[0] as LockKey;
    return [k.space === 'int8' ? { text: texts.one, params: [k.id.toString()] } : { text: texts.pairs, params: [`{${k.a}}`, `{${k.b}}`] }];
  }
  const int8 = req.keys.filter((k) => k.space === 'int8');
  const pairs = req.keys.filter((k) => k.space === 'pair');
  const out: Statement[] = [];
  if (int8.length === 1) out.push({ text: texts.one, params: [String(int8[0]!.id)] });
  else if (int8.length > 1) out.push({ text: texts.many, params: [`{${int8.map((k) => k.id).join(',')}}`] });
  if (pairs.length > 0) {
    out.push({ text: texts.pairs, params: [`{${pairs.map((k) => k.a).join(',')}}`, `{${pairs.map((k) => k.b).join(',')}}`] });
  }
  return out;
}

const texts = new Map<string, { one: string; many: string; pairs: string }>();
function lockTexts(fn: string) {
  let t = texts.get(fn);
  if (!t) {
    t = {
      // a blocking lock returns void: nothing to read (the plain call, as anyone writes it by hand);
      // a try returns a boolean, read as text like the aggregate forms' ('false' = missed)
      one: fn.includes('_try_') ? `select ${fn}($1::int8)::text as ok` : `select ${fn}($1::int8)`,
      many: `select bool_and(${fn}(k)::text <> 'false')::text as ok from unnest($1::int8[]) as k`,
      pairs: `select bool_and(${fn}(a, b)::text <> 'false')::text as ok from unnest($1::int4[], $2::int4[]) as t(a, b)`,
    };
    texts.set(fn, t);
  }
  return t;
}

/** The transaction-scoped lock function for a request: pg[_try]_advisory_xact_lock[_shared]. */
const xactLockFn = (req: LockRequest) =>
  req.timeoutMs === 0
    ? req.shared
      ? 'pg_try_advisory_xact_lock_shared'
      : 'pg_try_advisory_xact_lock'
    : req.shared
      ? 'pg_advisory_xact_lock_shared'
      : 'pg_advisory_xact_lock';

// lock_timeout for the wait, statement_timeout off so it cannot fire first; the previous values
// are kept in custom settings and restored right after, all transaction-local.
export function timeoutStatements(timeoutMs: number): { before: Statement; after: Statement } {
  return {
    before: {
      text: "select set_config('pgcoord.lock_timeout', current_setting('lock_timeout'), true), set_config('pgcoord.statement_timeout', current_setting('statement_timeout'), true), set_config('lock_timeout', $1, true), set_config('statement_timeout', '0', true)",
      params: [`${timeoutMs}ms`],
    },
    after: {
      text: "select set_config('lock_timeout', current_setting('pgcoord.lock_timeout'), true), set_config('statement_timeout', current_setting('pgcoord.statement_timeout'), true)",
    },
  };
}

/**
 * The wait for a pool connection is part of the wait for the lock: with `timeoutMs` it is bounded
 * by it (a LockTimeoutError, nothing sent), and whatever it used is taken off the lock's own
 * `lock_timeout`; the caller's signal bounds it too. A try (`timeoutMs: 0`) still waits for a
 * connection: trying once is about the lock, not the pool.
 */
export function poolWait(req: LockRequest): { signal: AbortSignal | undefined; left(): LockRequest; timedOut(err: unknown): unknown } {
  if (!req.timeoutMs) return { signal: req.signal, left: () => req, timedOut: (err) => err };
  const started = performance.now();
  const timer = AbortSignal.timeout(req.timeoutMs);
  const timeoutMs = req.timeoutMs;
  return {
    signal: req.signal ? AbortSignal.any([req.signal, timer]) : timer,
    left: () => ({ ...req, timeoutMs: Math.max(1, Math.round(timeoutMs - (performance.now() - started))) }),
    timedOut: (err) =>
      err instanceof AbortedError && timer.aborted && !req.signal?.aborted
        ? new LockTimeoutError(req.labels.join(', '), timeoutMs, { cause: err })
        : err,
  };
}

/**
 * The options of a try variant: `timeoutMs` defaults to 0 (try once), also when it is present and
 * undefined (`{ timeoutMs: undefined, ...rest }`); anything but an object or undefined is refused,
 * as by the waiting variants.
 */
export function tryOptions<O extends LockOptions>(options: O | undefined): O {
  if (options !== undefined && (options === null || typeof options !== 'object')) throw new InvalidOptionError('options must be an object');
  return { ...options, timeoutMs: options?.timeoutMs ?? 0 } as O;
}

/** Map a failed lock statement to pgcoord's typed errors. */
export function lockError(err: unknown, req: LockRequest): unknown {
  const label = req.labels.join(', ');
  if (req.signal?.aborted) return new AbortedError(`waiting for lock ${label} was aborted`, { cause: err });
  const state = sqlState(err);
  if (state === '55P03') return new LockTimeoutError(label, req.timeoutMs ?? 0, { cause: err });
  if (state === '40P01') return new DeadlockError(`deadlock detected while waiting for lock ${label}`, { cause: err });
  return err;
}

export function outcomeOf(err: unknown): string {
  if (err instanceof AbortedError) return 'aborted';
  if (err instanceof LockTimeoutError) return 'timeout';
  if (err instanceof DeadlockError) return 'deadlock';
  if (err instanceof LockNotAcquiredError) return 'not-acquired';
  return 'error';
}

/**
 * Take transaction-scoped advisory locks on `conn` (pg_advisory_xact_lock family), with the
 * caller's read (`then`) sent right behind them where the connection pipelines: it runs on the
 * server the moment the locks are granted. Resolves the read's result, or {@link NOT_FREE} when
 * `timeoutMs: 0` and a key is taken (a read that ran without the lock is dropped).
 *
 * The attempt may fail on purpose (timeout, abort, a miss): `conn.attempt` keeps a caller's
 * transaction usable and holding none of the keys (in pgcoord's own transaction the whole
 * transaction rolls back instead). Rolling back also releases a lock the server granted in the
 * same instant it raised lock_timeout.
 */
function lockInTransaction(conn: Conn, req: LockRequest, then: (() => PromiseLike<unknown>) | undefined): Promise<unknown> {
  const locks = lockStatements(req, xactLockFn(req));
  const timed = req.timeoutMs !== undefined && req.timeoutMs > 0 ? timeoutStatements(req.timeoutMs) : undefined;
  const statements: Statement[] = timed ? [timed.before, ...locks, timed.after] : locks;
  const first = timed ? 1 : 0;
  // lock_timeout is the server's: with no answer at all well past it (twice the timeout plus a
  // second: room for a read sent behind the lock), the batch is cancelled like an aborted one, and
  // the driver drops a connection that still answers nothing (GIVE_UP_AFTER_CANCEL_MS): under a
  // network partition the wait ends in a typed error, not when the network heals.
  const late = timed ? AbortSignal.timeout(2 * (req.timeoutMs as number) + LOCK_TIMEOUT_GRACE_MS) : undefined;
  const signal = late ? (req.signal ? AbortSignal.any([req.signal, late]) : late) : req.signal;
  const step = (c: Conn) =>
    (then ? c.sendThen(statements, then, signal) : c.send(statements, signal)).then(
      (rows) => {
        for (let i = first; i < first + locks.length; i++) if ((rows[i] as Row[] | undefined)?.[0]?.ok === 'false') throw notFree;
        return then ? rows[rows.length - 1] : undefined;
      },
      (err: unknown) => {
        if (late?.aborted && !req.signal?.aborted)
          throw new LockTimeoutError(req.labels.join(', '), req.timeoutMs as number, { cause: err }); // no answer at all
        throw lockError(err, req);
      },
    );
  const mayFail = req.timeoutMs !== undefined || req.signal !== undefined;
  return (mayFail ? conn.attempt(step, req.signal) : step(conn)).then(undefined, (err: unknown) => {
    if (err === notFree) return NOT_FREE;
    throw err;
  });
}

// How long past its lock_timeout a lock statement may go unanswered before it is cancelled.
const LOCK_TIMEOUT_GRACE_MS = 1000;

// Thrown inside the attempt so a partial multi-key try is rolled back; never escapes.
const notFree = new Error('pgcoord: lock not free');
const NOT_FREE: unique symbol = Symbol('pgcoord.notFree');

type Acquired<T> = { acquired: true; value: T } | { acquired: false };

/**
 * A read-decide-write under the lock, shaped so postgres.js can do it in two round trips:
 * `[BEGIN, lock, read]`, then `[writes, COMMIT]`.
 * - `read` returns a query on the transaction handle; it is sent right behind the lock statement
 *   (pgcoord's own transaction on postgres.js), so it runs on the server the moment the lock is
 *   granted, with no client hop in between.
 * - `write` gets the rows and decides (it may await, e.g. a payment gateway, still under the lock);
 *   it returns the write queries **unawaited, in an array** (an array is not a thenable, so they stay
 *   unsent) and pgcoord sends them together with COMMIT. Return `[]` or nothing to write nothing.
 * Elsewhere (pg, drizzle builders, a caller's transaction) the same plan runs one statement at a time.
 */
export interface LockPlan<H, R> {
  read: (tx: H) => PromiseLike<R> | R;
  write: (tx: H, read: R) => PlanWrites | Promise<PlanWrites>;
}

/**
 * What a lock callback gets besides the transaction handle. `signal` aborts (with a
 * ConnectionLostError) the moment pgcoord sees the transaction's connection die, and with it the
 * lock: stop work that is no longer protected (a payment call, a long loop). It never aborts in a
 * caller's transaction, whose connection is the caller's to watch.
 */
export interface HeldLock {
  readonly signal: AbortSignal;
}

/** The callback of {@link withLock} and {@link tryWithLock}. */
export type LockCallback<H, T> = (tx: H, lock: HeldLock) => Promise<T> | T;

/** The writes a {@link LockPlan} returns: unawaited queries in an array, or nothing. */
export type PlanWrites = readonly PromiseLike<unknown>[] | undefined;

/** What a {@link LockPlan} produced: the read, and the result of each write (empty when none). */
export interface LockPlanResult<R> {
  read: R;
  written: unknown[];
}

function isPlan(x: unknown): x is LockPlan<unknown, unknown> {
  return (
    typeof x === 'object' &&
    x !== null &&
    typeof (x as LockPlan<unknown, unknown>).read === 'function' &&
    typeof (x as LockPlan<unknown, unknown>).write === 'function'
  );
}

// Lock events are built only when somebody subscribes (see events.ts); subscribing never changes
// which statements are sent.
function report(which: 'acquire' | 'release', req: LockRequest, outcome: string, asked: number, granted: number, error?: unknown) {
  const now = performance.now();
  publish(which, {
    keys: req.labels,
    mode: req.shared ? 'shared' : 'exclusive',
    scope: 'transaction',
    outcome,
    waitMs: (granted || now) - asked,
    ...(which === 'release' ? { holdMs: now - granted } : {}),
    ...(error !== undefined ? { error } : {}),
  });
}

// One path for every runner and option: [BEGIN, (timeout settings), locks, (read)] as one batch,
// then the caller's work, then [writes, COMMIT] (or COMMIT). The adapter decides how the batches
// travel (pipelined on postgres.js) and where an attempt needs a savepoint.
function run<R extends Runner, T>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  fn: LockCallback<HandleOf<R>, T> | LockPlan<HandleOf<R>, unknown>,
  options: LockOptions | undefined,
  ctx: TraceContext | undefined,
): Promise<Acquired<T>> {
  let req: LockRequest;
  try {
    req = lockRequest(keys, options);
    if (typeof fn !== 'function' && !isPlan(fn))
      throw new InvalidOptionError('the callback must be a function (or a { read, write } plan)');
  } catch (err) {
    return Promise.reject(err);
  }
  const acquire = watched('acquire');
  const release = watched('release');
  const asked = acquire || release || ctx ? performance.now() : 0;
  let granted = 0;
  const site = holdSite(); // undefined unless hold warnings are on
  let endHold: (() => void) | undefined;
  const plan = typeof fn === 'function' ? undefined : fn;
  const wait = poolWait(req);
  const outcome = inTransaction<HandleOf<R>, Acquired<T>>(
    runner,
    options ?? {},
    async (scope) => {
      let read: unknown;
      try {
        read = await lockInTransaction(
          scope.conn,
          wait.left(),
          plan ? () => scope.call(plan.read as (tx: HandleOf<R>) => Promise<unknown>) : undefined,
        );
      } catch (err) {
        if (acquire) report('acquire', req, outcomeOf(err), asked, 0, err);
        throw err;
      }
      granted = asked && performance.now();
      if (acquire) report('acquire', req, read === NOT_FREE ? 'not-acquired' : 'acquired', asked, granted);
      if (ctx) {
        ctx.waitMs = granted - asked;
        ctx.outcome = read === NOT_FREE ? 'not-acquired' : 'acquired';
      }
      if (read === NOT_FREE) return notAcquired;
      if (site !== undefined) endHold = watchHold('lock', () => req.labels, site);
      if (!plan) {
        const held = {
          get signal() {
            return scope.conn.lost;
          },
        };
        return { acquired: true, value: await scope.call((tx) => (fn as LockCallback<HandleOf<R>, T>)(tx, held)) };
      }
      const writes = await scope.call((tx) => plan.write(tx, read));
      return { acquired: true, value: { read, written: await commitWith(scope.conn, writes) } as T };
    },
    wait.signal,
  ).catch((err: unknown) => {
    throw wait.timedOut(err);
  });
  if (site !== undefined)
    outcome.then(
      () => endHold?.(),
      () => endHold?.(),
    );
  if (ctx)
    outcome.then(
      () => {
        if (granted) ctx.holdMs = performance.now() - granted;
      },
      () => {
        if (granted) ctx.holdMs = performance.now() - granted;
      },
    );
  if (!release) return outcome;
  return outcome.then(
    (r) => {
      if (granted && r.acquired) report('release', req, 'released', asked, granted);
      return r;
    },
    (err: unknown) => {
      if (granted) report('release', req, 'error', asked, granted, err);
      throw err;
    },
  );
}

const notAcquired = { acquired: false } as const;

/**
 * Run `fn` in a transaction holding transaction-scoped advisory locks on `keys`: the lock, the
 * check and the write commit or roll back together, and the lock is released at the end of the
 * transaction. Given a pool, pgcoord opens the transaction; given a transaction, it joins it (the
 * lock then lasts until the caller's transaction ends).
 *
 * Several keys are deduplicated, sorted and taken in one round trip, all or nothing, so callers
 * asking for {a, b} and {b, a} cannot deadlock.
 *
 * @throws {@link LockNotAcquiredError} with `timeoutMs: 0` when a key is taken,
 * {@link LockTimeoutError}, {@link DeadlockError}, {@link AbortedError},
 * {@link ConnectionLostError} (nothing committed), {@link CommitUnknownError}.
 *
 * @example
 * const refunded = await withLock(sql, `order:${id}`, async (tx) => {
 *   const [o] = await tx`select total, refunded from orders where id = ${id}`;
 *   if (o.refunded + amount > o.total) return false;
 *   await tx`update orders set refunded = refunded + ${amount} where id = ${id}`;
 *   return true;
 * }, { timeoutMs: 2000 });
 */
export function withLock<R extends Runner, T>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  fn: LockCallback<HandleOf<R>, T>,
  options?: LockOptions,
): Promise<T>;
export function withLock<R extends Runner, Read>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  plan: LockPlan<HandleOf<R>, Read>,
  options?: LockOptions,
): Promise<LockPlanResult<Read>>;
export function withLock<R extends Runner, T>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  fn: LockCallback<HandleOf<R>, T> | LockPlan<HandleOf<R>, unknown>,
  options?: LockOptions,
): Promise<T> {
  return traced('lock', lockContext('withLock', keys), (ctx) =>
    run(runner, keys, fn, options, ctx).then((result) => {
      if (!result.acquired)
        throw new LockNotAcquiredError(
          lockKeys(keys)
            .map((k) => k.label)
            .join(', '),
        );
      return result.value;
    }),
  );
}

/** The trace context of a lock operation (never throws: bad keys are refused by the operation). */
export function lockContext(operation: string, keys: readonly LockKeyInput[] | LockKeyInput): () => TraceContext {
  return () => {
    let labels: string[] = [];
    try {
      labels = lockKeys(keys).map((k) => k.label);
    } catch {
      // refused with a typed error by the operation itself
    }
    return { operation, keys: labels };
  };
}

/**
 * Like {@link withLock}, but "not free" is an answer, not an error: resolves `{ acquired: false }`
 * without running `fn` when the lock is taken (`timeoutMs` defaults to 0, try once) or when
 * `timeoutMs` passes.
 *
 * @example
 * const r = await tryWithLock(sql, 'nightly-report', (tx) => build(tx));
 * if (!r.acquired) console.log('another instance is on it');
 */
export function tryWithLock<R extends Runner, T>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  fn: LockCallback<HandleOf<R>, T>,
  options?: LockOptions,
): Promise<Acquired<T>>;
export function tryWithLock<R extends Runner, Read>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  plan: LockPlan<HandleOf<R>, Read>,
  options?: LockOptions,
): Promise<Acquired<LockPlanResult<Read>>>;
export async function tryWithLock<R extends Runner, T>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  fn: LockCallback<HandleOf<R>, T> | LockPlan<HandleOf<R>, unknown>,
  options?: LockOptions,
): Promise<Acquired<T>> {
  return traced('lock', lockContext('tryWithLock', keys), async (ctx) => {
    try {
      return await run(runner, keys, fn, tryOptions(options), ctx);
    } catch (err) {
      if (!(err instanceof LockTimeoutError)) throw err;
      if (ctx) ctx.outcome = 'not-acquired';
      return { acquired: false };
    }
  });
}
