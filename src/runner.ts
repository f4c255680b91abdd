// The one seam between pgcoord and the drivers. Every feature takes a Runner and asks this file
// for a transaction; nothing else knows which driver it got.
//
// postgres.js 3.4.9 cannot be trusted with a connection that dies (porsager/postgres #1066, #1154,
// #1208, #1216): after a close, a statement sent through a `sql.begin` or `sql.reserve()` handle
// writes to a null socket (the process exits) or runs, outside any transaction, on the reconnected
// socket (a write of a "failed" transaction commits). So pgcoord never uses `sql.begin` for its own
// transactions: it reserves a connection, learns the driver's connection object from the
// `onexecute` hook of its own BEGIN, and sets that object's `onclose`, which the pool calls
// synchronously inside the socket's close handler, before any promise continuation. From then on
// the handle given to the callback refuses statements, and pgcoord never sends ROLLBACK, COMMIT or
// `release()` on it (the pool already took the dead connection back).

import {
  CommitUnknownError,
  ConnectionLostError,
  InvalidOptionError,
  isConnectFailure,
  isConnectionLost,
  UnsupportedRunnerError,
} from './errors.js';

/**
 * Anything pgcoord can run on: a postgres.js `sql` (pool) or transaction (`sql.begin` handle); a
 * node-postgres `Pool`, `Client` or `PoolClient`; a drizzle `db` or `tx` on either driver.
 * Given a pool, pgcoord opens its own transaction; given a transaction, it joins it.
 */
export type Runner = object;

/** A row as the drivers return it. */
export type Row = Record<string, unknown>;

/** One SQL statement with `$1`-style parameters. */
export interface Statement {
  text: string;
  params?: readonly unknown[];
}

/** Transaction isolation levels. */
export type Isolation = 'read committed' | 'repeatable read' | 'serializable';

/** Options for a transaction pgcoord opens itself (ignored when joining a caller's transaction). */
export interface TransactionOptions {
  isolation?: Isolation;
  readOnly?: boolean;
}

/** pgcoord's own view of the connection inside a transaction. */
export interface Conn {
  /**
   * Send statements back to back (one round trip where the driver pipelines) and return the rows
   * of each. All statements settle before this does; it rejects with the first error.
   * `signal` cancels the running statement on the server. `commit: true` (pgcoord's own
   * transaction only) sends COMMIT in the same round trip and ends the transaction; a connection
   * lost while that batch is in flight rejects with {@link CommitUnknownError}.
   */
  send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions): Promise<Row[][]>;
  /** Aborted (with a {@link ConnectionLostError}) the moment pgcoord sees the connection die. */
  readonly lost: AbortSignal;
  /** True when pgcoord opened this transaction (false when it joined the caller's). */
  readonly own: boolean;
  /**
   * Run `fn` under a savepoint: if it throws, everything it did (statements, locks, settings) is
   * rolled back and the transaction stays usable.
   */
  savepoint<T>(fn: (conn: Conn) => Promise<T>): Promise<T>;
  /**
   * True when statements issued without awaiting go out in order in one round trip (postgres.js,
   * pg in pipeline mode) and pgcoord owns the transaction: user statements may then be queued
   * behind pgcoord's own and still run after them.
   */
  readonly pipelines: boolean;
  /**
   * End pgcoord's own transaction: COMMIT goes out right behind `pending` (statements already
   * issued, in the same round trip where the driver pipelines). Settles like `send` with
   * `commit: true`.
   */
  commitAfter(pending: readonly PromiseLike<unknown>[]): Promise<unknown[]>;
}

/** Options of {@link Conn.send}. */
export interface SendOptions {
  commit?: boolean;
}

/** The state of pgcoord's own transaction on a connection. */
interface TxState {
  /** BEGIN has been sent. */
  sent: boolean;
  /** COMMIT has been sent with a batch: the transaction is over. */
  ended: boolean;
}

/** The transaction handed to pgcoord code: its own connection view and a way to call user code. */
export interface Scope<H> {
  conn: Conn;
  /** Run user code with the handle of the runner's own kind (postgres.js tx, pg client, drizzle tx). */
  call<T>(fn: (handle: H) => Promise<T> | T): Promise<T>;
}

type Fn = ((...args: unknown[]) => unknown) & Record<string, unknown>;
type AnyObj = Record<string, unknown>;

type Kind =
  | { kind: 'pgjs-pool'; sql: Fn; drizzle?: AnyObj }
  | { kind: 'pgjs-tx'; sql: Fn }
  | { kind: 'pg-pool'; pool: AnyObj; drizzle?: AnyObj }
  | { kind: 'pg-client'; client: AnyObj; drizzle?: AnyObj }
  | { kind: 'pg-in-tx'; client: AnyObj };

function isDrizzle(x: AnyObj): boolean {
  return typeof x.session === 'object' && x.session !== null && typeof x.dialect === 'object' && typeof x.select === 'function';
}

