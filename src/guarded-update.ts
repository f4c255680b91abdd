import { type Row, type Runner, runStatement } from './driver/index.js';
import { AbortedError, InvalidOptionError } from './errors.js';
import {
  checkUpdateIdempotency,
  type IdempotentUpdateResult,
  KEYED,
  type KeyedCheck,
  keyedParams,
  keyedResult,
  keyedText,
  keyedValues,
  runKeyed,
  type UpdateIdempotency,
} from './idempotency/one-statement.js';
import {
  checkRunOptions,
  checkSqlText,
  checkValue,
  compileInsert,
  compileTarget,
  type InsertWithUpdate,
  isBlank,
  quoteIdent,
  type RunOptions,
  ShapeCache,
  type SqlTarget,
  targetLabel,
  walkColumns,
  walkInsert,
  walkTarget,
} from './sql-target.js';
import { traced } from './trace.js';

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

/**
 * Options: transaction options (used when pgcoord opens the transaction) and an AbortSignal. All
 * are checked before any statement is sent ({@link InvalidOptionError}).
 */
export interface GuardedUpdateOptions extends RunOptions {
  /** Abort to cancel the statement on the server (e.g. while it waits for the row); rejects with {@link AbortedError}. */
  signal?: AbortSignal;
  /**
   * An idempotency key: the claim of the key, the update, the `insert` and the stored outcome go
   * in the same statement (one round trip; a replay is one round trip too, and writes nothing).
   * The outcome (applied, guard-failed, not-found) is stored in the idempotency table like
   * `idempotent`'s results; the same key with another `request` is {@link IdempotencyMismatchError}.
   */
  idempotency?: UpdateIdempotency;
}

/**
 * The one-statement strategy: `UPDATE ... SET ... WHERE key AND guard RETURNING *`, reporting
 * `applied` (with the new row), `guard-failed` (the row exists, the guard is false) or
 * `not-found`, without a second statement and so without a window between the update and the
 * check. With `insert`, a row is inserted in the same statement when (and only when) the update
 * applies. Given a pool it runs in autocommit (one round trip, no transaction to open); given a
 * transaction it joins it.
 *
 * Every value (`params`, `key`, a `set` object, `insert.values`) goes in as a parameter; `undefined`
 * is refused (pass `null` for SQL NULL). Input and options are checked before any statement is
 * sent; a signal already aborted rejects with {@link AbortedError} and sends nothing.
 *
 * With `idempotency: { scope, key, request? }` the key's claim and the stored outcome go in the same
 * statement (idempotency/one-statement.ts): it resolves `{ status, replayed }`, a replay answered
 * from the outcome stored by the first call (one round trip, nothing written).
 *
 * @throws {@link CommitUnknownError} when the connection is lost while the statement runs in
 * autocommit (it may have committed), {@link AbortedError}, {@link InvalidOptionError},
 * {@link InvalidIdentifierError}; with a key, the idempotency errors of `idempotent`
 * (IdempotencyMismatchError, IdempotencyInFlightError, IdempotencyScopeRequiredError, ...).
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
  options: GuardedUpdateOptions & { idempotency: UpdateIdempotency },
): Promise<IdempotentUpdateResult<R>>;
export function guardedUpdate<R extends Record<string, unknown> = Row>(
  runner: Runner,
  update: GuardedUpdate,
  options?: GuardedUpdateOptions & { idempotency?: undefined },
): Promise<GuardedResult<R>>;
export function guardedUpdate<R extends Record<string, unknown> = Row>(
  runner: Runner,
  update: GuardedUpdate,
  options: GuardedUpdateOptions = {},
): Promise<GuardedResult<R> | IdempotentUpdateResult<R>> {
  return traced(
    'write',
    () => ({ operation: 'guardedUpdate' }),
    () => guarded<R>(runner, update, options),
  );
}

function guarded<R extends Record<string, unknown>>(
  runner: Runner,
  update: GuardedUpdate,
  options: GuardedUpdateOptions = {},
): Promise<GuardedResult<R> | IdempotentUpdateResult<R>> {
  if (options?.idempotency !== undefined) return keyed<R>(runner, update, options);
  let statement: { text: string; params: unknown[] };
  try {
    statement = compile(update, options);
  } catch (err) {
    return Promise.reject(err);
  }
  const { signal } = options;
  if (!signal) return runStatement(runner, statement, options).then(outcome as (rows: Row[]) => GuardedResult<R>);
  const aborted = (cause: unknown) =>
    new AbortedError(`guarded update of ${targetLabel({ table: update.table, key: update.key })} was aborted`, { cause });
  if (signal.aborted) return Promise.reject(aborted(signal.reason));
  return runStatement(runner, statement, options).then(outcome as (rows: Row[]) => GuardedResult<R>, (err: unknown) => {
    throw signal.aborted ? aborted(err) : err;
  });
}

/**
 * With an idempotency key: one statement (see idempotency/one-statement.ts) whose first call or
 * replay is told apart by `replayed`.
 */
