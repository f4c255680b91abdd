import { AbortedError, InvalidOptionError } from './errors.js';
import { type Row, type Runner, runStatement, type TransactionOptions } from './runner.js';
import {
  compileInsert,
  compileTarget,
  type InsertWithUpdate,
  isBlank,
  quoteIdent,
  ShapeCache,
  type SqlTarget,
  targetLabel,
  walkColumns,
  walkInsert,
  walkTarget,
} from './sql-target.js';

/**
 * A guarded update: `set` is applied to the row with this `key` only if `guard` holds for it.
 * `set` is a SQL fragment (`'refunded = refunded + $1'`) or column → value; `guard` is a SQL
 * condition on the row (`'refunded + $1 <= total'`); both use `params` (`$1..$n`). Column names in
 * `key` and in a `set` object are validated and quoted; the fragments are your SQL, values go in
 * `params`. `key` must identify at most one row (primary or unique key).
 */
export interface GuardedUpdate {
  table: string;
  key: Record<string, unknown>;
  set: string | Record<string, unknown>;
  guard: string;
  params?: readonly unknown[];
  /**
   * Insert a row in the same statement, only when the update applies: the refund record next to
   * the order it was taken from, with no second statement and no transaction to open.
   */
  insert?: InsertWithUpdate;
}

/** What happened, told apart in the same statement. */
export type GuardedResult<R = Row> = { status: 'applied'; row: R } | { status: 'guard-failed' } | { status: 'not-found' };

/** Options: transaction options (used when pgcoord opens the transaction) and an AbortSignal. */
export interface GuardedUpdateOptions extends TransactionOptions {
  /** Abort to cancel the statement on the server (e.g. while it waits for the row); rejects with {@link AbortedError}. */
  signal?: AbortSignal;
}

/**
 * The one-statement strategy: `UPDATE ... SET ... WHERE key AND guard RETURNING *`, reporting
 * `applied` (with the new row), `guard-failed` (the row exists, the guard is false) or
 * `not-found`, without a second statement and so without a window between the update and the
 * check. With `insert`, a row is inserted in the same statement when (and only when) the update
 * applies. Given a pool it runs in autocommit (one round trip, no transaction to open); given a
 * transaction it joins it.
 *
 * @throws {@link CommitUnknownError} when the connection is lost while the statement runs in
 * autocommit (it may have committed), {@link AbortedError}, {@link InvalidOptionError}.
 *
 * @example
 * const r = await guardedUpdate(sql, {
 *   table: 'orders', key: { id }, set: 'refunded = refunded + $1', guard: 'refunded + $1 <= total', params: [amount],
 *   insert: { into: 'refunds', values: { request_id: requestId, amount }, fromRow: { order_id: 'id' } },
 * });
 * if (r.status === 'applied') console.log(r.row.refunded);
 */
export function guardedUpdate<R extends Record<string, unknown> = Row>(
  runner: Runner,
  update: GuardedUpdate,
  options: GuardedUpdateOptions = {},
): Promise<GuardedResult<R>> {
  let statement: { text: string; params: unknown[] };
  try {
    statement = compile(update, options);
  } catch (err) {
    return Promise.reject(err);
  }
  const { signal } = options;
  const pending = runStatement(runner, statement, options);
  if (!signal) return pending.then(outcome as (rows: Row[]) => GuardedResult<R>);
  return pending.then(outcome as (rows: Row[]) => GuardedResult<R>, (err: unknown) => {
    if (signal.aborted)
      throw new AbortedError(`guarded update of ${targetLabel({ table: update.table, key: update.key })} was aborted`, { cause: err });
    throw err;
  });
}

function outcome(rows: Row[]): GuardedResult {
  const row = rows[0];
  if (row?.pgcoord_applied === true) {
    // The statement puts pgcoord's two columns last: deleting the properties a row got last (in
    // reverse order) keeps it a fast object in V8, where copying it without them costs a new object.
    delete row.pgcoord_found;
    delete row.pgcoord_applied;
    return { status: 'applied', row };
  }
  return Number(row?.pgcoord_found ?? 0) > 0 ? { status: 'guard-failed' } : { status: 'not-found' };
}

