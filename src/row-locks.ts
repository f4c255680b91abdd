import { performance } from 'node:perf_hooks';
import { getTableName, is, type SQL, sql } from 'drizzle-orm';
import { type PgColumn, PgTable } from 'drizzle-orm/pg-core';
import { type PlanWrites, timeoutStatements } from './advisory.js';
import {
  commitWith,
  inTransaction,
  isTransaction,
  type Row,
  type Runner,
  type Scope,
  type Statement,
  type TransactionOptions,
  withCancel,
} from './driver/index.js';
import { AbortedError, DeadlockError, InvalidOptionError, LockTimeoutError, PgcoordError, sqlState } from './errors.js';
import type { HandleOf } from './handles.js';
import { compileTarget, InvalidIdentifierError, quoteIdent, type SqlTarget } from './sql-target.js';
import { describe } from './text.js';
import { traced } from './trace.js';

/** Row lock strength, strongest first (`FOR UPDATE` ... `FOR KEY SHARE`). */
export type LockStrength = 'update' | 'no key update' | 'share' | 'key share';

/** What to do when a row is locked by another transaction. */
export type RowWait = 'block' | 'nowait' | 'skipLocked';

/** How to lock rows. */
export interface RowLockOptions extends TransactionOptions {
  /** Default `'update'`. Use `'no key update'` when you will not change key columns (lighter on foreign keys). */
  strength?: LockStrength;
  /**
   * `'block'` (default) waits; `'nowait'` fails at once with {@link RowLockedError};
   * `'skipLocked'` leaves locked rows out of the result.
   */
  wait?: RowWait;
  /** With `'block'`: wait at most this many ms (transaction-local `lock_timeout`), then {@link LockTimeoutError}. `0` means `'nowait'`. */
  timeoutMs?: number;
  /** Abort to cancel the wait on the server; rejects with {@link AbortedError}. */
  signal?: AbortSignal;
}

/** Rows of a raw-SQL table to lock: `key` and/or `where` (see {@link SqlTarget}), `orderBy` columns. */
export interface SqlRowTarget extends SqlTarget {
  /** Lock (and return) rows in this order, e.g. `['id']` or `'created_at desc'`; consistent order avoids deadlocks. */
  orderBy?: string | readonly string[];
}

/** Rows of a drizzle table to lock; rows come back typed. */
export interface DrizzleRowTarget<T extends PgTable> {
  table: T;
  where?: SQL;
  orderBy?: readonly (PgColumn | SQL | SQL.Aliased)[];
}

/**
 * No row matches the target.
 *
 * @example
 * try { await withRowLock(sql, { table: 'orders', key: { id } }, fn) } catch (e) { if (e instanceof RowNotFoundError) return notFound() }
 */
export class RowNotFoundError extends PgcoordError {
  constructor(readonly target: string) {
    super('PGCOORD_ROW_NOT_FOUND', `no row ${target}`);
  }
}

/**
 * The row exists but another transaction holds a conflicting lock (`'nowait'` / `'skipLocked'`).
 *
 * @example
 * await withRowLock(sql, { table: 'orders', key: { id } }, fn, { wait: 'nowait' }).catch((e) => {
 *   if (e instanceof RowLockedError) return 'busy, try later';
 *   throw e;
 * });
 */
export class RowLockedError extends PgcoordError {
  constructor(
    readonly target: string,
    options?: { cause?: unknown },
  ) {
    super('PGCOORD_ROW_LOCKED', `row ${target} is locked by another transaction`, options);
  }
}

/**
 * A helper that only makes sense inside a transaction got a pool.
 *
 * @example
 * await lockRows(sql, target); // throws NotInTransactionError: use sql.begin((tx) => lockRows(tx, target))
 */
export class NotInTransactionError extends PgcoordError {
  constructor(what: string) {
    super('PGCOORD_NOT_IN_TRANSACTION', `${what} needs a transaction (a sql.begin handle, a client in BEGIN, a drizzle tx)`);
  }
}

interface Request {
  strength: LockStrength;
  wait: RowWait;
  timeoutMs: number | undefined;
  signal: AbortSignal | undefined;
}

const strengths: readonly LockStrength[] = ['update', 'no key update', 'share', 'key share'];
const waits: readonly RowWait[] = ['block', 'nowait', 'skipLocked'];