function classify(runner: unknown): Kind & { handle?: unknown } {
  if (runner === null || (typeof runner !== 'object' && typeof runner !== 'function')) {
    throw new UnsupportedRunnerError(
      `expected a postgres.js sql, a pg Pool/Client or a drizzle db/tx, got ${runner === null ? 'null' : typeof runner}`,
    );
  }
  const r = runner as AnyObj;
  const f = runner as Fn;
  if (isDrizzle(r)) {
    const client = (r.session as AnyObj).client as AnyObj | undefined;
    if (typeof r.rollback === 'function') {
      // a drizzle transaction: join it through its driver handle
      const inner = classify(client);
      if (inner.kind === 'pgjs-tx' || inner.kind === 'pg-in-tx') return { ...inner, handle: runner };
      if (inner.kind === 'pg-client') return { kind: 'pg-in-tx', client: inner.client, handle: runner };
      throw new UnsupportedRunnerError('drizzle transaction over an unknown driver');
    }
    const inner = classify(r.$client ?? client);
    if (inner.kind === 'pgjs-pool' || inner.kind === 'pg-pool' || inner.kind === 'pg-client') return { ...inner, drizzle: r };
    throw new UnsupportedRunnerError('drizzle database over an unknown driver');
  }
  if (typeof f === 'function' && typeof f.unsafe === 'function') {
    if (typeof f.savepoint === 'function') return { kind: 'pgjs-tx', sql: f };
    if (typeof f.begin === 'function' && typeof f.reserve === 'function') return { kind: 'pgjs-pool', sql: f };
    throw new UnsupportedRunnerError(
      'a reserved postgres.js connection is not a runner: pass the pool (sql) or a transaction (sql.begin handle)',
    );
  }
  if (typeof r.query === 'function') {
    if ('idleCount' in r && typeof r.connect === 'function') return { kind: 'pg-pool', pool: r };
    if (typeof r.getTransactionStatus === 'function' || '_txStatus' in r) {
      const status = typeof r.getTransactionStatus === 'function' ? (r.getTransactionStatus as () => unknown)() : r._txStatus;
      return status === 'T' || status === 'E' ? { kind: 'pg-in-tx', client: r } : { kind: 'pg-client', client: r };
    }
  }
  throw new UnsupportedRunnerError('expected a postgres.js sql, a pg Pool/Client or a drizzle db/tx');
}

/** Check a runner early (for constructors and CLI); throws {@link UnsupportedRunnerError}. */
export function assertRunner(runner: unknown): void {
  classify(runner);
}

/** What kind of runner this is, for messages and for features that need a pinned connection. */
export function runnerKind(runner: unknown): Kind['kind'] {
  return classify(runner).kind;
}

function beginText(opts: TransactionOptions): string {
  const isolation = opts.isolation;
  if (isolation !== undefined && !['read committed', 'repeatable read', 'serializable'].includes(isolation)) {
    throw new InvalidOptionError(
      `isolation must be 'read committed', 'repeatable read' or 'serializable', got ${JSON.stringify(isolation)}`,
    );
  }
  return `begin${isolation ? ` isolation level ${isolation}` : ''}${opts.readOnly ? ' read only' : ''}`;
}

/**
 * Run `body` inside a transaction on `runner`: pgcoord's own (BEGIN is sent with the first
 * statements, COMMIT after `body`, ROLLBACK on error) or the caller's (joined; nothing is
 * committed or rolled back here).
 */
export function inTransaction<H, T>(runner: Runner, opts: TransactionOptions, body: (scope: Scope<H>) => Promise<T>): Promise<T> {
  let k: ReturnType<typeof classify>;
  let begin: string;
  try {
    k = classify(runner);
    begin = beginText(opts);
  } catch (err) {
    return Promise.reject(err);
  }
  switch (k.kind) {
    case 'pgjs-tx':
      return body(joined(new PgjsConn(k.sql, false, unwatched), k.handle ?? k.sql));
    case 'pg-in-tx':
      return body(joined(pgConn(k.client, false, never), k.handle ?? k.client));
    case 'pgjs-pool':
      return pgjsOwn(k.sql, begin, k.drizzle, body as (s: Scope<unknown>) => Promise<T>);
    case 'pg-pool':
    case 'pg-client':
      return pgOwn(k, begin, body as (s: Scope<unknown>) => Promise<T>);
  }
}

/**
 * Run one data-modifying statement. On a pool (or a single client outside a transaction) it runs
 * in autocommit: one statement is atomic on its own, so it needs no BEGIN/COMMIT and no reserved
 * connection (one round trip). In a caller's transaction it joins it; with a `signal` there it runs
 * under a savepoint, so a cancel leaves the caller's transaction usable. An isolation level or
 * read-only option gets pgcoord's own transaction, as everywhere else.
 *
 * Outcomes of a lost connection: refused or timed out while connecting = nothing ran
 * ({@link ConnectionLostError}); lost while the statement was in flight = it may or may not have
 * committed ({@link CommitUnknownError}).
 */
export function runStatement(
  runner: Runner,
  statement: Statement,
  opts: TransactionOptions & { signal?: AbortSignal } = {},
  /** A read commits nothing: a connection lost under it is a plain ConnectionLostError. */
  reads = false,
): Promise<Row[]> {
  let k: ReturnType<typeof classify>;
  try {
    k = classify(runner);
    beginText(opts);
  } catch (err) {
    return Promise.reject(err);
  }
  const { signal } = opts;
  if (signal?.aborted) return Promise.reject(signal.reason);
  const params = (statement.params ?? []) as unknown[];
  const alone = opts.isolation === undefined && !opts.readOnly;
  let pending: Promise<Row[]> | undefined;
  let cancel: (() => void) | undefined;
  if (alone && k.kind === 'pgjs-pool') {
    const q = (k.sql.unsafe as Unsafe)(statement.text, params, prepared);
    if (signal) cancel = () => q.cancel();
    pending = q.execute();
  } else if (alone && (k.kind === 'pg-client' || (k.kind === 'pg-pool' && !signal))) {
    // (a pg Pool's query() hides its client, which a cancel needs: with a signal, the path below)
    const target = k.kind === 'pg-pool' ? k.pool : k.client;
    const query = target.query as (text: string, params: unknown[]) => Promise<{ rows: Row[] }>;
    if (k.kind === 'pg-client' && signal) cancel = () => void cancelPg(k.client);
    pending = query.call(target, statement.text, params).then((r) => r.rows);
  }
  if (!pending) {
    // a caller's transaction, or pgcoord's own for the options
    return inTransaction(runner, opts, async (scope) => {
      const run = async (c: Conn) => (await c.send([statement], signal))[0] ?? [];
      return signal && !scope.conn.own ? scope.conn.savepoint(run) : run(scope.conn);
    });
  }
  // (no signal: no closures to make, the common case)
  if (!signal || !cancel) return pending.then(undefined, reads ? readFailed : autocommitFailed);
  signal.addEventListener('abort', cancel, { once: true });
  const stop = () => signal.removeEventListener('abort', cancel);
  return pending.then(
    (rows) => {
      stop();
      return rows;
    },
    (err: unknown) => {
      stop();
      return reads ? readFailed(err) : autocommitFailed(err);
    },
  );
}

