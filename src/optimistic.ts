import { and, eq, getTableColumns, getTableName, is, SQL, sql } from 'drizzle-orm';
import { type PgColumn, PgTable, type PgUpdateSetSource } from 'drizzle-orm/pg-core';
import { inTransaction, type Row, type Runner, runStatement, withCancel } from './driver/index.js';
import { AbortedError, InvalidOptionError, PgcoordError } from './errors.js';
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
import { RowNotFoundError } from './row-locks.js';
import {
  checkRunOptions,
  compileInsert,
  compileTarget,
  type InsertWithUpdate,
  quoteIdent,
  type RunOptions,
  ShapeCache,
  type SqlTarget,
  targetLabel,
  walkColumns,
  walkInsert,
  walkTarget,
} from './sql-target.js';
import { describe } from './text.js';
import { traced } from './trace.js';

/** A version number as you read it (postgres.js returns int8 as a string). */
export type Version = number | bigint | string;

/**
 * Another writer changed the row since you read it: your `expected` version is no longer current.
 * Re-read and re-apply (see `retry`), never just re-send the write.
 *
 * @example
 * catch (e) { if (e instanceof VersionConflictError) console.log(e.expected, e.current) }
 */
export class VersionConflictError extends PgcoordError {
  constructor(
    readonly target: string,
    readonly expected: Version,
    /** The version read right after the failed update (informational: it may move again). */
    readonly current: Version | undefined,
  ) {
    super(
      'PGCOORD_VERSION_CONFLICT',
      `${target}: expected version ${shown(expected)}${current === undefined ? '' : `, found ${shown(current)}`}`,
    );
  }
}

// A version for a message: as is when it is a short number, else described (bounded, never throws).
function shown(v: unknown): string {
  return typeof v === 'number' || typeof v === 'bigint' || (typeof v === 'string' && v.length <= 40) ? String(v) : describe(v);
}

/** A versioned update for raw SQL: `set` column values, the `version` column (default `'version'`). */
export interface SqlVersionedUpdate extends SqlTarget {
  set: Record<string, unknown>;
  version?: string;
  expected: Version;
  /** Insert a row in the same statement, only when the update applies (e.g. a ledger record). */
  insert?: InsertWithUpdate;
}

/** A versioned update of a drizzle table; the new row comes back typed. */
export interface DrizzleVersionedUpdate<T extends PgTable> {
  table: T;
  where: SQL;
  set: PgUpdateSetSource<T>;
  version: PgColumn;
  expected: Version;
}

function checkExpected(expected: unknown): void {
  const ok =
    (typeof expected === 'number' && Number.isSafeInteger(expected)) ||
    typeof expected === 'bigint' ||
    (typeof expected === 'string' && /^-?\d+$/.test(expected));
  if (!ok) throw new InvalidOptionError(`expected must be the integer version you read, got ${describe(expected)}`);
}

function checkSet(set: unknown): asserts set is Record<string, unknown> {
  if (set === null || typeof set !== 'object' || Array.isArray(set))
    throw new InvalidOptionError('set must be an object of column → value');
}

/** Options of {@link updateVersioned}: transaction options (when pgcoord opens the transaction) and an AbortSignal. */
export interface VersionedUpdateOptions extends RunOptions {
  /** Abort to cancel the statement on the server (e.g. while it waits for the row); rejects with {@link AbortedError}. */
  signal?: AbortSignal;
  /**
   * An idempotency key (raw-SQL form only): the claim, the update, the `insert` and the stored
   * outcome in one statement; resolves `{ status, replayed }` instead of the row. An applied
   * update and a missing row are stored and replayed; a version conflict is not (nothing is
   * claimed): it throws {@link VersionConflictError} as usual, so `retry` can re-read and apply
   * with the same key.
   */
  idempotency?: UpdateIdempotency;
}

// drizzle's is() throws on some objects (a null prototype): anything it cannot check is not a table.
function isDrizzle<T>(value: unknown, type: abstract new (...args: never[]) => T): value is T {
  try {
    return is(value, type as never);
  } catch {
    return false;
  }
}

/**
 * Optimistic concurrency: write `set` only if the row's version is still `expected`, bump the
 * version in the same statement, and return the new row. If another writer got there first, throw
 * {@link VersionConflictError} (with the current version, read in the same transaction); if the row
 * is gone, {@link RowNotFoundError}. Wrap the read and this call in `retry` to re-run the whole
 * read-modify-write on conflict. The target should name one row (its key).
 *
 * Input and options are checked before any statement is sent: `undefined` values in `set`, `key`,
 * `where.params` or `insert.values` are refused (pass `null` for SQL NULL; a drizzle `set` keeps
 * drizzle's meaning, where `undefined` leaves a column out), and a signal already aborted rejects
 * with {@link AbortedError} and sends nothing.
 *
 * @throws {@link VersionConflictError}, {@link RowNotFoundError}, {@link AbortedError},
 * {@link InvalidOptionError}, {@link InvalidIdentifierError}, {@link CommitUnknownError} (the
 * connection was lost while the update ran in autocommit).
 *
 * @example
 * const order = (await sql`select * from orders where id = ${id}`)[0];
 * const updated = await updateVersioned(sql, {
 *   table: 'orders', key: { id }, set: { refunded: order.refunded + amount }, expected: order.version,
 * });
 * // drizzle: typed row back
 * await updateVersioned(db, { table: orders, where: eq(orders.id, id), set: { refunded: 50 }, version: orders.version, expected: 3 });
 */