function request(options: RowLockOptions | undefined): Request {
  if (options === undefined) return { strength: 'update', wait: 'block', timeoutMs: undefined, signal: undefined };
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('options must be an object');
  const { strength = 'update', signal } = options;
  let { wait = 'block', timeoutMs } = options;
  if (!strengths.includes(strength))
    throw new InvalidOptionError(`strength must be one of ${strengths.map((s) => `'${s}'`).join(', ')}, got ${describe(strength)}`);
  if (!waits.includes(wait)) throw new InvalidOptionError(`wait must be 'block', 'nowait' or 'skipLocked', got ${describe(wait)}`);
  if (timeoutMs !== undefined) {
    if (typeof timeoutMs !== 'number' || !Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 2_147_483_647)
      throw new InvalidOptionError(`timeoutMs must be an integer from 0 to 2147483647, got ${describe(timeoutMs)}`);
    if (wait !== 'block') throw new InvalidOptionError(`timeoutMs only applies to wait: 'block', not '${wait}'`);
    if (timeoutMs === 0) {
      wait = 'nowait';
      timeoutMs = undefined;
    }
  }
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  return { strength, wait, timeoutMs, signal };
}

type AnyTarget = SqlRowTarget | DrizzleRowTarget<PgTable>;

function isDrizzleTarget(target: AnyTarget): target is DrizzleRowTarget<PgTable> {
  if (target === null || typeof target !== 'object') return false;
  try {
    return is(target.table, PgTable);
  } catch {
    return false; // drizzle's is() throws on some objects (a null prototype): not a table
  }
}

function checkTarget(runner: Runner, target: AnyTarget): string {
  if (target === null || typeof target !== 'object') throw new InvalidOptionError('target must be an object');
  if (isDrizzleTarget(target)) {
    const r = runner as Record<string, unknown>;
    if (typeof r.select !== 'function' || typeof r.session !== 'object')
      throw new InvalidOptionError('a drizzle table target needs a drizzle runner (db or tx); use { table: "name", key } for raw SQL');
    return getTableName(target.table);
  }
  return compileTarget(target).label;
}

const orderPattern = /^\s*([^\s]+)(?:\s+(asc|desc))?\s*$/i;

function orderByText(orderBy: SqlRowTarget['orderBy']): string {
  if (orderBy === undefined) return '';
  const list = typeof orderBy === 'string' ? [orderBy] : orderBy;
  if (!Array.isArray(list) || list.length === 0) throw new InvalidOptionError('orderBy must be a column or a non-empty list of columns');
  // Array.from visits the holes of a sparse array (map skips them: `order by , "id"`)
  const parts = Array.from(list, (item: unknown) => {
    const m = typeof item === 'string' && item.length <= 200 ? orderPattern.exec(item) : null;
    if (!m) throw new InvalidIdentifierError(item);
    return `${quoteIdent(m[1])}${m[2] ? ` ${m[2].toLowerCase()}` : ''}`;
  });
  return ` order by ${parts.join(', ')}`;
}

function lockClause(req: Request): string {
  return ` for ${req.strength}${req.wait === 'nowait' ? ' nowait' : req.wait === 'skipLocked' ? ' skip locked' : ''}`;
}

function rawStatement(target: SqlRowTarget, req: Request, limit: number | undefined): Statement {
  const t = compileTarget(target);
  const order = orderByText(target.orderBy);
  const lim = limit === undefined ? '' : ` limit ${t.params.add(limit)}`;
  return { text: `select * from ${t.table} where ${t.where}${order}${lim}${lockClause(req)}`, params: t.params.values };
}

function drizzleQuery(tx: unknown, target: DrizzleRowTarget<PgTable>, req: Request, limit: number | undefined): Promise<Row[]> {
  // biome-ignore lint/suspicious/noExplicitAny: the handle's drizzle type depends on the runner; checked in checkTarget
  let qb = (tx as any).select().from(target.table).$dynamic();
  if (target.where) qb = qb.where(target.where);
  if (target.orderBy?.length) qb = qb.orderBy(...target.orderBy);
  if (limit !== undefined) qb = qb.limit(limit);
  const config = req.wait === 'nowait' ? { noWait: true } : req.wait === 'skipLocked' ? { skipLocked: true } : undefined;
  return qb.for(req.strength, config);
}