// The error of an autocommit statement, or of a read (which commits nothing: a connection lost
// under it is a plain ConnectionLostError). A refused connection is also "lost": it is told apart
// first (nothing was sent).
function readFailed(err: unknown): never {
  if (isConnectFailure(err)) throw noConnection(err);
  if (isConnectionLost(err)) throw new ConnectionLostError(undefined, { cause: err });
  throw err;
}

function autocommitFailed(err: unknown): never {
  if (isConnectFailure(err)) throw noConnection(err);
  if (isConnectionLost(err))
    throw new CommitUnknownError({
      cause: err,
      message: 'database connection lost while an autocommit statement was in flight: it may or may not have committed',
    });
  throw err;
}

// A postgres.js query not sent yet: `.execute()` queues it on its connection, in call order.
function isPgjsQuery(x: unknown): x is PromiseLike<unknown> & { execute(): unknown } {
  return (
    (typeof x === 'function' || (typeof x === 'object' && x !== null)) &&
    typeof (x as { execute?: unknown }).execute === 'function' &&
    typeof (x as { cancel?: unknown }).cancel === 'function'
  );
}

/**
 * The write half of a plan (`withLock`, `withRowLock`): `writes` are queries returned unawaited, in
 * an array (an array is not a thenable, so they stay unsent). In pgcoord's own transaction on
 * postgres.js they go out in call order with COMMIT right behind them, one round trip; elsewhere
 * they are awaited one by one (and the transaction ends as usual). Returns each write's result.
 */
export async function commitWith(conn: Conn, writes: unknown): Promise<unknown[]> {
  const list = writes ?? [];
  if (!Array.isArray(list)) throw new InvalidOptionError("a plan's write must return an array of unawaited queries (or nothing)");
  if (conn.pipelines && list.every(isPgjsQuery)) {
    for (const w of list) w.execute(); // queued in order, COMMIT right behind
    return conn.commitAfter(list);
  }
  const written: unknown[] = [];
  for (const w of list) written.push(await w);
  return written;
}

/** A lock, then the caller's work, in pgcoord's own transaction: see {@link pipelinedOnPgjs}. */
export interface Pipelined<H> {
  /** pgcoord's statements, sent right behind BEGIN (the lock, or the row lock that is also the read). */
  first: readonly Statement[];
  /** The caller's read, queued behind `first`. */
  read?: ((tx: H) => PromiseLike<unknown>) | undefined;
  /** Map a failure of `first` (typed lock errors). */
  failed(err: unknown): unknown;
  /**
   * The caller's work on the rows of `first` and the read (it may await, still in the transaction),
   * or {@link STOP} to do nothing (a try-lock that missed). With `writes`, it returns the writes to
   * send with COMMIT (as for {@link commitWith}) and the result is what they returned; otherwise
   * its own result is, and COMMIT follows.
   */
  decide(rows: Row[][], read: unknown, tx: H): unknown;
  writes: boolean;
}

/** Returned by {@link Pipelined.decide}: do nothing more, end the transaction (a try-lock that missed). */
export const STOP: unique symbol = Symbol('pgcoord.stop');

/** What a {@link Pipelined} run produced (null after {@link STOP}). */
export interface PipelinedResult {
  rows: Row[][];
  read: unknown;
  value: unknown;
}

/**
 * The hot path of the lock functions (`withLock`, `withRowLock`) on a plain postgres.js pool:
 * [BEGIN, ...first, read] in one round trip, then the caller's work, then [writes, COMMIT] (or
 * COMMIT). It is `inTransaction` + `send` + `commitWith` with the same connection, outcomes and
 * lifecycle (`finish`), minus the layers between them, which cost more client CPU than the SQL on
 * this path. Returns undefined for any other runner (a drizzle db, node-postgres, a caller's
 * transaction): callers then take the general path.
 */
export function pipelinedOnPgjs<H>(
  runner: Runner,
  opts: TransactionOptions,
  plan: Pipelined<H>,
): Promise<PipelinedResult | null> | undefined {
  let k: ReturnType<typeof classify>;
  let begin: string;
  try {
    k = classify(runner);
    begin = beginText(opts);
  } catch {
    return undefined; // the general path reports it
  }
  if (k.kind !== 'pgjs-pool' || k.drizzle) return undefined;
  return ownPgjs(k.sql, begin, (conn, pin) => runPipelined(conn, guardedHandle(pin, conn) as H, plan));
}

async function runPipelined<H>(conn: PgjsConn, handle: H, plan: Pipelined<H>): Promise<PipelinedResult | null> {
  const { read: reader } = plan;
  let rows: Row[][];
  try {
    // the read rides behind the locks, in the same batch: it runs on the server the moment they
    // are granted; when a lock fails the read fails too, and the lock's error comes first
    rows = await (reader ? conn.sendThen(plan.first, () => reader(handle)) : conn.send(plan.first));
  } catch (err) {
    throw plan.failed(err);
  }
  const read = reader ? rows.pop() : undefined;
  const out = await plan.decide(rows, read, handle);
  if (out === STOP) return null;
  return { rows, read, value: plan.writes ? await commitWith(conn, out) : out };
}

function joined<H>(conn: Conn, handle: unknown): Scope<H> {
  return { conn, call: async (fn) => fn(handle as H) };
}

let savepoints = 0;

