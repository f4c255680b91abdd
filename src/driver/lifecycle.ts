// What every adapter shares: the loss state of a connection, how a batch of statements settles,
// the commit/rollback of pgcoord's own transaction, and savepoints in plain SQL.

import {
  AbortedError,
  CommitUnknownError,
  ConnectionLostError,
  InvalidOptionError,
  isConnectFailure,
  isConnectionLost,
  sqlState,
} from '../errors.js';
import type { Conn, Row, Scope, Statement } from './types.js';

export const noop = () => {};

/**
 * What pgcoord knows of a connection's death. Cheap to create (one per transaction): the
 * AbortSignal is made only when somebody asks for it, and batches wait on a plain list.
 */
export class Loss {
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
    if (this.aborted || !this.watched) return;
    this.aborted = true;
    this.reason = reason;
    this.#controller?.abort(reason);
    if (this.#waiters) for (const reject of this.#waiters) reject(reason);
  }

  /**
   * Every query settled, or the connection lost first. Some drivers (postgres.js 3.4) drop,
   * without settling them, statements still queued on a connection when it closes: never wait
   * for a batch past the moment the connection is lost.
   */
  all(queries: readonly PromiseLike<unknown>[]): Promise<Batch> {
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
        (queries[i] as PromiseLike<unknown>).then(
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

/** A connection nobody watches (a caller's transaction, where the caller owns the connection). */
export const unwatched = new Loss(false);

/** A batch once every statement settled: the result of each, or the first failure. */
export interface Batch {
  rows: unknown[];
  failed: boolean;
  error: unknown;
  /** Some statement failed because the connection was lost. */
  connectionLost: boolean;
}

export function batchOf(results: readonly PromiseSettledResult<unknown>[]): Batch {
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

/**
 * The rows of a batch, or its error. With COMMIT in the batch, a lost connection means the
 * commit's fate is unknown (the statements may have run and committed with only the answers lost).
 * Without it, a lost connection is a plain ConnectionLostError: nothing committed.
 */
export function settle(batch: Batch, lost: Loss, committing: boolean): unknown[] {
  if (batch.failed) {
    const gone = lost.aborted || batch.connectionLost;
    if (committing && gone) throw new CommitUnknownError({ cause: batch.error });
    if (gone) throw lost.aborted ? lost.reason : new ConnectionLostError(undefined, { cause: batch.error });
    throw batch.error;
  }
  return batch.rows;
}

/**
 * How long a batch may go unanswered after its signal aborted (the cancel sent) before pgcoord
 * presumes the server unreachable (a network partition: no answer, no reset) and drops the
 * connection. Dropping is safe: pgcoord sends COMMIT only after every statement of the transaction
 * answered, so a transaction whose answers never came cannot commit; the caller gets a typed loss
 * instead of a wait as long as the partition.
 */
export const GIVE_UP_AFTER_CANCEL_MS = 3000;

/** Getting a connection failed: nothing ran. A server that is down or full is a ConnectionLostError. */
export function noConnection(err: unknown): unknown {
  if (err instanceof AbortedError || err instanceof ConnectionLostError) return err;
  return isConnectFailure(err) || isConnectionLost(err)
    ? new ConnectionLostError(`could not get a database connection (${causeText(err)}); nothing was run`, { cause: err })
    : err;
}

// What went wrong, in a few words: the driver's message names the host and port for a refused or
// timed-out connect (`connect ECONNREFUSED 127.0.0.1:5433`); else the code.
function causeText(err: unknown): string {
  const e = err as { message?: unknown; code?: unknown } | null;
  const text = typeof e?.message === 'string' && e.message ? e.message : typeof e?.code === 'string' ? e.code : String(err);
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

/** The rejection for an aborted signal: the caller's reason when it is pgcoord's, else AbortedError. */
export function abortedBy(signal: AbortSignal, what = 'operation'): unknown {
  const reason = signal.reason as unknown;
  return reason instanceof AbortedError ? reason : new AbortedError(`${what} aborted`, { cause: reason });
}

/**
 * The state of pgcoord's own transaction on a connection, for {@link finish}.
 * `sent`: BEGIN went out; `ended`: COMMIT went out with a batch.
 */
export interface TxState {
  sent: boolean;
  ended: boolean;
}

/**
 * Commit or roll back pgcoord's own transaction, then give the connection back. Never a statement
 * on a connection known to be dead; a commit whose answer is lost with the connection is reported
 * as unknown, not as failed.
 *
 * Only the connection's own state says whether it is lost: an error thrown by the caller's
 * callback is the caller's (a payment gateway's ECONNREFUSED is not a lost database connection).
 * When in doubt, ROLLBACK decides: if it cannot be sent, the connection is gone.
 */
export async function finish<T>(
  tx: TxState,
  lost: Loss,
  work: () => Promise<T>,
  run: (text: string) => PromiseLike<unknown>,
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
    if (lost.aborted) {
      release(true);
      throw err instanceof ConnectionLostError ? err : lost.reason;
    }
    let poisoned = false;
    if (tx.sent && !tx.ended) {
      try {
        // A cancel meant for an earlier statement can land on the ROLLBACK itself (57014): a
        // second one then goes through, and the connection stays in the pool. The ROLLBACK is
        // raced against the loss: a driver may never settle a statement sent on a socket that is
        // closing with an error (postgres.js 3.4, after ECONNRESET), and the loss comes a moment
        // later.
        const rollback = run('rollback').then(undefined, (e: unknown) => (sqlState(e) === '57014' ? run('rollback') : Promise.reject(e)));
        const done = await lost.all([rollback]);
        if (done.failed) throw done.error;
      } catch (rollbackErr) {
        // the rollback's fate is unknown: drop the connection rather than reuse it
        poisoned = true;
        if (lost.aborted || isConnectionLost(rollbackErr)) {
          release(true);
          throw err instanceof ConnectionLostError ? err : new ConnectionLostError(undefined, { cause: err });
        }
      }
    }
    release(poisoned);
    throw err;
  }
  if (!tx.sent || tx.ended) {
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

let savepoints = 0;

/**
 * A savepoint in plain SQL around `fn`; the SAVEPOINT statement rides in the same round trip as
 * the first statements of `fn`. It counts as open only once that batch was handed to the driver,
 * so a send refused up front (an aborted signal) never leads to a ROLLBACK TO a savepoint that
 * does not exist.
 */
export async function sqlSavepoint<T>(conn: Conn, fn: (conn: Conn) => Promise<T>): Promise<T> {
  const name = `pgcoord_sp${++savepoints}`;
  let opened = false;
  const inner: Conn = {
    own: false,
    lost: conn.lost,
    pipelines: false,
    commitAfter: (pending) => Promise.all(pending),
    attempt: (f, signal) => (signal?.aborted ? Promise.reject(abortedBy(signal)) : sqlSavepoint(inner, f)),
    async send(statements, signal) {
      if (opened) return conn.send(statements, signal);
      if (signal?.aborted) throw abortedBy(signal);
      opened = true;
      return (await conn.send([{ text: `savepoint ${name}` }, ...statements], signal)).slice(1);
    },
    async sendThen(statements, then, signal) {
      const rows: unknown[] = await inner.send(statements, signal);
      rows.push(await then());
      return rows;
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

/** A postgres.js query not sent yet: `.execute()` queues it on its connection, in call order. */
export function isPgjsQuery(x: unknown): x is PromiseLike<unknown> & { execute(): unknown } {
  return (
    (typeof x === 'function' || (typeof x === 'object' && x !== null)) &&
    typeof (x as { execute?: unknown }).execute === 'function' &&
    typeof (x as { cancel?: unknown }).cancel === 'function'
  );
}

/**
 * The write half of a plan (`withLock`, `withRowLock`): `writes` are queries returned unawaited, in
 * an array (an array is not a thenable, so they stay unsent). Where the connection pipelines they
 * go out in call order with COMMIT right behind them, one round trip; elsewhere they are awaited
 * one by one (and the transaction ends as usual). Returns each write's result.
 */
export async function commitWith(conn: Conn, writes: unknown): Promise<unknown[]> {
  const list = writes ?? [];
  if (!Array.isArray(list)) throw new InvalidOptionError("a plan's write must return an array of unawaited queries (or nothing)");
  if (conn.pipelines && list.every(isPgjsQuery)) {
    for (const w of list) w.execute(); // queued in order, COMMIT right behind
    return conn.commitAfter(list);
  }
  // Awaited in order, stopping at the first failure. Writes that are already running (node-postgres
  // queries are eager promises) are observed first: one that fails after an earlier failure stopped
  // the loop must not become an unhandled rejection (which ends the process).
  for (const w of list) if (w instanceof Promise) w.catch(() => {});
  const written: unknown[] = [];
  for (const w of list) written.push(await w);
  return written;
}

/** A scope whose attempts need no savepoint (pgcoord's own transaction: a failure rolls it all back). */
export function ownScope<H>(conn: Conn, call: Scope<H>['call']): Scope<H> {
  const scope: Scope<H> = {
    conn,
    call,
    attempt: (fn, signal) => (signal?.aborted ? Promise.reject(abortedBy(signal)) : fn(scope)),
  };
  return scope;
}

/** Run `items` through `fn` one at a time, stopping at the first failure. */
export async function sequential<S, R>(items: readonly S[], fn: (s: S) => Promise<R>): Promise<PromiseSettledResult<R>[]> {
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

/** BEGIN for the options, checked. */
export function beginText(opts: { isolation?: unknown; readOnly?: unknown }): string {
  const isolation = opts.isolation;
  if (isolation !== undefined && isolation !== 'read committed' && isolation !== 'repeatable read' && isolation !== 'serializable') {
    throw new InvalidOptionError(
      `isolation must be 'read committed', 'repeatable read' or 'serializable', got ${typeof isolation === 'string' ? JSON.stringify(isolation.slice(0, 40)) : typeof isolation}`,
    );
  }
  if (opts.readOnly !== undefined && typeof opts.readOnly !== 'boolean') throw new InvalidOptionError('readOnly must be a boolean');
  return `begin${isolation ? ` isolation level ${isolation}` : ''}${opts.readOnly ? ' read only' : ''}`;
}

export type { Row, Statement };
