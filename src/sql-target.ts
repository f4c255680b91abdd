// Raw-SQL targets: a table name and key columns turned into quoted identifiers, plus an optional
// user WHERE fragment. Only names that pass the check below ever reach SQL text; values always
// travel as parameters.

import type { Isolation, Statement, TransactionOptions } from './driver/index.js';
import { InvalidOptionError, PgcoordError } from './errors.js';
import { describe, ownCopy, textProblem } from './text.js';

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
      `invalid SQL identifier ${describe(identifier)}: use letters, digits, _ and $ (not first), at most 63 characters, optionally schema-qualified for tables`,
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
  if (name.length > IDENT_MAX) throw new InvalidIdentifierError(name); // before splitting a huge string
  const parts = name.split('.');
  if (parts.length > (qualified ? 2 : 1) || !parts.every((p) => part.test(p))) throw new InvalidIdentifierError(name);
  const quoted = parts.map((p) => `"${p}"`).join('.');
  if (seen.size >= QUOTED_MAX) seen.clear(); // names built from data must not grow it without bound
  seen.set(name, quoted);
  return quoted;
}

const QUOTED_MAX = 1000;
const IDENT_MAX = 63 + 1 + 63; // schema.table
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

/** A checked raw target: quoted table, WHERE condition and its parameters. */
export class CompiledTarget {
  constructor(
    readonly table: string,
    /** The WHERE condition (without the keyword). */
    readonly where: string,
    readonly params: Params,
    private readonly target: SqlTarget,
  ) {}

  /** For messages: `orders {"id":7}`, built only when read (a getter on the prototype: no closure per call). */
  get label(): string {
    return targetLabel(this.target);
  }
}

/** `orders {"id":7}`, `jobs where queue = $1`: a target named in messages (at most 200 characters). */
export function targetLabel({ table, key, where }: SqlTarget): string {
  const label = `${table}${key ? ` ${safeJson(key)}` : ''}${where ? ` where ${where.text}` : ''}`;
  return label.length > LABEL_MAX ? `${label.slice(0, LABEL_MAX - 1)}…` : label;
}

const LABEL_MAX = 200;

// The checks of a target's structure (its names are checked by quoteIdent when compiled).
function checkTarget(target: SqlTarget): void {
  if (target === null || typeof target !== 'object') throw new InvalidOptionError('target must be an object');
  const { key, where } = target;
  if (key !== undefined && (key === null || typeof key !== 'object' || Array.isArray(key)))
    throw new InvalidOptionError('key must be an object of column → value');
  if (where !== undefined && (where === null || typeof where !== 'object' || typeof where.text !== 'string' || isBlank(where.text)))
    throw new InvalidOptionError('where must be { text, params? } with non-empty text');
  if (where?.params !== undefined && !Array.isArray(where.params)) throw new InvalidOptionError('where.params must be an array');
}

/**
 * Refuse `undefined` as a parameter value: postgres.js fails on it (UNDEFINED_VALUE) and
 * node-postgres silently sends NULL. `what` names the value in the message (`params[2]`, `set column note`).
 */
export function checkValue(value: unknown, what: string): void {
  if (value === undefined) throw new InvalidOptionError(`${what} is undefined: pass null for SQL NULL`);
}

/** Refuse SQL text that the server would not see as written (NUL, lone surrogates). */
export function checkSqlText(text: string, what: string): void {
  const problem = textProblem(text);
  if (problem !== undefined) throw new InvalidOptionError(`${what} ${describe(text)} ${problem}`);
}

/** {@link TransactionOptions} and an AbortSignal, as the functions that run one statement take them. */
export interface RunOptions extends TransactionOptions {
  signal?: AbortSignal;
}

const isolations: readonly unknown[] = ['read committed', 'repeatable read', 'serializable'] satisfies Isolation[];

/**
 * Check `isolation`, `readOnly` and `signal` before any statement is sent; throws
 * {@link InvalidOptionError} for `null`, a non-object, an unknown isolation level, a non-boolean
 * `readOnly` or a `signal` that is not an AbortSignal.
 */
export function checkRunOptions<T extends RunOptions>(options: T): T {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError(`options must be an object, got ${describe(options)}`);
  const { isolation, readOnly, signal } = options;
  if (isolation !== undefined && !isolations.includes(isolation))
    throw new InvalidOptionError(`isolation must be 'read committed', 'repeatable read' or 'serializable', got ${describe(isolation)}`);
  if (readOnly !== undefined && typeof readOnly !== 'boolean')
    throw new InvalidOptionError(`readOnly must be a boolean, got ${describe(readOnly)}`);
  if (signal !== undefined && !(signal instanceof AbortSignal))
    throw new InvalidOptionError(`signal must be an AbortSignal, got ${describe(signal)}`);
  return options;
}

