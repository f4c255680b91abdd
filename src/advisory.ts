import { performance } from 'node:perf_hooks';
import { AbortedError, DeadlockError, InvalidOptionError, LockNotAcquiredError, LockTimeoutError, sqlState } from './errors.js';
import { publish, watched } from './events.js';
import type { HandleOf } from './handles.js';
import { type LockKey, type LockKeyInput, lockKeys } from './keys.js';
import {
  type Conn,
  commitWith,
  inTransaction,
  pipelinedOnPgjs,
  type Runner,
  type Scope,
  STOP,
  type Statement,
  type TransactionOptions,
} from './runner.js';

/** Exclusive (one holder) or shared (many shared holders, no exclusive one). */
export type LockMode = 'exclusive' | 'shared';

/** How to take an advisory lock. */
export interface LockOptions extends TransactionOptions {
  /** Default `'exclusive'`. */
  mode?: LockMode;
  /**
   * Omit to wait as long as it takes; `0` to try once without waiting; N to wait at most N ms.
   * The wait happens on the server (`lock_timeout`), so Postgres's deadlock detector sees it.
   */
  timeoutMs?: number;
  /** Abort to cancel the wait on the server; the operation rejects with {@link AbortedError}. */
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
    throw new InvalidOptionError(`mode must be 'exclusive' or 'shared', got ${JSON.stringify(mode)}`);
  if (
    timeoutMs !== undefined &&
    (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 2_147_483_647)
  ) {
    throw new InvalidOptionError(`timeoutMs must be an integer from 0 to 2147483647 (or omitted to wait), got ${String(timeoutMs)}`);
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
 * Take transaction-scoped advisory locks on `conn` (pg_advisory_xact_lock family). Returns false
 * when `timeoutMs: 0` and a key is taken. In pgcoord's own transaction a failure rolls the whole
 * transaction back; in a caller's transaction the attempt runs under a savepoint, so a timeout,
 * abort or miss leaves the caller's transaction usable and holding none of the keys (rolling back
 * to the savepoint also releases a lock the server granted in the same instant it raised
 * lock_timeout).
 */
function lockInTransaction(conn: Conn, req: LockRequest): Promise<boolean> {
  const locks = lockStatements(req, xactLockFn(req));
  const timed = req.timeoutMs !== undefined && req.timeoutMs > 0 ? timeoutStatements(req.timeoutMs) : undefined;
  const statements: Statement[] = timed ? [timed.before, ...locks, timed.after] : locks;
  const first = timed ? 1 : 0;
  const attempt = (c: Conn) =>
    c.send(statements, req.signal).then(
      (rows) => {
        for (let i = first; i < first + locks.length; i++) if (rows[i]?.[0]?.ok === 'false') throw notFree;
      },
      (err: unknown) => {
        throw lockError(err, req);
      },
    );
  // In a caller's transaction, an attempt that may fail on purpose runs under a savepoint.
  const attempted = !conn.own && (req.timeoutMs !== undefined || req.signal !== undefined) ? conn.savepoint(attempt) : attempt(conn);
  return attempted.then(yes, (err: unknown) => {
    if (err === notFree) return false;
    throw err;
  });
}

const yes = () => true;

// Thrown inside the savepoint so a partial multi-key try is rolled back; never escapes.
const notFree = new Error('pgcoord: lock not free');

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
  read: (tx: H) => PromiseLike<R>;
  write: (tx: H, read: R) => PlanWrites | Promise<PlanWrites>;
}

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

async function runPlan<H, R>(scope: Scope<H>, plan: LockPlan<H, R>, locked: Promise<boolean>): Promise<Acquired<LockPlanResult<R>>> {
  // Queue the read behind the lock only where that order is guaranteed; otherwise wait for it.
  const read1 = plan.read as (tx: H) => Promise<R>; // a thenable is adopted by call()
  const early = scope.conn.pipelines ? scope.call(read1) : undefined;
  early?.then(undefined, noop); // when the lock fails, the read fails too: the lock's error wins
  if (!(await locked)) return { acquired: false };
  const read = await (early ?? scope.call(read1));
  return scope.call(async (tx) => ({ acquired: true, value: { read, written: await commitWith(scope.conn, await plan.write(tx, read)) } }));
}

const noop = () => {};

