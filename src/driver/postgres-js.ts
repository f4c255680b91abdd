// How pgcoord talks to postgres.js, for both majors. What differs between 3.4 and 4.x (how a
// connection's close is learned, how a pool slot is waited for, how a suspect session is ended)
// is in postgres-js-3.ts and postgres-js-4.ts; everything else is here.
//
// pgcoord's own transaction reserves a connection (`sql.reserve()`) and sends BEGIN itself,
// pipelined with its first statements, instead of `sql.begin`: that is what lets it send
// [BEGIN, lock, read] and [writes, COMMIT] as two round trips. Once the connection is lost the
// handle given to the callback refuses statements, and pgcoord never sends ROLLBACK, COMMIT or
// `release()` on it.

import { CommitUnknownError, ConnectionLostError, UnsupportedRunnerError } from '../errors.js';
import { drizzlePgjsTx, isDrizzle } from './drizzle.js';
import {
  abortedBy,
  finish,
  isPgjsQuery,
  Loss,
  noConnection,
  noop,
  ownScope,
  settle,
  sqlSavepoint,
  type TxState,
  unwatched,
} from './lifecycle.js';
import { lazyTransaction } from './postgres-js-lazy.js';
import type { Adapter, Conn, Listening, PinnedConn, Row, Scope, SendOptions, Statement } from './types.js';

export type Fn = ((...args: unknown[]) => unknown) & Record<string, unknown>;

/** A postgres.js query (both majors): a lazy promise sent by `execute()`. */
export interface PgjsQuery extends Promise<Row[]> {
  execute(): PgjsQuery;
  cancel(): unknown;
}

export type Unsafe = (text: string, params?: unknown[], options?: object) => PgjsQuery;

/** What differs between postgres.js majors. */
export interface PgjsVersion {
  readonly name: string;
  /** Reserve a connection; `signal` gives up waiting for a pool slot (AbortedError). */
  reserve(sql: Fn, signal: AbortSignal | undefined): Promise<Fn>;
  /** Send the pin's first statement (parameterless) so that the pin learns when its connection closes. */
  capture(pin: PgjsPin, text: string): PgjsQuery;
  /** Stop watching a pin that goes back to the pool. */
  forget(pin: PgjsPin): void;
  /**
   * Send a cancel for `query` if it is the one running on its connection (resolves once delivered);
   * undefined when it is not running yet (queued behind another statement).
   */
  cancel(query: PgjsQuery): Promise<unknown> | undefined;
  /** Free the pool slot of a pin whose connection closed. */
  gone(pin: PgjsPin): void;
  /** End the session of a live pin that may still hold something (a lock), and free its pool slot. */
  drop(pin: PgjsPin): void;
}

const prepared = { prepare: true };

/** A reserved connection whose death pgcoord observes (through its version's hooks). */
export class PgjsPin {
  released = false;
  /** The version's own bookkeeping for this pin. */
  watch: unknown;
  captured: PgjsQuery | undefined;

  constructor(
    readonly pool: Fn,
    readonly raw: Fn,
    readonly version: PgjsVersion,
    /** Made before the pin when a lazy transaction handed its signal out already. */
    readonly loss: Loss = new Loss(),
  ) {}

  capture(text: string): PgjsQuery {
    this.captured = this.version.capture(this, text);
    return this.captured;
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
    this.version.forget(this);
    if (this.loss.aborted) {
      this.version.gone(this);
      return;
    }
    if (poisoned) this.version.drop(this);
    else (this.raw.release as () => void)();
  }
}

/**
 * pgcoord's view of a postgres.js connection: its own transaction on a pin (`own`, BEGIN sent
 * lazily with the first statements), a caller's transaction (joined), or a pinned connection
 * outside any transaction (session locks).
 */
export class PgjsConn implements Conn, TxState {
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

  attempt<T>(fn: (conn: Conn) => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(abortedBy(signal));
    if (this.own) return fn(this);
    // In a caller's sql.begin, postgres.js remembers any failed statement and rethrows it when the
    // callback ends, even if it was handled: a recoverable failure must go through its savepoint().
    if (typeof this.sql.savepoint === 'function')
      return (this.sql.savepoint as (f: (sp: Fn) => Promise<T>) => Promise<T>)((sp) => fn(new PgjsConn(sp, false, this.loss)));
    return sqlSavepoint(this, fn);
  }