// A savepoint in plain SQL. The SAVEPOINT statement rides in the same round trip as the first
// statements of `fn`.
async function sqlSavepoint<T>(conn: Conn, fn: (conn: Conn) => Promise<T>): Promise<T> {
  const name = `pgcoord_sp${++savepoints}`;
  let opened = false;
  const inner: Conn = {
    own: false,
    lost: conn.lost,
    pipelines: false,
    commitAfter: (pending) => Promise.all(pending),
    savepoint: (f) => sqlSavepoint(inner, f),
    async send(statements, signal) {
      if (opened) return conn.send(statements, signal);
      opened = true;
      return (await conn.send([{ text: `savepoint ${name}` }, ...statements], signal)).slice(1);
    },
  };
  try {
    const result = await fn(inner);
    if (opened) await conn.send([{ text: `release savepoint ${name}` }]);
    return result;
  } catch (err) {
    if (opened && !conn.lost.aborted) await conn.send([{ text: `rollback to savepoint ${name}` }, { text: `release savepoint ${name}` }]);
    throw err;
  }
}

// What pgcoord needs to know of a lost connection. Cheap to create (one per transaction): the
// AbortSignal, which costs more than the whole rest of a transaction's bookkeeping, is made only
// when somebody asks for it (`Conn.lost`), and batches wait on a plain list of waiters.
class Loss {
  aborted = false;
  reason: unknown = undefined;
  #controller: AbortController | undefined;
  #waiters: ((reason: unknown) => void)[] | undefined;
  /** `watched = false`: a connection pgcoord does not watch (a caller's transaction); never aborts. */
  constructor(readonly watched = true) {}

  get signal(): AbortSignal {
    if (!this.#controller) {
      this.#controller = new AbortController();
      if (this.aborted) this.#controller.abort(this.reason);
    }
    return this.#controller.signal;
  }

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    this.#controller?.abort(reason);
    if (this.#waiters) for (const reject of this.#waiters) reject(reason);
  }

  // Every query settled, or the connection lost first. postgres.js 3.4.9 drops, without settling
  // them, statements still queued on a reserved connection when it closes: never wait for a batch
  // past the moment the connection is lost. (Promise.allSettled raced against the loss, in one
  // promise instead of three: this runs twice per transaction.)
  all(queries: readonly PromiseLike<Row[]>[]): Promise<Batch> {
    if (this.aborted) return Promise.reject(this.reason);
    if (this.watched) this.#waiters ??= [];
    const waiters = this.#waiters;
    const batch: Batch = { rows: new Array(queries.length), failed: false, error: undefined, connectionLost: false };
    if (queries.length === 0) return Promise.resolve(batch);
    return new Promise((resolve, reject) => {
      let left = queries.length;
      const done = () => {
        if (--left > 0) return;
        const at = waiters?.indexOf(reject) ?? -1;
        if (at >= 0) waiters?.splice(at, 1);
        resolve(batch);
      };
      waiters?.push(reject);
      for (let i = 0; i < queries.length; i++)
        (queries[i] as PromiseLike<Row[]>).then(
          (value) => {
            batch.rows[i] = value;
            done();
          },
          (reason: unknown) => {
            fail(batch, reason);
            done();
          },
        );
    });
  }
}

const unwatched = new Loss(false);
const never = unwatched.signal;

/** A batch once every statement settled: the rows of each, or the first failure. */
interface Batch {
  rows: Row[][];
  failed: boolean;
  error: unknown;
  /** Some statement failed because the connection was lost. */
  connectionLost: boolean;
}

function batchOf(results: readonly PromiseSettledResult<Row[]>[]): Batch {
  const batch: Batch = { rows: [], failed: false, error: undefined, connectionLost: false };
  results.forEach((r, i) => {
    if (r.status === 'fulfilled') batch.rows[i] = r.value;
    else fail(batch, r.reason);
  });
  return batch;
}

// Record a failed statement: the first failure is the batch's error.
function fail(batch: Batch, reason: unknown): void {
  if (!batch.failed) {
    batch.failed = true;
    batch.error = reason;
  }
  if (isConnectionLost(reason)) batch.connectionLost = true;
}

// The rows of a batch, or its error. With COMMIT in the batch, a lost connection means the commit's
// fate is unknown (the statements may have run and committed with only the answers lost).
function settle(batch: Batch, lost: { aborted: boolean; reason: unknown }, committing: boolean): Row[][] {
  if (batch.failed) {
    if (committing && (lost.aborted || batch.connectionLost)) throw new CommitUnknownError({ cause: batch.error });
    throw lost.aborted && isConnectionLost(batch.error) ? lost.reason : batch.error;
  }
  return batch.rows;
}

// Getting a connection failed: a server that is down or restarting is reported as the same typed
// ConnectionLostError as a connection that dies mid-transaction (nothing ran).
function noConnection(err: unknown): unknown {
  return isConnectionLost(err) ? new ConnectionLostError('could not get a database connection; nothing was run', { cause: err }) : err;
}

async function checkout<C>(pending: Promise<C>): Promise<C> {
  try {
    return await pending;
  } catch (err) {
    throw noConnection(err);
  }
}

// ---------------------------------------------------------------- postgres.js

interface Reservation {
  ms: number;
  deadline: number;
  late: boolean;
  reject(err: unknown): void;
}

// postgres.js 3.4.9 can lose a reservation request when its connection attempt fails (seen after a
// server restart): the promise never settles. Bound the wait by the pool's own connect_timeout
// (default 30 s); a reservation that arrives after that is handed straight back.
function pinPgjs(sql: Fn): Promise<PgjsPin> {
  const seconds = Number((sql.options as { connect_timeout?: unknown } | undefined)?.connect_timeout ?? 30);
  const ms = Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 30_000;
  const pending = (sql.reserve as () => Promise<Fn>)();
  return new Promise<PgjsPin>((resolve, reject) => {
    const entry: Reservation = { ms, deadline: performance.now() + ms, late: false, reject };
    watch(entry);
    pending.then(
      (reserved) => {
        reservations.delete(entry);
        if (entry.late) (reserved.release as () => void)();
        else resolve(new PgjsPin(sql, reserved));
      },
      (err: unknown) => {
        reservations.delete(entry);
        reject(noConnection(err));
      },
    );
  });
}