// Used only when SKIP LOCKED returned nothing for a single-row lock: a plain read is never blocked
// by row locks, so it tells "exists but locked" from "no such row" without waiting.
async function exists<H>(scope: Scope<H>, target: AnyTarget): Promise<boolean> {
  if (isDrizzleTarget(target)) {
    const rows = await scope.call((tx) => {
      // biome-ignore lint/suspicious/noExplicitAny: see drizzleQuery
      const qb = (tx as any).select({ one: sql`1` }).from(target.table);
      return (target.where ? qb.where(target.where) : qb).limit(1) as Promise<Row[]>;
    });
    return rows.length > 0;
  }
  const t = compileTarget(target);
  const [rows] = await scope.conn.send([{ text: `select 1 from ${t.table} where ${t.where} limit 1`, params: t.params.values }]);
  return (rows?.length ?? 0) > 0;
}

function lockError(err: unknown, req: Request, label: string): unknown {
  if (req.signal?.aborted) return new AbortedError(`waiting for row lock on ${label} was aborted`, { cause: err });
  const state = sqlState(err);
  if (state === '55P03') {
    return req.timeoutMs !== undefined
      ? new LockTimeoutError(label, req.timeoutMs, { cause: err })
      : new RowLockedError(label, { cause: err });
  }
  if (state === '40P01') return new DeadlockError(`deadlock detected while locking ${label}`, { cause: err });
  return err;
}

/**
 * Lock the target's rows in the current transaction of `scope`. A wait that can fail on purpose
 * (nowait, timeout, signal) is an attempt, so in a caller's transaction the failure leaves it
 * usable. lock_timeout is transaction-local and restored right after the lock statement.
 */
async function lockIn<H>(scope: Scope<H>, target: AnyTarget, req: Request, label: string, limit?: number): Promise<Row[]> {
  const timed = req.timeoutMs !== undefined ? timeoutStatements(req.timeoutMs) : undefined;
  const mayFail = req.wait === 'nowait' || timed !== undefined || req.signal !== undefined;
  const step = async (s: Scope<H>): Promise<Row[]> => {
    if (!isDrizzleTarget(target)) {
      const statements = [...(timed ? [timed.before] : []), rawStatement(target, req, limit), ...(timed ? [timed.after] : [])];
      return ((await s.conn.send(statements, req.signal))[timed ? 1 : 0] ?? []) as Row[];
    }
    await s.conn.send(timed ? [timed.before] : [], req.signal); // also BEGIN of pgcoord's own transaction, before drizzle runs
    const rows = await s.call((tx) => withCancel(tx, req.signal, (t) => drizzleQuery(t, target, req, limit)));
    if (timed) await s.conn.send([timed.after]);
    return rows;
  };
  try {
    return await (mayFail ? scope.attempt(step, req.signal) : step(scope));
  } catch (err) {
    throw err instanceof AbortedError ? err : lockError(err, req, label);
  }
}

async function lockOne<H>(scope: Scope<H>, target: AnyTarget, req: Request, label: string): Promise<Row> {
  // limit 2: enough to see that the target is not one row, without locking a whole table by mistake
  const rows = await lockIn(scope, target, req, label, 2);
  if (rows.length === 0 && req.wait === 'skipLocked' && (await exists(scope, target))) throw new RowLockedError(label);
  return oneRow(rows, label);
}

// The row a single-row lock (limit 2) returned, or why there is not exactly one.
function oneRow(rows: Row[], label: string): Row {
  if (rows.length > 1) throw new InvalidOptionError(`target ${label} matches more than one row; lock one row by its key, or use lockRows`);
  if (rows.length === 1) return rows[0]!;
  throw new RowNotFoundError(label);
}

function checkFn(fn: unknown): void {
  if (typeof fn !== 'function') throw new InvalidOptionError('the callback must be a function');
}

/**
 * Lock rows inside a transaction you already have (a `sql.begin` handle, a pg client after BEGIN,
 * a drizzle tx, or the `tx` pgcoord gives a callback) and return them; the locks last until that
 * transaction ends. With `wait: 'skipLocked'` the result leaves out rows other transactions hold.
 * A drizzle table gives typed rows; a raw target gives `Record<string, unknown>` rows.
 *
 * @throws {@link NotInTransactionError} given a pool, {@link RowLockedError} (`nowait`),
 * {@link LockTimeoutError}, {@link AbortedError}, {@link DeadlockError}.
 *
 * @example
 * await sql.begin(async (tx) => {
 *   const rows = await lockRows(tx, { table: 'accounts', where: { text: 'id = any($1)', params: [[1, 2]] }, orderBy: 'id' });
 * });
 * await db.transaction(async (tx) => {
 *   const [order] = await lockRows(tx, { table: orders, where: eq(orders.id, 7) }, { wait: 'nowait' });
 * });
 */