  commitAfter(pending: readonly PromiseLike<unknown>[]): Promise<unknown[]> {
    if (!this.own) return Promise.all(pending);
    if (this.loss.aborted) return Promise.reject(this.loss.reason);
    this.ended = true;
    const queries = [...pending, (this.sql.unsafe as Unsafe)('commit', [], prepared).execute()];
    return this.#settle(queries, true, 0, queries.length - 1, undefined);
  }

  sendThen(statements: readonly Statement[], then: () => PromiseLike<unknown>, signal?: AbortSignal): Promise<unknown[]> {
    const refused = this.#refused(signal);
    if (refused) return Promise.reject(refused);
    const queries: PromiseLike<unknown>[] = this.#issue(statements);
    const skip = queries.length - statements.length;
    try {
      queries.push(then());
    } catch (err) {
      for (const q of queries) q.then(undefined, noop); // their outcome no longer matters
      return Promise.reject(err);
    }
    return this.#settle(queries, false, skip, queries.length, signal);
  }

  send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions): Promise<Row[][]> {
    const refused = this.#refused(signal);
    if (refused) return Promise.reject(refused);
    const queries = this.#issue(statements);
    const skip = queries.length - statements.length;
    const committing = this.own && options?.commit === true;
    if (committing) {
      this.ended = true;
      queries.push((this.sql.unsafe as Unsafe)('commit', [], prepared).execute());
    }
    return this.#settle(queries, committing, skip, skip + statements.length, signal) as Promise<Row[][]>;
  }

  #refused(signal: AbortSignal | undefined): unknown {
    if (this.loss.aborted) return this.loss.reason;
    if (signal?.aborted) return abortedBy(signal);
    if (this.ended) return new ConnectionLostError('this transaction has already committed');
    if (this.pin?.released) return new ConnectionLostError('this pgcoord transaction has already ended');
    return undefined;
  }

  // BEGIN when not sent yet, then `statements`, issued without awaiting in between: postgres.js
  // writes them in one packet (pipelined). Prepared: an unprepared statement with parameters costs
  // a Describe round trip first and stops the pipeline behind it.
  #issue(statements: readonly Statement[]): PgjsQuery[] {
    const queries: PgjsQuery[] = [];
    const first = this.begin();
    if (first) queries.push(first);
    const unsafe = this.sql.unsafe as Unsafe;
    for (const s of statements) queries.push(unsafe(s.text, (s.params ?? []) as unknown[], prepared).execute());
    return queries;
  }

  // The results of queries[from, to), once all have settled; or the lost-connection outcome if the
  // connection dies first (CommitUnknownError when COMMIT was in the batch).
  //
  // A Postgres cancel hits whatever the backend runs when it arrives. So a signal cancels only the
  // earliest query of the batch still pending, and the batch settles only once every cancel it
  // sent has been delivered (the server closed the cancel connection): nothing else is sent on the
  // connection while a cancel is in flight, and a cancel that reaches an idle backend is dropped.
  // A cancel delivered while the batch still runs arrived before its statement did (lost): another
  // one is sent.
  #settle(queries: readonly PromiseLike<unknown>[], committing: boolean, from: number, to: number, signal: AbortSignal | undefined) {
    const cancels: Promise<unknown>[] = [];
    let stop = noop;
    if (signal) {
      let pending = true;
      const settled = new Set<PromiseLike<unknown>>();
      for (const q of queries)
        q.then(
          () => settled.add(q),
          () => settled.add(q),
        );
      const cancel = () => {
        const running = pending ? queries.find((q) => !settled.has(q)) : undefined;
        if (!running || !isPgjsQuery(running)) return;
        const sent = this.pin?.version.cancel(running as PgjsQuery) ?? (running as PgjsQuery).cancel();
        if (!sent) {
          setTimeout(cancel, 5); // not running on the server yet: ask again once it is
          return;
        }
        const delivered = Promise.resolve(sent).then(() => {
          if (pending) setTimeout(cancel, 5);
        }, noop);
        cancels.push(within(delivered, 2000));
      };
      signal.addEventListener('abort', cancel, { once: true });
      stop = () => {
        pending = false;
        signal.removeEventListener('abort', cancel);
      };
    }
    const delivered = () => (cancels.length ? Promise.all(cancels) : undefined);
    return this.loss.all(queries).then(
      async (batch) => {
        stop();
        await delivered();
        const rows = settle(batch, this.loss, committing);
        return from === 0 && to === rows.length ? rows : rows.slice(from, to);
      },
      (err: unknown) => {
        // the connection was lost before every statement settled: with COMMIT in the batch, its
        // fate is unknown
        stop();
        for (const q of queries) q.then(undefined, noop);
        throw committing ? new CommitUnknownError({ cause: err }) : err;
      },
    );
  }
}

