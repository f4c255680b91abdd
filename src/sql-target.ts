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
  // An application names the same few tables and columns on every call: check each name once.
  const seen = qualified ? quotedTables : quotedColumns;
  const known = seen.get(name);
  if (known !== undefined) return known;
  const parts = name.split('.');
  if (parts.length > (qualified ? 2 : 1) || !parts.every((p) => part.test(p))) throw new InvalidIdentifierError(name);
  const quoted = parts.map((p) => `"${p}"`).join('.');
  if (seen.size >= QUOTED_MAX) seen.clear(); // names built from data must not grow it without bound
  seen.set(name, quoted);
  return quoted;
}

const QUOTED_MAX = 1000;
const quotedTables = new Map<string, string>();
const quotedColumns = new Map<string, string>();

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
    this.values = first.slice();
  }
  add(value: unknown): string {
    const n = this.values.push(value);
    return placeholders[n] ?? `$${n}`;
  }
}

const placeholders = Array.from({ length: 65 }, (_, n) => `$${n}`);

export interface CompiledTarget {
  table: string;
  /** The WHERE condition (without the keyword). */
  where: string;
  params: Params;
  /** For messages: `orders {"id":7}` (built when read). */
  readonly label: string;
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
  const params = new Params(where?.params ?? []);
  // (built on every call of every raw-target function: one string, no intermediate arrays)
  let conditions = where ? `(${where.text})` : '';
  let keys = 0;
  for (const column in key) {
    if (!Object.hasOwn(key, column)) continue;
    const value = key[column];
    if (value === undefined) throw new InvalidOptionError(`key column ${column} is undefined`);
    if (conditions) conditions += ' and ';
    conditions += value === null ? `${quoteIdent(column)} is null` : `${quoteIdent(column)} = ${params.add(value)}`;
    keys++;
  }
  if (requireKey && keys === 0) throw new InvalidOptionError('key must name at least one column');
  if (keys === 0 && !where) throw new InvalidOptionError('target needs a key or a where fragment');
  return {
    table,
    where: conditions,
    params,
    get label() {
      return `${target.table}${key ? ` ${safeJson(key)}` : ''}${where ? ` where ${where.text}` : ''}`;
    },
  };
}

function safeJson(value: unknown): string {
  try {
    return JSON.stringify(value); // the common case, and several times faster than with a replacer
  } catch {
    try {
      return JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
    } catch {
      return String(value);
    }
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
  let columns = '';
  let exprs = '';
  for (const column in values) {
    if (!Object.hasOwn(values, column)) continue;
    columns += `${columns ? ', ' : ''}${quoteIdent(column)}`;
    exprs += `${exprs ? ', ' : ''}${params.add(values[column])}`;
  }
  for (const column in fromRow) {
    if (!Object.hasOwn(fromRow, column)) continue;
    columns += `${columns ? ', ' : ''}${quoteIdent(column)}`;
    exprs += `${exprs ? ', ' : ''}${updated}.${quoteIdent(fromRow[column])}`;
  }
  if (!columns) throw new InvalidOptionError('insert needs at least one column in values or fromRow');
  return `insert into ${quoteIdent(insert.into, true)} (${columns}) select ${exprs} from ${updated}`;
}