// One coarse (1 s) watchdog for all pending reservations instead of a timer per transaction.
const reservations = new Set<Reservation>();
let watchdog: NodeJS.Timeout | undefined;
function watch(entry: Reservation): void {
  reservations.add(entry);
  if (watchdog) return;
  watchdog = setInterval(() => {
    const now = performance.now();
    for (const r of reservations) {
      if (r.deadline > now) continue;
      reservations.delete(r);
      r.late = true;
      r.reject(new ConnectionLostError(`no database connection within ${r.ms} ms (connect_timeout); nothing was run`));
    }
    if (reservations.size === 0) {
      clearInterval(watchdog);
      watchdog = undefined;
    }
  }, 1000);
  watchdog.unref();
}

const prepared = { prepare: true };

interface PgjsQuery extends Promise<Row[]> {
  execute(): PgjsQuery;
  cancel(): void;
  /** Set by postgres.js when the query is sent: the backend's pid and cancel key. */
  state?: { pid: number | null };
}

type Unsafe = (text: string, params?: unknown[], options?: object) => PgjsQuery;

interface PgjsConnection {
  id: number;
  onclose: ((err: unknown) => void) | null;
}

const noop = () => {};

/**
 * A reserved postgres.js connection whose death pgcoord observes. The first statement must be
 * sent through `capture()` (parameterless, so postgres.js calls `onexecute` for it).
 */
class PgjsPin {
  readonly loss = new Loss();
  released = false;
  #connection: PgjsConnection | undefined;
  #captured: PgjsQuery | undefined;
  // Called by the pool synchronously inside the socket's close handler, before any continuation.
  readonly #onclose = (err: unknown) => this.loss.abort(new ConnectionLostError(undefined, { cause: err }));

  constructor(
    readonly pool: Fn,
    readonly raw: Fn,
  ) {}

  // On a freshly reserved connection nothing is in flight, so postgres.js always calls onexecute
  // for this first statement (it skips it only past its pipeline limit, #1189).
  capture(text: string): PgjsQuery {
    const onexecute = (c: PgjsConnection) => {
      this.#connection = c;
      c.onclose = this.#onclose;
      return true; // "ready for more": lets the next statements pipeline behind this one
    };
    this.#captured = (this.raw.unsafe as Unsafe)(text, [], { onexecute });
    return this.#captured;
  }

  /** Refuse a statement on a handle whose connection is lost or given back. */
  check(): void {
    if (this.loss.aborted) throw this.loss.reason;
    if (this.released) throw new ConnectionLostError('this pgcoord transaction handle is no longer usable: its transaction has ended');
  }

  /** Give the connection back to the pool, or (`poisoned`) end its session: it may still hold something. */
  release(poisoned = false): void {
    if (this.released) return;
    this.released = true;
    if (this.loss.aborted) return; // the pool already took the dead connection back
    const pid = this.#captured?.state?.pid;
    if (poisoned && pid) {
      // Never back to the pool: another connection ends this backend's session (releasing
      // whatever it holds) while it is idle, and the pool sees an ordinary close. Not the
      // driver's terminate() (postgres.js 3.4.9's pool then keeps a slot that never serves
      // again), and not a self-kill (its FATAL error is carried into the next connection).
      (this.pool.unsafe as Unsafe)('select pg_terminate_backend($1)', [pid]).catch(noop);
      return;
    }
    if (this.#connection?.onclose === this.#onclose) this.#connection.onclose = null;
    (this.raw.release as () => void)();
  }
}

/**
 * pgcoord's view of a postgres.js connection: pgcoord's own transaction on a pin (`own`, BEGIN sent
 * lazily with the first statements), a caller's transaction (joined), or a pinned connection
 * outside any transaction (session locks).
 */
class PgjsConn implements Conn, TxState {
  sent = false;
  ended = false;

  constructor(
    readonly sql: Fn,
    readonly own: boolean,
    readonly loss: Loss,
    readonly pin?: PgjsPin,
    readonly beginText?: string,
  ) {}

  get lost(): AbortSignal {
    return this.loss.signal;
  }

  get pipelines(): boolean {
    return this.own;
  }

  // BEGIN, issued (not awaited) at most once: the statement issued right after it shares its round
  // trip. Used by send() and, lazily, by the user's handle on its first statement.
  begin(): PgjsQuery | undefined {
    if (!this.pin || this.beginText === undefined || this.sent) return undefined;
    this.sent = true;
    return this.pin.capture(this.beginText).execute();
  }

  // In a caller's sql.begin, postgres.js remembers any failed statement and rethrows it when the
  // callback ends, even if it was handled: a recoverable failure must go through its savepoint().
  savepoint<T>(fn: (conn: Conn) => Promise<T>): Promise<T> {
    if (typeof this.sql.savepoint === 'function' && !this.own) {
      return (this.sql.savepoint as (f: (sp: Fn) => Promise<T>) => Promise<T>)((sp) => fn(new PgjsConn(sp, false, this.loss)));
    }
    return sqlSavepoint(this, fn);
  }

  commitAfter(pending: readonly PromiseLike<unknown>[]): Promise<unknown[]> {
    if (!this.own) return Promise.all(pending);
    if (this.loss.aborted) return Promise.reject(this.loss.reason);
    this.ended = true;
    const queries = [...(pending as Promise<Row[]>[]), (this.sql.unsafe as Unsafe)('commit', [], prepared).execute()];
    return this.#settle(queries, true, 0, queries.length - 1);
  }