export function updateVersioned<T extends PgTable>(
  runner: Runner,
  update: DrizzleVersionedUpdate<T>,
  options?: VersionedUpdateOptions & { idempotency?: undefined },
): Promise<T['$inferSelect']>;
export function updateVersioned<Row extends Record<string, unknown> = Record<string, unknown>>(
  runner: Runner,
  update: SqlVersionedUpdate,
  options: VersionedUpdateOptions & { idempotency: UpdateIdempotency },
): Promise<IdempotentUpdateResult<Row>>;
export function updateVersioned<Row extends Record<string, unknown> = Record<string, unknown>>(
  runner: Runner,
  update: SqlVersionedUpdate,
  options?: VersionedUpdateOptions & { idempotency?: undefined },
): Promise<Row>;
export function updateVersioned(
  runner: Runner,
  update: SqlVersionedUpdate | DrizzleVersionedUpdate<PgTable>,
  options: VersionedUpdateOptions = {},
): Promise<Row | IdempotentUpdateResult<Row>> {
  return traced(
    'write',
    () => ({ operation: 'updateVersioned' }),
    () => versioned(runner, update, options),
  );
}

function versioned(
  runner: Runner,
  update: SqlVersionedUpdate | DrizzleVersionedUpdate<PgTable>,
  options: VersionedUpdateOptions = {},
): Promise<Row | IdempotentUpdateResult<Row>> {
  let statement: { text: string; params: unknown[] };
  try {
    if (update === null || typeof update !== 'object') throw new InvalidOptionError('update must be an object');
    checkRunOptions(options);
    checkExpected(update.expected);
    checkSet(update.set);
    if (options.idempotency !== undefined) {
      if (isDrizzle(update.table, PgTable))
        throw new InvalidOptionError(
          'an idempotency key needs the raw-SQL form of updateVersioned ({ table: "name", key }), not a drizzle table',
        );
      return keyedVersioned(runner, update as SqlVersionedUpdate, options);
    }
    if (isDrizzle(update.table, PgTable)) return drizzleVersioned(runner, update as DrizzleVersionedUpdate<PgTable>, options);
    statement = compile(update as SqlVersionedUpdate);
  } catch (err) {
    return Promise.reject(err);
  }
  const { signal } = options;
  // One statement: in autocommit on a pool (one round trip), inside the caller's transaction otherwise.
  if (!signal) return runStatement(runner, statement, options).then((rows) => rows[0] ?? missed(runner, update as SqlVersionedUpdate));
  const aborted = (cause: unknown) =>
    new AbortedError(`versioned update of ${targetLabel(update as SqlVersionedUpdate)} was aborted`, { cause });
  if (signal.aborted) return Promise.reject(aborted(signal.reason));
  return runStatement(runner, statement, options)
    .then((rows) => rows[0] ?? missed(runner, update as SqlVersionedUpdate, signal))
    .catch((err: unknown) => {
      throw signal.aborted && !(err instanceof VersionConflictError || err instanceof RowNotFoundError) ? aborted(err) : err;
    });
}

// The update matched nothing: the row is gone or its version moved. Read which (never blocked by
// row locks; in the caller's transaction when there is one); the reported version is informational.
async function missed(runner: Runner, u: SqlVersionedUpdate, signal?: AbortSignal): Promise<never> {
  const t = compileTarget(u);
  const [now] = await runStatement(
    runner,
    { text: `select ${quoteIdent(u.version ?? 'version')} as v from ${t.table} where ${t.where} limit 1`, params: t.params.values },
    signal ? { signal } : {},
    true,
  );
  if (!now) throw new RowNotFoundError(t.label);
  throw new VersionConflictError(t.label, u.expected, now.v as Version);
}

/**
 * With an idempotency key: the claim, the versioned update (its check made on the locked row) and
 * the stored outcome in one statement (idempotency/one-statement.ts). A version conflict claims
 * nothing and is thrown, with the current version read in the same statement.
 */
async function keyedVersioned(
  runner: Runner,
  u: SqlVersionedUpdate,
  options: VersionedUpdateOptions,
): Promise<IdempotentUpdateResult<Row>> {
  const k = checkUpdateIdempotency(options.idempotency);
  const statement = compile(u, k);
  const { signal } = options;
  const aborted = (cause: unknown) => new AbortedError(`versioned update of ${targetLabel(u)} was aborted`, { cause });
  if (signal?.aborted) throw aborted(signal.reason);
  let step: Awaited<ReturnType<typeof runKeyed>>;
  try {
    step = await runKeyed(runner, statement, options, k);
  } catch (err) {
    throw signal?.aborted && !(err instanceof AbortedError) ? aborted(err) : err;
  }
  if (step.kind === 'refused') throw new VersionConflictError(targetLabel(u), u.expected, step.current as Version);
  return keyedResult(step);
}