export function lockRows<T extends PgTable>(
  tx: Runner,
  target: DrizzleRowTarget<T>,
  options?: Omit<RowLockOptions, keyof TransactionOptions>,
): Promise<T['$inferSelect'][]>;
export function lockRows<Row extends Record<string, unknown> = Record<string, unknown>>(
  tx: Runner,
  target: SqlRowTarget,
  options?: Omit<RowLockOptions, keyof TransactionOptions>,
): Promise<Row[]>;
export function lockRows(tx: Runner, target: AnyTarget, options?: RowLockOptions): Promise<Row[]> {
  return traced(
    'row',
    () => ({ operation: 'lockRows' }),
    async () => {
      const req = request(options);
      if (!isTransaction(tx)) throw new NotInTransactionError('lockRows');
      const label = checkTarget(tx, target);
      return inTransaction(tx, {}, (scope) => lockIn(scope, target, req, label));
    },
  );
}

/**
 * The write-only plan of {@link withRowLock}: `write(row, tx)` decides on the locked row (it may
 * await, e.g. a payment gateway, still under the lock) and returns its writes **unawaited, in an
 * array**; pgcoord sends them with COMMIT. On postgres.js given a pool that is two round trips in
 * all: `[BEGIN, SELECT ... FOR UPDATE]`, then `[writes, COMMIT]`. Return `[]` or nothing to write
 * nothing.
 */
export interface RowLockPlan<Row, H> {
  write: (row: Row, tx: H) => PlanWrites | Promise<PlanWrites>;
}

/** What a {@link RowLockPlan} produced: the locked row, and the result of each write. */
export interface RowLockPlanResult<Row> {
  row: Row;
  written: unknown[];
}

/**
 * Lock one row, then run `fn(row, tx)` in the same transaction: the read, the decision and the
 * write commit (or roll back) together, and the lock is released at the end of the transaction.
 * Given a pool, pgcoord opens the transaction; given a transaction, it joins it. Pass a
 * `{ write }` plan instead of `fn` to send the writes together with COMMIT ({@link RowLockPlan}).
 *
 * A missing row and a locked row are different errors: {@link RowNotFoundError} vs
 * {@link RowLockedError} (`nowait`, `skipLocked`) or {@link LockTimeoutError} (`timeoutMs`).
 * Under `'block'`, a row deleted while we waited is reported as not found.
 *
 * @example
 * const refunded = await withRowLock(sql, { table: 'orders', key: { id } }, async (order, tx) => {
 *   if (order.refunded + amount > order.total) return false;
 *   await tx`update orders set refunded = refunded + ${amount} where id = ${id}`;
 *   return true;
 * }, { timeoutMs: 2000 });
 * // the same in two round trips: the update rides with COMMIT
 * await withRowLock(sql, { table: 'orders', key: { id } }, {
 *   write: (order, tx) => (order.refunded + amount > order.total ? [] : [tx`update orders set refunded = refunded + ${amount} where id = ${id}`]),
 * });
 */
export function withRowLock<R extends Runner, T extends PgTable, V>(
  runner: R,
  target: DrizzleRowTarget<T>,
  fn: (row: T['$inferSelect'], tx: HandleOf<R>) => Promise<V> | V,
  options?: RowLockOptions,
): Promise<V>;
export function withRowLock<R extends Runner, V, Row extends Record<string, unknown> = Record<string, unknown>>(
  runner: R,
  target: SqlRowTarget,
  fn: (row: Row, tx: HandleOf<R>) => Promise<V> | V,
  options?: RowLockOptions,
): Promise<V>;
export function withRowLock<R extends Runner, T extends PgTable>(
  runner: R,
  target: DrizzleRowTarget<T>,
  plan: RowLockPlan<T['$inferSelect'], HandleOf<R>>,
  options?: RowLockOptions,
): Promise<RowLockPlanResult<T['$inferSelect']>>;
export function withRowLock<R extends Runner, Row extends Record<string, unknown> = Record<string, unknown>>(
  runner: R,
  target: SqlRowTarget,
  plan: RowLockPlan<Row, HandleOf<R>>,
  options?: RowLockOptions,
): Promise<RowLockPlanResult<Row>>;
export function withRowLock<V>(
  runner: Runner,
  target: AnyTarget,
  fn: ((row: Row, tx: unknown) => Promise<V> | V) | RowLockPlan<Row, unknown>,
  options?: RowLockOptions,
): Promise<V | RowLockPlanResult<Row>> {
  let req: Request;
  let plan: RowLockPlan<Row, unknown> | undefined;
  let label: string;
  try {
    req = request(options);
    plan = typeof fn === 'object' && fn !== null && typeof fn.write === 'function' ? fn : undefined;
    if (!plan) checkFn(fn);
    label = checkTarget(runner, target);
    if (!isDrizzleTarget(target)) rawStatement(target, req, 2); // checked before anything is sent
  } catch (err) {
    return Promise.reject(err);
  }
  // [BEGIN, SELECT ... FOR UPDATE] as one batch, the caller's work, then [writes, COMMIT] (or COMMIT)
  return traced(
    'row',
    () => ({ operation: 'withRowLock' }),
    (ctx) => {
      const asked = ctx ? performance.now() : 0;
      return inTransaction(
        runner,
        options ?? {},
        async (scope) => {
          const row = await lockOne(scope, target, req, label);
          if (ctx) ctx.waitMs = performance.now() - asked;
          if (!plan) return scope.call((tx) => (fn as (row: Row, tx: unknown) => Promise<V> | V)(row, tx));
          const writes = await scope.call((tx) => (plan as RowLockPlan<Row, unknown>).write(row, tx));
          return { row, written: await commitWith(scope.conn, writes) };
        },
        req.signal,
      );
    },
  );
}