  /**
   * `send(statements)` with the caller's statement, issued by `then` behind them, in the same round
   * trip and settled in the same batch (no await in between): the rows of each statement, then the
   * caller's result, last.
   */
  sendThen(statements: readonly Statement[], then: () => PromiseLike<unknown>): Promise<Row[][]> {
    if (this.loss.aborted) return Promise.reject(this.loss.reason);
    if (this.ended) return Promise.reject(new ConnectionLostError('this transaction has already committed'));
    const queries: PromiseLike<Row[]>[] = this.#issue(statements);
    const skip = queries.length - statements.length;
    try {
      queries.push(then() as PromiseLike<Row[]>);
    } catch (err) {
      for (const q of queries) q.then(undefined, noop); // their outcome no longer matters
      return Promise.reject(err);
    }
    return this.#settle(queries, false, skip, queries.length);
  }

  send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions): Promise<Row[][]> {
    if (this.loss.aborted) return Promise.reject(this.loss.reason);
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.ended) return Promise.reject(new ConnectionLostError('this transaction has already committed'));
    const queries = this.#issue(statements);
    const skip = queries.length - statements.length;
    const committing = this.own && options?.commit === true;
    if (committing) {
      this.ended = true;
      queries.push((this.sql.unsafe as Unsafe)('commit', [], prepared).execute());
    }
    const end = skip + statements.length;
    if (!signal) return this.#settle(queries, committing, skip, end);
    // Cancel only the earliest statement still running or queued: a Postgres cancel hits whatever
    // the backend runs when it arrives, so cancelling later (fast) statements of the pipeline could
    // land on the next unrelated statement. Once the blocking one fails, the transaction is
    // aborted and the rest fail fast.
    const settled = new Set<PgjsQuery>();
    for (const q of queries)
      q.then(
        () => settled.add(q),
        () => settled.add(q),
      );
    const cancel = () => {
      queries.find((q) => !settled.has(q))?.cancel();
    };
    signal.addEventListener('abort', cancel, { once: true });
    return this.#settle(queries, committing, skip, end).finally(() => signal.removeEventListener('abort', cancel));
  }

  // BEGIN when not sent yet, then `statements`, issued without awaiting in between: postgres.js
  // writes them in one packet (pipelined). Prepared (unless the pool says `prepare: false`, e.g.
  // behind PgBouncer): an unprepared statement with parameters costs postgres.js a Describe round
  // trip first and stops the pipeline behind it; a prepared one is described once per connection.
  #issue(statements: readonly Statement[]): PgjsQuery[] {
    const queries: PgjsQuery[] = [];
    const first = this.begin();
    if (first) queries.push(first);
    const unsafe = this.sql.unsafe as Unsafe;
    for (const s of statements) queries.push(unsafe(s.text, (s.params ?? []) as unknown[], prepared).execute());
    return queries;
  }

  // The rows of queries[from, to), once all have settled; or the lost-connection outcome if the
  // connection dies first (CommitUnknownError when COMMIT was in the batch).
  #settle(queries: readonly PromiseLike<Row[]>[], committing: boolean, from: number, to: number): Promise<Row[][]> {
    return this.loss.all(queries).then(
      (batch) => {
        const rows = settle(batch, this.loss, committing);
        return from === 0 && to === rows.length ? rows : rows.slice(from, to);
      },
      (err: unknown) => {
        for (const q of queries) q.then(undefined, noop);
        throw committing ? new CommitUnknownError({ cause: err }) : err;
      },
    );
  }
}

// The handle a postgres.js caller gets inside pgcoord's own transaction: the reserved connection,
// refusing statements once the connection is lost or the transaction is over, sending BEGIN ahead
// of the first statement, without release(), and with a `savepoint()` like an `sql.begin` handle's.
// A plain function with the reserved handle's members (types typed unsafe notify array json file),
// made once per transaction and only when user code runs.
function guardedHandle(pin: PgjsPin, conn: PgjsConn): Fn {
  const raw = pin.raw;
  const before = () => {
    pin.check();
    if (conn.ended) throw new ConnectionLostError('this transaction has already committed');
    // its failure (a lost connection) surfaces on the user's statement behind it
    conn.begin()?.catch(noop);
  };
  const guarded = (send: unknown) =>
    typeof send === 'function'
      ? (...args: unknown[]) => {
          before();
          return (send as Fn).apply(raw, args);
        }
      : send;
  const handle = ((...args: unknown[]) => {
    before();
    return raw(...args);
  }) as Fn;
  // Named stores in one order: every handle takes the same cached transitions (a keyed store per
  // member in a loop costs V8 a megamorphic lookup and a runtime call each).
  handle.types = raw.types;
  handle.typed = raw.typed;
  handle.unsafe = guarded(raw.unsafe);
  handle.notify = guarded(raw.notify);
  handle.array = raw.array;
  handle.json = raw.json;
  handle.file = guarded(raw.file);
  handle.savepoint = savepointOn(handle, conn);
  // anything else a postgres.js version adds: a value builder, passed as it is
  for (const key in raw) if (key !== 'release' && !(key in handle)) handle[key] = raw[key];
  return handle;
}

// pgcoord's own transaction on a freshly pinned postgres.js connection: `work` runs in it, and
// finish() commits or rolls back and gives the connection back (or drops it).
function ownPgjs<T>(sql: Fn, begin: string, work: (conn: PgjsConn, pin: PgjsPin) => Promise<T>): Promise<T> {
  return pinPgjs(sql).then((pin) => {
    const conn = new PgjsConn(pin.raw, true, pin.loss, pin, begin);
    return finish(
      conn,
      pin.loss,
      () => work(conn, pin),
      (text) => (pin.raw.unsafe as Unsafe)(text),
      (poisoned) => pin.release(poisoned),
    );
  });
}