function keyValue(key: Record<string, unknown>, column: string): unknown {
  const value = key[column];
  if (value === undefined) throw new InvalidOptionError(`key column ${describe(column)} is undefined`);
  return value;
}

/** True for a string with nothing but white space (without allocating a trimmed copy). */
export function isBlank(text: string): boolean {
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 32) return false;
  return text.trim() === '';
}

/**
 * Check and compile a raw target. The user's `where` fragment keeps its own `$1..$n` (its params
 * go first), so pgcoord never rewrites user SQL text; key values are appended after them.
 */
export function compileTarget(target: SqlTarget, { requireKey = false } = {}): CompiledTarget {
  checkTarget(target);
  const table = quoteIdent(target.table, true);
  const { key, where } = target;
  if (where) {
    checkSqlText(where.text, 'where');
    for (let i = 0; i < (where.params?.length ?? 0); i++) checkValue(where.params?.[i], `where.params[${i}]`);
  }
  const params = new Params(where?.params ?? []);
  let conditions = where ? `(${where.text})` : '';
  let keys = 0;
  for (const column in key) {
    if (!Object.hasOwn(key, column)) continue;
    const value = keyValue(key, column);
    if (conditions) conditions += ' and ';
    conditions += value === null ? `${quoteIdent(column)} is null` : `${quoteIdent(column)} = ${params.add(value)}`;
    keys++;
  }
  if (requireKey && keys === 0) throw new InvalidOptionError('key must name at least one column');
  if (keys === 0 && !where) throw new InvalidOptionError('target needs a key or a where fragment');
  return new CompiledTarget(table, conditions, params, target);
}

/**
 * Statement texts by shape. An application calls pgcoord with the same few shapes (table, key
 * columns, set columns, SQL fragments) and new values each time, so each shape's text is built,
 * and its names checked, once; a call then only walks its shape and collects its values.
 *
 * A shape is a path in this trie, one level per part (a name, a fragment, a count, a flag), so two
 * different shapes never share a path, whatever their strings contain. Only a text that compiled
 * is stored, so a path with an invalid name never has one: every call of an invalid shape compiles,
 * and fails, as it would without the cache.
 *
 * Shapes made from data must not grow it without bound: it keeps at most `maxNodes` nodes and
 * `maxChars` characters (string parts and texts, each a copy of its own) and starts over when full.
 * A string part longer than `maxPart` characters, or an object part, is never kept: that shape
 * walks a detached node and is compiled on every call.
 */
export class ShapeCache {
  #root: ShapeNode = new Map();
  #nodes = 0;
  #chars = 0;
  #full = false;

  constructor(
    private readonly maxNodes = 10_000,
    private readonly maxChars = 4_000_000,
    private readonly maxPart = 2_000,
  ) {}

  /** Characters of the strings kept now (parts and texts): at most `maxChars`. */
  get retainedChars(): number {
    return this.#chars;
  }

  /** Where every path starts. */
  root(): ShapeNode {
    if (this.#full || this.#nodes >= this.maxNodes) {
      this.#root = new Map();
      this.#nodes = 0;
      this.#chars = 0;
      this.#full = false;
    }
    return this.#root;
  }

  /** The child of `node` for `part` (created on the way, or detached when it would not be kept). */
  step(node: ShapeNode, part: unknown): ShapeNode {
    if (node === DETACHED) return DETACHED;
    let next = node.get(part) as ShapeNode | undefined;
    if (next === undefined) {
      const chars = typeof part === 'string' ? part.length : 0;
      if (chars > this.maxPart || (typeof part === 'object' && part !== null) || typeof part === 'function') return DETACHED;
      if (this.#nodes >= this.maxNodes || this.#chars + chars > this.maxChars) {
        this.#full = true; // start over at the next call
        return DETACHED;
      }
      next = new Map();
      node.set(typeof part === 'string' ? ownCopy(part) : part, next);
      this.#nodes++;
      this.#chars += chars;
    }
    return next;
  }

  /** The text stored at `node`: its shape compiled before. */
  get(node: ShapeNode): string | undefined {
    return node.get(TEXT) as string | undefined;
  }