const shapes = new ShapeCache();

// The statement of an update: its values, collected while walking its shape, and the text of that
// shape (built once; see ShapeCache): the target's values, the set values, the expected version,
// then the insert's, then (with a key) the key's.
function compile(u: SqlVersionedUpdate, k?: KeyedCheck): { text: string; params: unknown[] } {
  const values: unknown[] = [];
  let at = walkColumns(shapes, shapes.step(walkTarget(shapes, shapes.root(), u, values), u.version ?? 'version'), u.set, values, 'set');
  values.push(u.expected);
  if (u.insert !== undefined) at = walkInsert(shapes, at, u.insert, values);
  if (k !== undefined) {
    at = shapes.step(shapes.step(at, KEYED), k.keys);
    keyedValues(k, values);
  }
  return { text: shapes.get(at) ?? shapes.set(at, values, compileText(u, k)), params: values };
}

function compileText(u: SqlVersionedUpdate, k?: KeyedCheck): { text: string; values: readonly unknown[] } {
  const version = quoteIdent(u.version ?? 'version');
  const t = compileTarget(u);
  const sets = Object.entries(u.set).map(([column, value]) => {
    if (column === (u.version ?? 'version')) throw new InvalidOptionError('set must not change the version column: it is bumped for you');
    return `${quoteIdent(column)} = ${t.params.add(value)}`;
  });
  const expected = t.params.add(u.expected);
  if (k !== undefined) {
    // the version check is the guard, made on the locked row; its refusal is not stored
    const insert = u.insert === undefined ? undefined : compileInsert(u.insert, t.params, 'pgcoord_u');
    const p = keyedParams(k, t.params);
    const set = [...sets, `${version} = ${version} + 1`].join(', ');
    const text = keyedText({
      table: t.table,
      where: t.where,
      guard: `${version} = ${expected}`,
      current: version,
      set,
      insert,
      keys: k.keys,
      p,
    });
    return { text, values: t.params.values };
  }
  const update1 = `update ${t.table} set ${[...sets, `${version} = ${version} + 1`].join(', ')} where ${t.where} and ${version} = ${expected} returning *`;
  // With `insert`, the insert draws its rows from the update's RETURNING: it runs exactly when the
  // update applied, in the same statement.
  const text =
    u.insert === undefined
      ? update1
      : `with pgcoord_u as (${update1}), pgcoord_i as (${compileInsert(u.insert, t.params, 'pgcoord_u')}) select * from pgcoord_u`;
  return { text, values: t.params.values };
}

async function drizzleVersioned(runner: Runner, u: DrizzleVersionedUpdate<PgTable>, options: VersionedUpdateOptions): Promise<Row> {
  const r = runner as Record<string, unknown>;
  if (typeof r.update !== 'function' || typeof r.session !== 'object')
    throw new InvalidOptionError('a drizzle table needs a drizzle runner (db or tx); use { table: "name", key } for raw SQL');
  if (!isDrizzle(u.where, SQL)) throw new InvalidOptionError('where must be a drizzle SQL condition, e.g. eq(orders.id, 7)');
  const key = Object.entries(getTableColumns(u.table)).find(([, column]) => column === u.version)?.[0];
  if (key === undefined) throw new InvalidOptionError('version must be a column of the table');
  if (key in u.set) throw new InvalidOptionError('set must not change the version column: it is bumped for you');
  const label = getTableName(u.table);
  const { signal, isolation, readOnly } = options;
  if (signal?.aborted) throw new AbortedError(`versioned update of ${label} was aborted`, { cause: signal.reason });
  // biome-ignore lint/suspicious/noExplicitAny: the handle is a drizzle tx, checked above
  const update = async (tx: any): Promise<Row> => {
    const rows: Row[] = await tx
      .update(u.table)
      .set({ ...u.set, [key]: sql`${u.version} + 1` })
      .where(and(u.where, eq(u.version, u.expected)))
      .returning();
    if (rows[0]) return rows[0];
    const now: Row[] = await tx.select({ v: u.version }).from(u.table).where(u.where).limit(1);
    if (!now[0]) throw new RowNotFoundError(label);
    throw new VersionConflictError(label, u.expected, now[0].v as Version);
  };
  try {
    return await inTransaction(runner, { isolation, readOnly }, async (scope) => {
      await scope.conn.send([], signal); // BEGIN of pgcoord's own transaction, before drizzle runs
      if (!signal) return scope.call(update);
      // a cancel may fail the update on purpose: an attempt leaves a caller's transaction usable
      return scope.attempt((s) => s.call((handle) => withCancel(handle, signal, update)), signal);
    });
  } catch (err) {
    if (signal?.aborted && !(err instanceof VersionConflictError || err instanceof RowNotFoundError))
      throw new AbortedError(`versioned update of ${label} was aborted`, { cause: err });
    throw err;
  }
}