function pgjsOwn<T>(sql: Fn, begin: string, drizzleDb: AnyObj | undefined, body: (s: Scope<unknown>) => Promise<T>): Promise<T> {
  return ownPgjs(sql, begin, (conn, pin) => {
    let handle: Fn | undefined;
    const scope: Scope<unknown> = {
      conn,
      call: (fn) => {
        handle ??= guardedHandle(pin, conn);
        if (drizzleDb) return drizzlePgjsTx(drizzleDb, handle, fn);
        let r: unknown;
        try {
          r = fn(handle);
        } catch (err) {
          return Promise.reject(err);
        }
        // a postgres.js query is a Promise already: wrapping it would cost a thenable job and a .then
        return (r instanceof Promise ? r : Promise.resolve(r)) as Promise<never>;
      },
    };
    return body(scope);
  });
}

// `savepoint()` for the handle a postgres.js caller gets inside pgcoord's transaction, so it reads
// like an `sql.begin` handle.
function savepointOn(handle: Fn, conn: Conn) {
  let n = 0;
  return async (nameOrFn: unknown, maybeFn?: unknown) => {
    const fn = (typeof nameOrFn === 'function' ? nameOrFn : maybeFn) as (h: Fn) => unknown;
    const name = `pgcoord_sp${++n}`;
    await conn.send([{ text: `savepoint ${name}` }]);
    try {
      const result = await fn(handle);
      await conn.send([{ text: `release savepoint ${name}` }]);
      return result;
    } catch (err) {
      if (!conn.lost.aborted) await conn.send([{ text: `rollback to savepoint ${name}` }]);
      throw err;
    }
  };
}

// A drizzle tx over pgcoord's own postgres.js transaction. drizzle's PostgresJsSession.transaction
// calls `this.client.begin(cb)` and builds the tx from the handle cb receives; a session whose
// client "begins" by handing over our already-open transaction gives a real drizzle tx, with the
// user's schema, casing and logger, and no second BEGIN.
function drizzlePgjsTx<T>(db: AnyObj, handle: Fn, fn: (tx: unknown) => T | Promise<T>): Promise<T> {
  const session = Object.create(db.session as object) as AnyObj;
  const begin = async (cb: (h: Fn) => unknown) => cb(handle);
  session.client = new Proxy(handle, {
    get: (target, prop) => (prop === 'begin' ? begin : Reflect.get(target, prop)),
  });
  return (session.transaction as (cb: (tx: unknown) => Promise<T>) => Promise<T>)(async (tx) => fn(tx));
}

// ---------------------------------------------------------------- node-postgres

function pgConn(client: AnyObj, own: boolean, lost: AbortSignal, first?: string): Conn & TxState {
  const query = client.query as (text: string, params?: unknown[]) => Promise<{ rows: Row[] }>;
  const conn: Conn & TxState = {
    own,
    lost,
    sent: false,
    ended: false,
    pipelines: own && Boolean(client.pipeline),
    savepoint: (fn) => sqlSavepoint(conn, fn),
    async commitAfter(pending) {
      const values = await Promise.all(pending); // a failure leaves the transaction to finish()'s ROLLBACK
      if (own) await conn.send([], undefined, { commit: true });
      return values;
    },
    async send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions) {
      if (lost.aborted) throw lost.reason;
      if (signal?.aborted) throw signal.reason;
      if (conn.ended) throw new ConnectionLostError('this transaction has already committed');
      const skip = first && !conn.sent ? 1 : 0;
      const committing = own && options?.commit === true;
      const all = [...(skip ? [{ text: first as string }] : []), ...statements, ...(committing ? [{ text: 'commit' }] : [])];
      conn.sent = true;
      const run = (s: Statement) => query.call(client, s.text, s.params as unknown[] | undefined).then((r) => r.rows);
      const cancel = () => void cancelPg(client);
      signal?.addEventListener('abort', cancel, { once: true });
      try {
        // A client created with `pipeline: true` pipelines statements issued without awaiting;
        // otherwise pg wants one at a time (it deprecates queueing) and stops at the first error,
        // in which case COMMIT was never sent and the transaction is still open.
        const results = client.pipeline ? await Promise.allSettled(all.map(run)) : await sequential(all, run);
        if (committing) conn.ended = results.length === all.length;
        return settle(batchOf(results), lost, conn.ended).slice(skip, skip + statements.length);
      } finally {
        signal?.removeEventListener('abort', cancel);
      }
    },
  };
  return conn;
}

async function sequential<S, R>(items: readonly S[], fn: (s: S) => Promise<R>): Promise<PromiseSettledResult<R>[]> {
  const out: PromiseSettledResult<R>[] = [];
  for (const item of items) {
    try {
      out.push({ status: 'fulfilled', value: await fn(item) });
    } catch (reason) {
      out.push({ status: 'rejected', reason });
      break;
    }
  }
  return out;
}

// node-postgres has no cancel on the client itself: a second connection sends the CancelRequest
// for the running query (its backend pid and secret key), as pg's own Client#cancel does.
export async function cancelPg(client: AnyObj): Promise<void> {
  const active = client.activeQuery;
  if (!active) return;
  const Ctor = client.constructor as new (config: unknown) => AnyObj;
  const canceller = new Ctor(client.connectionParameters);
  (canceller.on as (e: string, f: () => void) => void)('error', () => {});
  (canceller.cancel as (c: unknown, q: unknown) => void)(client, active);
  setTimeout(() => (canceller.connection as { end(): void } | undefined)?.end(), 2000).unref();
}

// Watch a pg client pgcoord uses: 'error' / 'end' abort `lost` (pg emits 'error' on an idle client
// whose connection dies; without a listener Node would throw). `release` stops watching and, for a
// pooled client, gives it back, or destroys it when it failed or may still hold something.
function watchPg(client: AnyObj, pooled: boolean): { lost: AbortSignal; release(poisoned?: boolean): void } {
  const controller = new AbortController();
  const onError = (err?: unknown) => controller.abort(new ConnectionLostError(undefined, { cause: err }));
  const on = client.on as (e: string, f: (err?: unknown) => void) => void;
  const off = client.off as (e: string, f: (err?: unknown) => void) => void;
  on.call(client, 'error', onError);
  on.call(client, 'end', onError);
  let released = false;
  return {
    lost: controller.signal,
    release(poisoned = false) {
      if (released) return;
      released = true;
      off.call(client, 'error', onError);
      off.call(client, 'end', onError);
      if (!pooled) return; // a client of the caller's: not ours to give back or close
      const drop = poisoned || controller.signal.aborted;
      (client.release as (e?: unknown) => void)(drop ? new Error('pgcoord: connection dropped') : undefined);
    },
  };
}