// On a plain postgres.js pool, untimed (or a try) and unwatched: the runner's pipelined hot path,
// with the same statements and outcomes as the general path below.
function onPgjs<H>(
  runner: Runner,
  req: LockRequest,
  fn: ((tx: H) => unknown) | LockPlan<H, unknown>,
  options: LockOptions | undefined,
): Promise<Acquired<unknown>> | undefined {
  const plan = typeof fn === 'function' ? undefined : fn;
  return pipelinedOnPgjs<H>(runner, options ?? {}, {
    first: lockStatements(req, xactLockFn(req)),
    read: plan?.read,
    failed: (err) => lockError(err, req),
    decide: (rows, read, tx) => {
      for (const r of rows) if (r[0]?.ok === 'false') return STOP; // a try that missed (a plan's read ran unlocked: dropped)
      return plan ? plan.write(tx, read) : (fn as (tx: H) => unknown)(tx);
    },
    writes: plan !== undefined,
  })?.then((r) => (r === null ? notAcquired : { acquired: true, value: plan ? { read: r.read, written: r.value } : r.value }));
}

const notAcquired = { acquired: false } as const;

// Lock events are built only when somebody subscribes (see events.ts).
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

function run<R extends Runner, T>(
  runner: R,
  keys: readonly LockKeyInput[] | LockKeyInput,
  fn: ((tx: HandleOf<R>) => Promise<T> | T) | LockPlan<HandleOf<R>, unknown>,
  options: LockOptions | undefined,
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
  if (!acquire && !release && req.signal === undefined && !req.timeoutMs) {
    const fast = onPgjs(runner, req, fn, options);
    if (fast) return fast as Promise<Acquired<T>>;
  }
  return runInTransaction(runner, req, fn, options, acquire, release);
}

async function runInTransaction<R extends Runner, T>(
  runner: R,
  req: LockRequest,
  fn: ((tx: HandleOf<R>) => Promise<T> | T) | LockPlan<HandleOf<R>, unknown>,
  options: LockOptions | undefined,
  acquire: boolean,
  release: boolean,
): Promise<Acquired<T>> {
  const asked = acquire || release ? performance.now() : 0;
  let granted = 0;
  let outcome: Acquired<T>;
  try {
    outcome = await inTransaction<HandleOf<R>, Acquired<T>>(runner, options ?? {}, async (scope) => {
      let ok: boolean;
      const locking = lockInTransaction(scope.conn, req);
      const planned = typeof fn === 'function' ? undefined : runPlan(scope, fn, locking);
      planned?.catch(noop); // awaited below once the lock's outcome is published
      try {
        ok = await locking;
      } catch (err) {
        if (acquire) report('acquire', req, outcomeOf(err), asked, 0, err);
        throw err;
      }
      granted = asked && performance.now();
      if (acquire) report('acquire', req, ok ? 'acquired' : 'not-acquired', asked, granted);
      if (!ok) return { acquired: false };
      if (planned) return (await planned) as Acquired<T>;
      return { acquired: true, value: await scope.call(fn as (tx: HandleOf<R>) => Promise<T> | T) };
    });
  } catch (err) {
    if (granted && release) report('release', req, 'error', asked, granted, err);
    throw err;
  }
  if (granted && release && outcome.acquired) report('release', req, 'released', asked, granted);
  return outcome;
}

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
  fn: (tx: HandleOf<R>) => Promise<T> | T,
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
  fn: ((tx: HandleOf<R>) => Promise<T> | T) | LockPlan<HandleOf<R>, unknown>,
  options?: LockOptions,
): Promise<T> {
  return run(runner, keys, fn, options).then((result) => {
    if (!result.acquired)
      throw new LockNotAcquiredError(
        lockKeys(keys)
          .map((k) => k.label)
          .join(', '),
      );
    return result.value;
  });
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
  fn: (tx: HandleOf<R>) => Promise<T> | T,
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
  fn: ((tx: HandleOf<R>) => Promise<T> | T) | LockPlan<HandleOf<R>, unknown>,
  options?: LockOptions,
): Promise<Acquired<T>> {
  try {
    return await run(runner, keys, fn, { timeoutMs: 0, ...options });
  } catch (err) {
    if (err instanceof LockTimeoutError) return { acquired: false };
    throw err;
  }
}
