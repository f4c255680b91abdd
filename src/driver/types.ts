// The driver seam: what every pgcoord feature may ask of a database connection, whatever the driver.
// One adapter per driver implements it (postgres-js.ts with postgres-js-3.ts / postgres-js-4.ts,
// node-postgres.ts, and drizzle.ts over either); detect.ts picks the adapter from the instance.
// No feature file names a driver, and no feature file decides where a savepoint goes: it asks
// `conn.attempt()`.

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

/** Options of {@link Conn.send}. */
export interface SendOptions {
  /** pgcoord's own transaction only: COMMIT goes out in the same batch and ends the transaction. */
  commit?: boolean;
}

/** pgcoord's view of the connection inside a transaction (its own or a caller's). */
export interface Conn {
  /**
   * Send statements back to back (one round trip where the driver pipelines) and return the rows
   * of each. All statements settle before this does; it rejects with the first error. `signal`
   * cancels the statement that is running when it fires, and only that one. With `commit`,
   * a connection lost while the batch is in flight rejects with CommitUnknownError.
   */
  send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions): Promise<Row[][]>;
  /**
   * `send(statements)`, then the caller's statement issued by `then` right behind them (same round
   * trip where the driver pipelines, else after they succeed): the rows of each statement, then
   * the caller's result, last.
   */
  sendThen(statements: readonly Statement[], then: () => PromiseLike<unknown>, signal?: AbortSignal): Promise<unknown[]>;
  /** Aborted (with a ConnectionLostError) the moment pgcoord sees the connection die. */
  readonly lost: AbortSignal;
  /** True when pgcoord opened this transaction (false when it joined the caller's). */
  readonly own: boolean;
  /**
   * Run a step that may fail on purpose (a lock timeout, a miss, an abort) so that its failure
   * leaves the transaction usable: in a caller's transaction under a savepoint (the driver's own
   * where it has one), in pgcoord's own transaction as it is (a failure rolls all of it back).
   * An already-aborted `signal` rejects before anything is sent.
   */
  attempt<T>(fn: (conn: Conn) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * True when statements issued without awaiting go out in order in one round trip and pgcoord
   * owns the transaction: the caller's statements may be queued behind pgcoord's own.
   */
  readonly pipelines: boolean;
  /**
   * End pgcoord's own transaction with COMMIT right behind `pending` (statements already issued,
   * in the same round trip where the driver pipelines). Settles like `send` with `commit`.
   * In a caller's transaction it only waits for `pending`.
   */
  commitAfter(pending: readonly PromiseLike<unknown>[]): Promise<unknown[]>;
}

/** The transaction handed to a feature: its connection view and a way to call user code. */
export interface Scope<H> {
  conn: Conn;
  /** Run user code with the handle of the runner's own kind (postgres.js tx, pg client, drizzle tx). */
  call<T>(fn: (handle: H) => Promise<T> | T): Promise<T>;
  /**
   * {@link Conn.attempt} for a step that also runs statements through the handle (a drizzle
   * query): in a caller's transaction the step gets a scope inside the savepoint (drizzle's nested
   * transaction for a drizzle tx, `sql.savepoint()` for postgres.js).
   */
  attempt<T>(fn: (scope: Scope<H>) => Promise<T>, signal?: AbortSignal): Promise<T>;
}

/** A connection taken out of the pool for work that outlives a transaction (session locks). */
export interface PinnedConn {
  /** Statements outside any transaction (autocommit), pipelined where the driver can. */
  conn: Conn;
  /** Backend pid seen when the connection was pinned. */
  pid: number;
  /** Aborted the moment pgcoord sees the connection die. */
  lost: AbortSignal;
  /** Give the connection back; `poisoned` ends its session instead (it may still hold something). */
  release(poisoned?: boolean): void;
}

/** What one driver does for pgcoord. Made by detect.ts from the runner the caller passed. */
export interface Adapter {
  /** For messages: 'postgres.js 4', 'node-postgres', ... */
  readonly name: string;
  /**
   * Run `body` in a transaction: pgcoord's own (BEGIN with the first statements, COMMIT after
   * `body`, ROLLBACK on error) or the caller's (joined: nothing committed or rolled back here).
   * `signal` bounds the wait for a pool connection.
   */
  transaction<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * `transaction` on a pool whose connection is reserved only when the first statement is sent
   * (through the scope's conn or the handle `call` gives): work that awaits something else first
   * (a payment gateway) holds no pooled connection meanwhile. Absent where the runner has no pool.
   */
  lazyTransaction?<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * One statement on its own, in autocommit where the runner is a pool or an idle client (one round
   * trip, no reserved connection). Returns undefined (or is absent) when the statement must take
   * the transaction path instead: the runner is a transaction, or is busy with one.
   */
  autocommit?(statement: Statement, signal: AbortSignal | undefined): Promise<Row[]> | undefined;
  /** Pin one connection of a pool; undefined when the runner cannot give one (a transaction). */
  pin?(signal?: AbortSignal): Promise<PinnedConn>;
  /**
   * LISTEN on `channel` on a connection of the listener's own (not one of the pool's): `onPayload`
   * gets each notification's payload. Resolves once the server confirmed the LISTEN. `onLost` is
   * called when that connection went away and notifications may have been missed (a driver that
   * listens anew by itself calls it after each reconnect). Absent where the runner has no pool.
   */
  listen?(channel: string, onPayload: (payload: string) => void, onLost: () => void): Promise<Listening>;
}

/** A LISTEN in place; `close()` ends it and its connection. */
export interface Listening {
  close(): Promise<void>;
}