async function pgOwn<T>(k: Kind & { kind: 'pg-pool' | 'pg-client' }, begin: string, body: (s: Scope<unknown>) => Promise<T>): Promise<T> {
  const pooled = k.kind === 'pg-pool';
  const client = pooled ? await checkout((k.pool.connect as () => Promise<AnyObj>).call(k.pool)) : k.client;
  const watched = watchPg(client, pooled);
  const conn = pgConn(client, true, watched.lost, begin);
  const scope: Scope<unknown> = {
    conn,
    call: async (fn) => {
      // node-postgres cannot pipeline BEGIN with the user's first statement: send it now.
      if (!conn.sent) await conn.send([]);
      return k.drizzle ? drizzlePgTx(k.drizzle, client, fn) : fn(client);
    },
  };
  const query = client.query as (text: string) => Promise<unknown>;
  return finish(
    conn,
    watched.lost,
    () => body(scope),
    (text) => query.call(client, text),
    watched.release,
  );
}

async function drizzlePgTx<T>(db: AnyObj, client: AnyObj, fn: (tx: unknown) => T | Promise<T>): Promise<T> {
  const { NodePgSession, NodePgTransaction } = (await import('drizzle-orm/node-postgres')) as unknown as Record<
    string,
    new (
      ...a: unknown[]
    ) => unknown
  >;
  const schema = (db._ as AnyObj | undefined)?.schema;
  const session = new (NodePgSession as new (...a: unknown[]) => unknown)(client, db.dialect, schema, (db.session as AnyObj).options);
  const tx = new (NodePgTransaction as new (...a: unknown[]) => unknown)(db.dialect, session, schema);
  return fn(tx);
}

// ---------------------------------------------------------------- shared lifecycle

// Commit or roll back pgcoord's own transaction. Never a statement on a connection known to be
// dead; a commit whose answer is lost with the connection is reported as unknown, not as failed.
// `lost` is the connection's loss state as the caller holds it (a postgres.js pin's Loss, read
// without making its AbortSignal: an AbortController per transaction costs microseconds).
async function finish<T>(
  conn: Conn & TxState,
  lost: { readonly aborted: boolean; readonly reason: unknown },
  work: () => Promise<T>,
  run: (text: string) => Promise<unknown>,
  release: (poisoned: boolean) => void,
): Promise<T> {
  let result: T;
  try {
    result = await work(); // called in here: a synchronous throw still ends the transaction
  } catch (err) {
    if (err instanceof CommitUnknownError) {
      release(true);
      throw err;
    }
    // A dead connection is never written to again: no ROLLBACK (the server rolls back when the
    // session ends), and the connection is dropped, not returned to the pool.
    if (lost.aborted || isConnectionLost(err)) {
      release(true);
      throw lost.aborted ? lost.reason : new ConnectionLostError(undefined, { cause: err });
    }
    let poisoned = false;
    if (conn.sent && !conn.ended) {
      try {
        await run('rollback');
      } catch {
        poisoned = true; // the rollback's fate is unknown: drop the connection rather than reuse it
      }
    }
    release(poisoned);
    throw err;
  }
  if (!conn.sent || conn.ended) {
    release(false);
    return result;
  }
  if (lost.aborted) {
    release(true);
    throw lost.reason;
  }
  try {
    await run('commit');
  } catch (err) {
    if (isConnectionLost(err) || lost.aborted) {
      release(true);
      throw new CommitUnknownError({ cause: err });
    }
    release(false); // a deferred constraint or serialization failure at COMMIT: rolled back, connection fine
    throw err;
  }
  release(false);
  return result;
}

// ---------------------------------------------------------------- pinned connections

/** A connection taken out of the pool for work that outlives a transaction (session locks). */
export interface PinnedConn {
  /** Statements outside any transaction (autocommit), pipelined where the driver can. */
  conn: Conn;
  /** Backend pid seen when the connection was pinned. */
  pid: number;
  /** Aborted the moment pgcoord sees the connection die. */
  lost: AbortSignal;
  /** Give the connection back; `poisoned` closes it instead (it may still hold something). */
  release(poisoned?: boolean): void;
}

/**
 * Pin one connection of a pool (postgres.js `sql`, pg `Pool`, or a drizzle db over either) and
 * learn its backend pid. Transactions and single clients are refused: pinning needs a pool.
 */
export async function pinConnection(runner: Runner): Promise<PinnedConn> {
  const k = classify(runner);
  if (k.kind === 'pgjs-pool') {
    const pin = await pinPgjs(k.sql);
    const [row] = (await pin.capture('select pg_backend_pid()::int as pid')) as Row[];
    return { conn: new PgjsConn(pin.raw, false, pin.loss), pid: Number(row?.pid), lost: pin.loss.signal, release: (p) => pin.release(p) };
  }
  if (k.kind === 'pg-pool') {
    const client = await checkout((k.pool.connect as () => Promise<AnyObj>).call(k.pool));
    const { lost, release } = watchPg(client, true);
    const conn = pgConn(client, false, lost);
    try {
      const [[row]] = (await conn.send([{ text: 'select pg_backend_pid()::int as pid' }])) as [Row[]];
      return { conn, pid: Number(row?.pid), lost, release };
    } catch (err) {
      release(true);
      throw err;
    }
  }
  throw new UnsupportedRunnerError(
    'session locks pin their own connection: pass a pool (postgres.js sql, pg Pool or a drizzle db), not a transaction or a single client',
  );
}