/**
 * Call the caller's `fn` with the transaction's handle (a drizzle tx over it under a drizzle db).
 * A postgres.js query is a Promise already: kept as it is (wrapping it would send it a tick later).
 */
export function callWith<T>(drizzleDb: Record<string, unknown> | undefined, handle: Fn, fn: (h: unknown) => T | Promise<T>): Promise<T> {
  if (drizzleDb) return drizzlePgjsTx(drizzleDb, handle, fn);
  try {
    const r = fn(handle);
    return r instanceof Promise ? r : Promise.resolve(r);
  } catch (err) {
    return Promise.reject(err);
  }
}

/** `p`, or undefined after `ms` (a cancel the server never answers must not hold the batch forever). */
export function within(p: Promise<unknown>, ms: number): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

// The handle a caller gets inside pgcoord's own transaction: the reserved connection's senders,
// refusing statements once the connection is lost or the transaction is over, sending BEGIN ahead
// of the first statement; its value builders; and a `savepoint()` like an `sql.begin` handle's.
// Nothing else: not the pool's end/begin/reserve/listen, not release().
export const senders = ['unsafe', 'notify', 'file', 'batch'] as const;
export const builders = ['types', 'typed', 'array', 'json', 'identifier'] as const;

export function guardedHandle(pin: PgjsPin, conn: PgjsConn): Fn {
  const raw = pin.raw;
  const before = () => {
    pin.check();
    if (conn.ended) throw new ConnectionLostError('this transaction has already committed');
    // its failure (a lost connection) surfaces on the user's statement behind it
    conn.begin()?.catch(noop);
  };
  const handle = ((...args: unknown[]) => {
    before();
    return raw(...args);
  }) as Fn;
  for (const key of builders) if (key in raw) handle[key] = raw[key];
  for (const key of senders) {
    const send = raw[key];
    if (typeof send === 'function')
      handle[key] = (...args: unknown[]) => {
        before();
        return (send as Fn).apply(raw, args);
      };
  }
  handle.savepoint = savepointOn(handle, conn);
  owners.set(handle, conn);
  return handle;
}

/** The pgcoord transaction behind a handle it gave to a callback: a call joined to it shares its loss. */
export const owners = new WeakMap<object, { readonly loss: Loss }>();