async function keyed<R>(runner: Runner, update: GuardedUpdate, options: GuardedUpdateOptions): Promise<IdempotentUpdateResult<R>> {
  const k = checkUpdateIdempotency(options.idempotency);
  const statement = compile(update, options, k);
  const { signal } = options;
  const aborted = (cause: unknown) =>
    new AbortedError(`guarded update of ${targetLabel({ table: update.table, key: update.key })} was aborted`, { cause });
  if (signal?.aborted) throw aborted(signal.reason);
  try {
    return keyedResult<R>(await runKeyed(runner, statement, options, k));
  } catch (err) {
    throw signal?.aborted && !(err instanceof AbortedError) ? aborted(err) : err;
  }
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
function compile(update: GuardedUpdate, options: GuardedUpdateOptions, k?: KeyedCheck): { text: string; params: unknown[] } {
  if (update === null || typeof update !== 'object') throw new InvalidOptionError('update must be an object');
  const { table, key, set, guard, params = [], insert } = update;
  if (typeof guard !== 'string' || isBlank(guard)) throw new InvalidOptionError('guard must be a non-empty SQL condition');
  if (!Array.isArray(params)) throw new InvalidOptionError('params must be an array');
  for (let i = 0; i < params.length; i++) if (params[i] === undefined) checkValue(params[i], `params[${i}]`);
  checkRunOptions(options);
  const target = { table, key, where: { text: 'true', params } };
  const values: unknown[] = [];
  let at = walkTarget(shapes, shapes.root(), target, values);
  at = shapes.step(at, guard);
  if (typeof set === 'string') at = shapes.step(shapes.step(at, SET_TEXT), set);
  else if (set !== null && typeof set === 'object' && !Array.isArray(set)) at = walkColumns(shapes, at, set, values, 'set');
  if (insert !== undefined) at = walkInsert(shapes, at, insert, values);
  if (k !== undefined) {
    at = shapes.step(shapes.step(at, KEYED), k.keys);
    keyedValues(k, values);
  }
  return { text: shapes.get(at) ?? shapes.set(at, values, compileText(update, target, k)), params: values };
}

function compileText(update: GuardedUpdate, target: SqlTarget, k: KeyedCheck | undefined): { text: string; values: readonly unknown[] } {
  const { set, guard } = update;
  const t = compileTarget(target, { requireKey: true });
  checkSqlText(guard, 'guard');
  let setText: string;
  if (typeof set === 'string' && !isBlank(set)) {
    checkSqlText(set, 'set');
    setText = set;
  } else if (set !== null && typeof set === 'object' && !Array.isArray(set) && Object.keys(set).length > 0)
    setText = Object.entries(set)
      .map(([column, value]) => `${quoteIdent(column)} = ${t.params.add(value)}`)
      .join(', ');
  else throw new InvalidOptionError('set must be a non-empty SQL fragment or an object of column → value');
  const insertText = update.insert === undefined ? undefined : compileInsert(update.insert, t.params, 'pgcoord_u');
  if (k !== undefined) {
    // the same parts, with the key's claim and stored outcome (idempotency/one-statement.ts)
    const p = keyedParams(k, t.params);
    const text = keyedText({ table: t.table, where: t.where, guard, set: setText, insert: insertText, keys: k.keys, p });
    return { text, values: t.params.values };
  }
  const insert = insertText === undefined ? '' : `, pgcoord_i as (${insertText})`;

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