  /**
   * Store (and return) the text `compiled` for the shape ending at `node`, once its values are the
   * ones the caller collected while walking it (the walk and the compiler agree on the order).
   */
  set(node: ShapeNode, values: readonly unknown[], compiled: { text: string; values: readonly unknown[] }): string {
    if (compiled.values.length !== values.length || !compiled.values.every((v, i) => Object.is(v, values[i])))
      throw new Error(`pgcoord internal error: a statement's parameters came out in another order than its shape's (${compiled.text})`);
    if (node === DETACHED) return compiled.text;
    if (this.#chars + compiled.text.length > this.maxChars) {
      this.#full = true;
      return compiled.text;
    }
    // stored flat: a text built by concatenation is a tree of pieces in V8, walked again each time
    // the driver copies it (into its statement-cache key) on every call
    const text = ownCopy(compiled.text);
    node.set(TEXT, text);
    this.#chars += text.length;
    return text;
  }
}

/** A node of a {@link ShapeCache}. */
export type ShapeNode = Map<unknown, unknown>;

const TEXT = Symbol('pgcoord.text');

// The node of every shape the cache does not keep: stepping from it stays on it, and no text is
// ever stored on it.
const DETACHED: ShapeNode = new Map();

/**
 * Walk a target's shape (table, where fragment and its parameter count, key columns and which are
 * null) and collect its values in {@link compileTarget}'s order: the where params, then the keys.
 */
export function walkTarget(cache: ShapeCache, node: ShapeNode, target: SqlTarget, values: unknown[]): ShapeNode {
  checkTarget(target);
  const { key, where } = target;
  let at = cache.step(cache.step(node, target.table), where === undefined ? undefined : where.text);
  if (where?.params) {
    at = cache.step(at, where.params.length);
    for (let i = 0; i < where.params.length; i++) {
      const p = where.params[i];
      if (p === undefined) checkValue(p, `where.params[${i}]`);
      values.push(p);
    }
  }
  for (const column in key) {
    if (!Object.hasOwn(key, column)) continue;
    const value = keyValue(key, column);
    at = cache.step(cache.step(at, column), value === null);
    if (value !== null) values.push(value);
  }
  return at;
}

function safeJson(value: unknown): string {
  try {
    return JSON.stringify(value); // the common case, and several times faster than with a replacer
  } catch {
    try {
      return JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
    } catch {
      return describe(value);
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
  const { values, fromRow } = checkInsert(insert);
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

function checkInsert(insert: InsertWithUpdate): Required<Pick<InsertWithUpdate, 'values' | 'fromRow'>> {
  if (insert === null || typeof insert !== 'object') throw new InvalidOptionError('insert must be { into, values?, fromRow? }');
  const { values = {}, fromRow = {} } = insert;
  if (values === null || typeof values !== 'object' || Array.isArray(values))
    throw new InvalidOptionError('insert.values must be an object');
  if (fromRow === null || typeof fromRow !== 'object' || Array.isArray(fromRow))
    throw new InvalidOptionError('insert.fromRow must be an object');
  return { values, fromRow };
}

/**
 * Walk the columns of `record` (its own keys, in order) into the shape and collect their values,
 * in the order the compilers number them (`for...in` with own keys, as Object.entries gives them).
 * An undefined value is refused ({@link checkValue}); `what` names the record in that message.
 */
export function walkColumns(
  cache: ShapeCache,
  node: ShapeNode,
  record: Record<string, unknown>,
  values: unknown[],
  what: string,
): ShapeNode {
  let at = node;
  for (const column in record) {
    if (!Object.hasOwn(record, column)) continue;
    const value = record[column];
    if (value === undefined) checkValue(value, `${what} column ${describe(column)}`);
    at = cache.step(at, column);
    values.push(value);
  }
  return at;
}

/**
 * Walk an insert's shape (a marker, table, value columns, row columns) and collect its values in
 * {@link compileInsert}'s order.
 */
export function walkInsert(cache: ShapeCache, node: ShapeNode, insert: InsertWithUpdate, values: unknown[]): ShapeNode {
  const { values: columns, fromRow } = checkInsert(insert);
  let at = walkColumns(cache, cache.step(cache.step(node, INSERT), insert.into), columns, values, 'insert.values');
  at = cache.step(at, FROM_ROW);
  for (const column in fromRow) {
    if (!Object.hasOwn(fromRow, column)) continue;
    at = cache.step(cache.step(at, column), fromRow[column]);
  }
  return at;
}

const INSERT = Symbol('insert');
const FROM_ROW = Symbol('fromRow');