// `savepoint()` for the handle a caller gets inside pgcoord's transaction, so it reads like an
// `sql.begin` handle.
export function savepointOn(handle: Fn, conn: Conn) {
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

export function reservePin(sql: Fn, version: PgjsVersion, signal: AbortSignal | undefined, loss?: Loss): Promise<PgjsPin> {
  if (signal?.aborted) return Promise.reject(abortedBy(signal, 'waiting for a database connection'));
  return version.reserve(sql, signal).then(
    (raw) => new PgjsPin(sql, raw, version, loss),
    (err: unknown) => {
      throw signal?.aborted ? abortedBy(signal, 'waiting for a database connection') : noConnection(err);
    },
  );
}

/** postgres.js pool (`sql`), optionally under a drizzle db. */
export class PgjsPool implements Adapter {
  readonly name: string;
  constructor(
    readonly sql: Fn,
    readonly version: PgjsVersion,
    readonly drizzle?: Record<string, unknown>,
  ) {
    this.name = version.name;
  }

  transaction<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const drizzleDb = this.drizzle;
    return reservePin(this.sql, this.version, signal).then((pin) => {
      const conn = new PgjsConn(pin.raw, true, pin.loss, pin, begin);
      let handle: Fn | undefined;
      const scope = ownScope<unknown>(conn, (fn) => {
        handle ??= guardedHandle(pin, conn);
        return callWith(drizzleDb, handle, fn);
      });
      return finish(
        conn,
        pin.loss,
        () => body(scope),
        (text) => (pin.raw.unsafe as Unsafe)(text),
        (poisoned) => pin.release(poisoned),
      );
    });
  }

  lazyTransaction<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return lazyTransaction(this.sql, this.version, this.drizzle, begin, body, signal);
  }

  // With a signal, the transaction path instead: its cancel must be delivered before the
  // connection serves anybody else, which only a reserved connection can wait for.
  autocommit(statement: Statement, signal: AbortSignal | undefined): Promise<Row[]> | undefined {
    if (signal) return undefined;
    return (this.sql.unsafe as Unsafe)(statement.text, (statement.params ?? []) as unknown[], prepared).execute();
  }

  async pin(signal?: AbortSignal): Promise<PinnedConn> {
    const pin = await reservePin(this.sql, this.version, signal);
    try {
      const [row] = await pin.capture('select pg_backend_pid()::int as pid').execute();
      return { conn: new PgjsConn(pin.raw, false, pin.loss), pid: Number(row?.pid), lost: pin.loss.signal, release: (p) => pin.release(p) };
    } catch (err) {
      pin.release(true);
      throw pin.loss.aborted ? pin.loss.reason : noConnection(err);
    }
  }

  listen(channel: string, onPayload: (payload: string) => void, onLost: () => void): Promise<Listening> {
    return pgjsListen(this.sql, channel, onPayload, onLost);
  }
}

// postgres.js listens on a connection of its own (outside `max`), and listens again by itself
// after that connection is lost: `onlisten` runs at each (re)listen, and every one after the first
// follows a gap where notifications were missed.
async function pgjsListen(sql: Fn, channel: string, onPayload: (payload: string) => void, onLost: () => void): Promise<Listening> {
  let listens = 0;
  const request = await (sql.listen as (c: string, f: (p: string) => void, l: () => void) => Promise<{ unlisten(): Promise<void> }>)(
    channel,
    onPayload,
    () => {
      if (listens++ > 0) onLost();
    },
  );
  return { close: () => request.unlisten() };
}

/** A caller's postgres.js transaction (an `sql.begin` handle, or a handle pgcoord gave a callback). */
export class PgjsJoined implements Adapter {
  readonly name = 'postgres.js transaction';
  constructor(
    readonly sql: Fn,
    readonly handle: unknown,
  ) {}

  transaction<T>(_begin: string, body: (scope: Scope<unknown>) => Promise<T>): Promise<T> {
    // joined to pgcoord's own transaction: share its loss, so this call settles as soon as it knows
    const owner = owners.get(this.sql);
    if (owner?.loss.aborted) return Promise.reject(owner.loss.reason);
    return body(joinedScope(this.sql, owner?.loss ?? unwatched, this.handle));
  }
}

// A caller's transaction. An attempt runs under the driver's own savepoint: drizzle's nested
// transaction for a drizzle tx (it is `sql.savepoint()` underneath), else `sql.savepoint()`.
function joinedScope(sql: Fn, loss: Loss, handle: unknown): Scope<unknown> {
  const conn = new PgjsConn(sql, false, loss);
  const scope: Scope<unknown> = {
    conn,
    call: async (fn) => fn(handle),
    attempt: <T>(fn: (s: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T> => {
      if (signal?.aborted) return Promise.reject(abortedBy(signal));
      const h = handle as Record<string, unknown>;
      if (h !== sql && isDrizzle(h))
        return (h.transaction as (f: (nested: Record<string, unknown>) => Promise<T>) => Promise<T>)((nested) =>
          fn(joinedScope((nested.session as Record<string, unknown>).client as Fn, loss, nested)),
        );
      return conn.attempt((c) => fn({ ...scope, conn: c, call: async (f) => f((c as PgjsConn).sql) }));
    },
  };
  return scope;
}

/** Pick the postgres.js version's hooks from what the instance has (not from a package version). */
export function isPgjs4(sql: Fn): boolean {
  return typeof sql.batch === 'function';
}

export function pgjsUnsupported(): never {
  throw new UnsupportedRunnerError(
    'a reserved postgres.js connection is not a runner: pass the pool (sql) or a transaction (sql.begin handle)',
  );
}
