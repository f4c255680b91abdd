import { and, eq, getTableColumns, getTableName, is, SQL, sql } from 'drizzle-orm';
import { type PgColumn, PgTable, type PgUpdateSetSource } from 'drizzle-orm/pg-core';
import { InvalidOptionError, PgcoordError } from './errors.js';
import { RowNotFoundError } from './row-locks.js';
import { inTransaction, type Row, type Runner, runStatement, type TransactionOptions } from './runner.js';
import {
  compileInsert,
  compileTarget,
  type InsertWithUpdate,
  quoteIdent,
  ShapeCache,
  type SqlTarget,
  walkColumns,
  walkInsert,
  walkTarget,
} from './sql-target.js';

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
      `${target}: expected version ${String(expected)}${current === undefined ? '' : `, found ${String(current)}`}`,
    );
  }
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
  if (!ok) throw new InvalidOptionError(`expected must be the integer version you read, got ${String(expected)}`);
}

function checkSet(set: unknown): asserts set is Record<string, unknown> {
  if (set === null || typeof set !== 'object' || Array.isArray(set))
    throw new InvalidOptionError('set must be an object of column → value');
}

/**
 * Optimistic concurrency: write `set` only if the row's version is still `expected`, bump the
 * version in the same statement, and return the new row. If another writer got there first, throw
 * {@link VersionConflictError} (with the current version, read in the same transaction); if the row
 * is gone, {@link RowNotFoundError}. Wrap the read and this call in `retry` to re-run the whole
 * read-modify-write on conflict. The target should name one row (its key).
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
  options?: TransactionOptions,
): Promise<T['$inferSelect']>;
export function updateVersioned<Row extends Record<string, unknown> = Record<string, unknown>>(
  runner: Runner,
  update: SqlVersionedUpdate,
  options?: TransactionOptions,
): Promise<Row>;
export function updateVersioned(
  runner: Runner,
  update: SqlVersionedUpdate | DrizzleVersionedUpdate<PgTable>,
  options: TransactionOptions = {},
): Promise<Row> {
  let statement: { text: string; params: unknown[] };
  try {
    if (update === null || typeof update !== 'object') throw new InvalidOptionError('update must be an object');
    checkExpected(update.expected);
    checkSet(update.set);
    if (is(update.table, PgTable)) return drizzleVersioned(runner, update as DrizzleVersionedUpdate<PgTable>, options);
    statement = compile(update as SqlVersionedUpdate);
  } catch (err) {
    return Promise.reject(err);
  }
  // One statement: in autocommit on a pool (one round trip), inside the caller's transaction otherwise.
  return runStatement(runner, statement, options).then((rows) => rows[0] ?? missed(runner, update as SqlVersionedUpdate));
}

// The update matched nothing: the row is gone or its version moved. Read which (never blocked by
// row locks; in the caller's transaction when there is one); the reported version is informational.
async function missed(runner: Runner, u: SqlVersionedUpdate): Promise<never> {
  const t = compileTarget(u);
  const [now] = await runStatement(
    runner,
    { text: `select ${quoteIdent(u.version ?? 'version')} as v from ${t.table} where ${t.where} limit 1`, params: t.params.values },
    {},
    true,
  );
  if (!now) throw new RowNotFoundError(t.label);
  throw new VersionConflictError(t.label, u.expected, now.v as Version);
}

const shapes = new ShapeCache();

// The statement of an update: its values, collected while walking its shape, and the text of that
// shape (built once; see ShapeCache): the target's values, the set values, the expected version,
// then the insert's.
function compile(u: SqlVersionedUpdate): { text: string; params: unknown[] } {
  const values: unknown[] = [];
  let at = walkColumns(shapes, shapes.step(walkTarget(shapes, shapes.root(), u, values), u.version ?? 'version'), u.set, values);
  values.push(u.expected);
  if (u.insert !== undefined) at = walkInsert(shapes, at, u.insert, values);
  return { text: shapes.get(at) ?? shapes.set(at, values, compileText(u)), params: values };
}

function compileText(u: SqlVersionedUpdate): { text: string; values: readonly unknown[] } {
  const version = quoteIdent(u.version ?? 'version');
  const t = compileTarget(u);
  const sets = Object.entries(u.set).map(([column, value]) => {
    if (column === (u.version ?? 'version')) throw new InvalidOptionError('set must not change the version column: it is bumped for you');
    return `${quoteIdent(column)} = ${t.params.add(value)}`;
  });
  const expected = t.params.add(u.expected);
  const update1 = `update ${t.table} set ${[...sets, `${version} = ${version} + 1`].join(', ')} where ${t.where} and ${version} = ${expected} returning *`;
  // With `insert`, the insert draws its rows from the update's RETURNING: it runs exactly when the
  // update applied, in the same statement.
  const text =
    u.insert === undefined
      ? update1
      : `with pgcoord_u as (${update1}), pgcoord_i as (${compileInsert(u.insert, t.params, 'pgcoord_u')}) select * from pgcoord_u`;
  return { text, values: t.params.values };
}

async function drizzleVersioned(runner: Runner, u: DrizzleVersionedUpdate<PgTable>, options: TransactionOptions): Promise<Row> {
  const r = runner as Record<string, unknown>;
  if (typeof r.update !== 'function' || typeof r.session !== 'object')
    throw new InvalidOptionError('a drizzle table needs a drizzle runner (db or tx); use { table: "name", key } for raw SQL');
  if (!is(u.where, SQL)) throw new InvalidOptionError('where must be a drizzle SQL condition, e.g. eq(orders.id, 7)');
  const key = Object.entries(getTableColumns(u.table)).find(([, column]) => column === u.version)?.[0];
  if (key === undefined) throw new InvalidOptionError('version must be a column of the table');
  if (key in u.set) throw new InvalidOptionError('set must not change the version column: it is bumped for you');
  const label = getTableName(u.table);
  return inTransaction(runner, options, async (scope) => {
    await scope.conn.send([]); // BEGIN of pgcoord's own transaction, before drizzle runs
    return scope.call(async (handle) => {
      // biome-ignore lint/suspicious/noExplicitAny: the handle is a drizzle tx, checked above
      const tx = handle as any;
      const rows: Row[] = await tx
        .update(u.table)
        .set({ ...u.set, [key]: sql`${u.version} + 1` })
        .where(and(u.where, eq(u.version, u.expected)))
        .returning();
      if (rows[0]) return rows[0];
      const now: Row[] = await tx.select({ v: u.version }).from(u.table).where(u.where).limit(1);
      if (!now[0]) throw new RowNotFoundError(label);
      throw new VersionConflictError(label, u.expected, now[0].v as Version);
    });
  });
}