const shapes = new ShapeCache();
const SET_TEXT = Symbol('set text');

// The statement of an update: its values, collected while walking its shape, and the text of that
// shape (built once; see ShapeCache). User params keep their numbers; key, set-object and insert
// values are numbered after them, in that order.
function compile(update: GuardedUpdate, options: GuardedUpdateOptions): { text: string; params: unknown[] } {
  if (update === null || typeof update !== 'object') throw new InvalidOptionError('update must be an object');
  const { table, key, set, guard, params = [], insert } = update;
  if (typeof guard !== 'string' || isBlank(guard)) throw new InvalidOptionError('guard must be a non-empty SQL condition');
  if (!Array.isArray(params)) throw new InvalidOptionError('params must be an array');
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('options must be an object');
  const { signal } = options;
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  const target = { table, key, where: { text: 'true', params } };
  const values: unknown[] = [];
  let at = walkTarget(shapes, shapes.root(), target, values);
  at = shapes.step(at, guard);
  if (typeof set === 'string') at = shapes.step(shapes.step(at, SET_TEXT), set);
  else if (set !== null && typeof set === 'object' && !Array.isArray(set)) at = walkColumns(shapes, at, set, values);
  if (insert !== undefined) at = walkInsert(shapes, at, insert, values);
  return { text: shapes.get(at) ?? shapes.set(at, values, compileText(update, target)), params: values };
}

function compileText(update: GuardedUpdate, target: SqlTarget): { text: string; values: readonly unknown[] } {
  const { set, guard } = update;
  const t = compileTarget(target, { requireKey: true });
  let setText: string;
  if (typeof set === 'string' && !isBlank(set)) setText = set;
  else if (set !== null && typeof set === 'object' && !Array.isArray(set) && Object.keys(set).length > 0)
    setText = Object.entries(set)
      .map(([column, value]) => `${quoteIdent(column)} = ${t.params.add(value)}`)
      .join(', ');
  else throw new InvalidOptionError('set must be a non-empty SQL fragment or an object of column → value');
  const insert = update.insert === undefined ? '' : `, pgcoord_i as (${compileInsert(update.insert, t.params, 'pgcoord_u')})`;

  // Why one statement is enough and safe (READ COMMITTED):
  // - pgcoord_r locks the row (FOR NO KEY UPDATE, what a plain UPDATE of non-key columns takes) and
  //   evaluates the guard on it. If another transaction holds the row, it waits; then it follows the
  //   row to its newest committed version and evaluates the guard there; a row deleted meanwhile
  //   drops out, so "not found" is the truth at the moment we hold the lock.
  // - pgcoord_u joins pgcoord_r, so it can only update once pgcoord_r has run. It updates the same
  //   row, now locked by us (if its snapshot version is stale, Postgres re-checks the newest version
  //   under our lock, the one the guard was evaluated on), and the SET expressions see that version.
  // - pgcoord_i (with `insert`) draws its rows from pgcoord_u's RETURNING: it inserts exactly when
  //   the update applied. A data-modifying CTE runs to completion even though nothing reads it.
  // - The outer select reports the updated row (pgcoord_applied) and how many rows pgcoord_r saw:
  //   0 = not found, else guard failed. Both come from the same locked version; no other statement
  //   can slip between the check and the write. Under REPEATABLE READ / SERIALIZABLE a row changed
  //   since the snapshot fails with 40001 instead (retryable).
  const text = `with pgcoord_r as (select (${guard}) as pgcoord_ok from ${t.table} where ${t.where} for no key update),
pgcoord_u as (update ${t.table} set ${setText} from pgcoord_r where ${t.where} and pgcoord_r.pgcoord_ok returning ${t.table}.*, true as pgcoord_applied)${insert}
select pgcoord_u.*, (select count(*) from pgcoord_r)::int as pgcoord_found from (values (1)) as pgcoord_d (x) left join pgcoord_u on true`;

  return { text, values: t.params.values };
}
