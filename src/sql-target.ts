// Raw-SQL targets: a table name and key columns turned into quoted identifiers, plus an optional
// user WHERE fragment. Only names that pass the check below ever reach SQL text; values always
// travel as parameters.

import { InvalidOptionError, PgcoordError } from './errors.js';
import type { Statement } from './runner.js';

/**
 * A table or column name that pgcoord refuses to put into SQL.
 *
 * @example
 * await withRowLock(sql, { table: 'orders; drop table orders', key: { id } }, fn); // InvalidIdentifierError
 */
export class InvalidIdentifierError extends PgcoordError {
  constructor(readonly identifier: unknown) {
    super(
      'PGCOORD_INVALID_IDENTIFIER',
      `invalid SQL identifier ${JSON.stringify(String(identifier))}: use letters, digits, _ and $ (not first), at most 63 characters, optionally schema-qualified for tables`,
    );
  }
}

const part = /^[A-Za-z_][A-Za-z0-9_$]{0,62}$/;

/**
 * Quote a column name (`refunded` → `"refunded"`), or a table name, optionally schema-qualified
 * (`billing.orders` → `"billing"."orders"`). Names are used exactly as written (quoted, so
 * case-sensitive): pass `orders`, not `Orders`, for a table created as `create table Orders`.
 *
 * @example
 * quoteIdent('billing.orders', true) // '"billing"."orders"'
 */
export function quoteIdent(name: unknown, qualified = false): string {
  if (typeof name !== 'string') throw new InvalidIdentifierError(name);
  const parts = name.split('.');
  if (parts.length > (qualified ? 2 : 1) || !parts.every((p) => part.test(p))) throw new InvalidIdentifierError(name);
  return parts.map((p) => `"${p}"`).join('.');
}

/**
 * A row (or rows) of a table, for raw SQL: `key` columns compared for equality (`{ id: 7 }`),
 * and/or a `where` fragment whose `$1..$n` refer to its own `params`.
 *
 * @example
 * { table: 'orders', key: { id: 7 } }
 * { table: 'jobs', where: { text: 'queue = $1 and run_at <= now()', params: ['mail'] } }
 */
export interface SqlTarget {
  table: string;
  key?: Record<string, unknown>;
  where?: Statement;
}

/** Builds SQL text whose parameters are collected in order; the user fragment's come first. */
export class Params {
  readonly values: unknown[];
  constructor(first: readonly unknown[] = []) {
    this.values = [...first];
  }
  add(value: unknown): string {
    this.values.push(value);
    return `$${this.values.length}`;
  }
}

export interface CompiledTarget {
  table: string;
  /** The WHERE condition (without the keyword). */
  where: string;
  params: Params;
  /** For messages: `orders {"id":7}`. */
  label: string;
}

/**
 * Check and compile a raw target. The user's `where` fragment keeps its own `$1..$n` (its params
 * go first), so pgcoord never rewrites user SQL text; key values are appended after them.
 */
export function compileTarget(target: SqlTarget, { requireKey = false } = {}): CompiledTarget {
  if (target === null || typeof target !== 'object') throw new InvalidOptionError('target must be an object');
  const table = quoteIdent(target.table, true);
  const { key, where } = target;
  if (key !== undefined && (key === null || typeof key !== 'object' || Array.isArray(key)))
    throw new InvalidOptionError('key must be an object of column → value');
  if (where !== undefined && (where === null || typeof where !== 'object' || typeof where.text !== 'string' || !where.text.trim()))
    throw new InvalidOptionError('where must be { text, params? } with non-empty text');
  if (where?.params !== undefined && !Array.isArray(where.params)) throw new InvalidOptionError('where.params must be an array');
  const keyEntries = Object.entries(key ?? {});
  if (requireKey && keyEntries.length === 0) throw new InvalidOptionError('key must name at least one column');
  if (keyEntries.length === 0 && !where) throw new InvalidOptionError('target needs a key or a where fragment');
  const params = new Params(where?.params ?? []);
  const conditions: string[] = where ? [`(${where.text})`] : [];
  for (const [column, value] of keyEntries) {
    if (value === undefined) throw new InvalidOptionError(`key column ${column} is undefined`);
    conditions.push(value === null ? `${quoteIdent(column)} is null` : `${quoteIdent(column)} = ${params.add(value)}`);
  }
  const label = `${target.table}${key ? ` ${safeJson(key)}` : ''}${where ? ` where ${where.text}` : ''}`;
  return { table, where: conditions.join(' and '), params, label };
}

function safeJson(value: unknown): string {
  try {
    return JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
  } catch {
    return String(value);
  }
}

/**
 * A row to insert in the same statement as an update, only when the update applies (e.g. the
 * refund record next to the order it was taken from). `values` go in as parameters; `fromRow`
 * fills insert columns from columns of the updated row.
 *
 * @example
 * { into: 'refunds', values: { request_id: 'r-1', amount: 5 }, fromRow: { order_id: 'id' } }
 */
export interface InsertWithUpdate {
  into: string;
  values?: Record<string, unknown>;
  fromRow?: Record<string, string>;
}

/**
 * The `insert ... select ... from <updated>` of an {@link InsertWithUpdate}: one row per updated
 * row, none when the update matched nothing (it draws its rows from the update's RETURNING).
 */
export function compileInsert(insert: InsertWithUpdate, params: Params, updated: string): string {
  if (insert === null || typeof insert !== 'object') throw new InvalidOptionError('insert must be { into, values?, fromRow? }');
  const { values = {}, fromRow = {} } = insert;
  if (values === null || typeof values !== 'object' || Array.isArray(values))
    throw new InvalidOptionError('insert.values must be an object');
  if (fromRow === null || typeof fromRow !== 'object' || Array.isArray(fromRow))
    throw new InvalidOptionError('insert.fromRow must be an object');
  const columns: string[] = [];
  const exprs: string[] = [];
  for (const [column, value] of Object.entries(values)) {
    columns.push(quoteIdent(column));
    exprs.push(params.add(value));
  }
  for (const [column, source] of Object.entries(fromRow)) {
    columns.push(quoteIdent(column));
    exprs.push(`${updated}.${quoteIdent(source)}`);
  }
  if (columns.length === 0) throw new InvalidOptionError('insert needs at least one column in values or fromRow');
  return `insert into ${quoteIdent(insert.into, true)} (${columns.join(', ')}) select ${exprs.join(', ')} from ${updated}`;
}