/** Options for {@link claim}: lock strength, transaction options and an AbortSignal. */
export interface ClaimOptions extends TransactionOptions {
  strength?: LockStrength;
  signal?: AbortSignal;
}

/**
 * Work-queue claim: lock up to `limit` rows nobody else holds (`FOR UPDATE SKIP LOCKED`, one
 * statement) and run `fn(rows, tx)` in the same transaction; concurrent workers get disjoint rows
 * and never wait for each other. `fn` is called with `[]` when nothing is free. Delete or mark the
 * rows in `fn`: the locks end with the transaction.
 *
 * @example
 * const done = await claim(sql, { table: 'jobs', where: { text: 'queue = $1', params: ['mail'] }, orderBy: 'id', limit: 10 },
 *   async (jobs, tx) => {
 *     for (const job of jobs) await send(job);
 *     await tx`delete from jobs where id in ${tx(jobs.map((j) => j.id))}`;
 *     return jobs.length;
 *   });
 */
export function claim<R extends Runner, T extends PgTable, V>(
  runner: R,
  target: DrizzleRowTarget<T> & { limit: number },
  fn: (rows: T['$inferSelect'][], tx: HandleOf<R>) => Promise<V> | V,
  options?: ClaimOptions,
): Promise<V>;
export function claim<R extends Runner, V, Row extends Record<string, unknown> = Record<string, unknown>>(
  runner: R,
  target: SqlRowTarget & { limit: number },
  fn: (rows: Row[], tx: HandleOf<R>) => Promise<V> | V,
  options?: ClaimOptions,
): Promise<V>;
export function claim<V>(
  runner: Runner,
  target: AnyTarget & { limit: number },
  fn: (rows: Row[], tx: unknown) => Promise<V> | V,
  options?: ClaimOptions,
): Promise<V> {
  return traced(
    'row',
    () => ({ operation: 'claim' }),
    () => claimRows(runner, target, fn, options),
  );
}

async function claimRows<V>(
  runner: Runner,
  target: AnyTarget & { limit: number },
  fn: (rows: Row[], tx: unknown) => Promise<V> | V,
  options?: ClaimOptions,
): Promise<V> {
  if (options !== undefined && (options === null || typeof options !== 'object')) throw new InvalidOptionError('options must be an object');
  if ((options as RowLockOptions | undefined)?.wait !== undefined || (options as RowLockOptions | undefined)?.timeoutMs !== undefined)
    throw new InvalidOptionError('claim always skips locked rows: it takes no wait or timeoutMs');
  const req = request({ strength: options?.strength, signal: options?.signal, wait: 'skipLocked' });
  checkFn(fn);
  const limit = target?.limit;
  if (typeof limit !== 'number' || !Number.isSafeInteger(limit) || limit < 1)
    throw new InvalidOptionError(`limit must be a positive safe integer, got ${describe(limit)}`);
  // a queue without a filter claims from the whole table
  const t: AnyTarget =
    isDrizzleTarget(target) || target.key !== undefined || target.where !== undefined ? target : { ...target, where: { text: 'true' } };
  const label = checkTarget(runner, t);
  return inTransaction(
    runner,
    options ?? {},
    async (scope) => {
      const rows = await lockIn(scope, t, req, label, limit);
      return scope.call((tx) => fn(rows, tx));
    },
    req.signal,
  );
}
