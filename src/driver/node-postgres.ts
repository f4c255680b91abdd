// How pgcoord talks to node-postgres (`pg`): a Pool (pgcoord checks a client out for its own
// transaction), a Client or PoolClient of the caller's (pgcoord's own transaction on it when it is
// idle, the caller's transaction joined when it is in one).

import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash } from 'node:crypto';
import { ConnectionLostError } from '../errors.js';
import { drizzlePgTx } from './drizzle.js';
import {
  abortedBy,
  batchOf,
  finish,
  GIVE_UP_AFTER_CANCEL_MS,
  Loss,
  noConnection,
  noop,
  ownScope,
  sequential,
  settle,
  sqlSavepoint,
  type TxState,
  unwatched,
} from './lifecycle.js';
import { cancelPg, destroyPg, pgListen } from './node-postgres-side.js';
import type { Adapter, Conn, Listening, PinnedConn, Row, Scope, SendOptions, Statement } from './types.js';

type AnyObj = Record<string, unknown>;
type Query = (text: string | QueryConfig, params?: unknown[]) => Promise<{ rows: Row[] }>;
interface QueryConfig {
  name?: string;
  text: string;
  values?: unknown[];
}

// pgcoord's statements with parameters go out as named prepared statements, as postgres.js sends
// every statement (and as rate-limiter-flexible does on pg): parsed and planned once per
// connection instead of at each call. The name is derived from the text, so one name never
// stands for two texts. Statements without parameters (BEGIN, COMMIT) stay simple queries.
const names = new Map<string, string>();
function prepared(s: Statement): string | QueryConfig {
  if (!s.params || s.params.length === 0) return s.text;
  let name = names.get(s.text);
  if (name === undefined) {
    if (names.size >= 4096) names.clear(); // a cache of hashes only: pg keeps its own per connection
    name = `pgcoord_${createHash('sha256').update(s.text).digest('hex').slice(0, 40)}`;
    names.set(s.text, name);
  }
  return { name, text: s.text, values: s.params as unknown[] };
}

// A client inside one of pgcoord's own transactions, with that transaction's loss; and the async
// context of the callback running in it. A pgcoord call made from inside the callback with the same
// client joins that transaction (and settles as soon as its loss is known); any other call on the
// same client waits its turn. Without this, two calls on one Client both "begin" (the second BEGIN
// is a no-op and advisory locks are re-entrant per session) and the first COMMIT commits both.
const holders = new WeakMap<object, Loss>();
const queues = new WeakMap<object, Promise<unknown>>();
const inside = new AsyncLocalStorage<object>();

function inCallerTransaction(client: AnyObj): boolean {
  const status = typeof client.getTransactionStatus === 'function' ? (client.getTransactionStatus as () => unknown)() : client._txStatus;
  return status === 'T' || status === 'E';
}

/** True when `client` is a node-postgres client in a transaction pgcoord did not open. */
export function isCallerTransaction(client: AnyObj): boolean {
  return inCallerTransaction(client) && !holders.has(client);
}

function pgConn(client: AnyObj, own: boolean, loss: Loss, first?: string): Conn & TxState {
  const query = client.query as Query;
  const conn: Conn & TxState = {
    own,
    get lost() {
      return loss.signal;
    },
    sent: false,
    ended: false,
    pipelines: own && Boolean(client.pipeline),
    attempt: (fn, signal) => {
      if (signal?.aborted) return Promise.reject(abortedBy(signal));
      return own ? fn(conn) : sqlSavepoint(conn, fn);
    },
    async commitAfter(pending) {
      const values = await Promise.all(pending); // a failure leaves the transaction to finish()'s ROLLBACK
      if (own) await conn.send([], undefined, { commit: true });
      return values;
    },
    async sendThen(statements, then, signal) {
      const rows: unknown[] = await conn.send(statements, signal);
      rows.push(await then());
      return rows;
    },
    async send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions) {
      if (loss.aborted) throw loss.reason;
      if (signal?.aborted) throw abortedBy(signal);
      if (conn.ended) throw new ConnectionLostError('this transaction has already committed');
      const skip = first && !conn.sent ? 1 : 0;
      const committing = own && options?.commit === true;
      const all = [...(skip ? [{ text: first as string }] : []), ...statements, ...(committing ? [{ text: 'commit' }] : [])];
      conn.sent = true;
      // an abort is re-checked before each statement: a cancel that came between two is not lost
      const run = (s: Statement) => {
        if (signal?.aborted && s.text !== 'commit') return Promise.reject(abortedBy(signal));
        return query.call(client, prepared(s)).then((r) => r.rows);
      };
      // A cancel reaches whatever the backend runs when it arrives: it is sent only while one of
      // this batch's statements runs, and the batch returns only once every cancel it sent has
      // been delivered, so none can reach a later statement (one delivered while the statement
      // still runs arrived before it and was dropped: another one is sent).
      let running = true;
      const cancels: Promise<unknown>[] = [];
      const cancel = () => {
        if (!running) return;
        cancels.push(
          cancelPg(client).then(() => {
            if (running) setTimeout(cancel, 5);
          }),
        );
      };
      // No answer to the cancel either: the server is unreachable (a partition). Drop the
      // connection rather than wait for it: the batch rejects, its transaction cannot commit.
      let giveUp: NodeJS.Timeout | undefined;
      const onAbort = () => {
        cancel();
        giveUp = setTimeout(() => {
          if (!running) return;
          loss.abort(
            new ConnectionLostError(
              `no answer from the server within ${GIVE_UP_AFTER_CANCEL_MS} ms of the cancel: the connection was dropped; the transaction did not commit`,
            ),
          );
          destroyPg(client);
        }, GIVE_UP_AFTER_CANCEL_MS);
        giveUp.unref?.();
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        // A client created with `pipeline: true` pipelines statements issued without awaiting;
        // otherwise pg wants one at a time and stops at the first error, in which case COMMIT was
        // never sent and the transaction is still open.
        const results = client.pipeline ? await Promise.allSettled(all.map(run)) : await sequential(all, run);
        running = false;
        if (cancels.length) await Promise.all(cancels);
        if (committing) conn.ended = results.length === all.length;
        if (signal?.aborted && results.some((r) => r.status === 'rejected')) throw abortedBy(signal);
        return settle(batchOf(results), loss, conn.ended).slice(skip, skip + statements.length) as Row[][];
      } finally {
        running = false;
        clearTimeout(giveUp);
        signal?.removeEventListener('abort', onAbort);
      }
    },
  };
  return conn;
}

// The client a callback gets in a lazy transaction: its query() waits for the checkout and the
// BEGIN, then runs on the checked-out client (calls keep their order); everything else is the
// checked-out client's, once there is one. A query that takes a callback or a submittable (a
// cursor) is handed over the same way; a submittable is returned at once, as pg does.
function lazyClient(ready: () => Promise<AnyObj>, current: () => AnyObj | undefined): AnyObj {
  const query = (...args: unknown[]): unknown => {
    const c = current();
    if (c) return (c.query as (...a: unknown[]) => unknown).apply(c, args);
    const run = ready().then((real) => (real.query as (...a: unknown[]) => unknown).apply(real, args));
    const first = args[0] as { submit?: unknown } | undefined;
    const callback = args[args.length - 1];
    if (typeof callback === 'function') {
      run.then(undefined, (err: unknown) => (callback as (e: unknown) => void)(err));
      return undefined;
    }
    if (first && typeof first.submit === 'function') {
      run.then(undefined, (err: unknown) => (first as { handleError?: (e: unknown) => void }).handleError?.(err));
      return first;
    }
    return run;
  };
  return new Proxy({} as AnyObj, {
    get(_target, prop) {
      if (prop === 'query') return query;
      const c = current();
      if (prop === 'getTransactionStatus') return () => (c ? inTransactionStatus(c) : 'T');
      if (!c) return undefined;
      const value = Reflect.get(c, prop);
      return typeof value === 'function' && prop !== 'constructor' ? value.bind(c) : value;
    },
    has: (_target, prop) =>
      prop === 'query' || prop === 'getTransactionStatus' || (current() !== undefined && prop in (current() as AnyObj)),
  });
}

function inTransactionStatus(client: AnyObj): unknown {
  return typeof client.getTransactionStatus === 'function' ? (client.getTransactionStatus as () => unknown)() : client._txStatus;
}

// Watch a client pgcoord uses: 'error' / 'end' abort the loss (pg emits 'error' on an idle client
// whose connection dies; without a listener Node would throw). `release` stops watching and, for a
// pooled client, gives it back, or destroys it when it failed or may still hold something.
function watchPg(client: AnyObj, pooled: boolean, early?: unknown, loss = new Loss()): { loss: Loss; release(poisoned?: boolean): void } {
  const onError = (err?: unknown) => loss.abort(new ConnectionLostError(undefined, { cause: err }));
  const on = client.on as (e: string, f: (err?: unknown) => void) => void;
  const off = client.off as (e: string, f: (err?: unknown) => void) => void;
  on.call(client, 'error', onError);
  on.call(client, 'end', onError);
  if (early !== undefined) onError(early);
  let released = false;
  return {
    loss,
    release(poisoned = false) {
      if (released) return;
      released = true;
      off.call(client, 'error', onError);
      off.call(client, 'end', onError);
      if (!pooled) return; // a client of the caller's: not ours to give back or close
      const drop = poisoned || loss.aborted;
      (client.release as (e?: unknown) => void)(drop ? new Error('pgcoord: connection dropped') : undefined);
    },
  };
}

// Check a client out of a pool. pg-pool takes its idle 'error' listener off a client as it hands
// it over, and pg may parse a FATAL in the same packet right after that, before the checkout's
// promise continues: an 'error' event nobody listens to would crash the process. While pgcoord has
// a checkout pending, one listener on the pool's synchronous 'acquire' event covers that gap for
// each client handed out: it records the error and comes off on the next microtask, which runs
// before the checkout's continuation (no I/O can come in between), where the watch takes over.
// An abort of `signal` gives up the wait; a client that arrives after it goes straight back.
interface Gap {
  pending: number;
  caught: Map<AnyObj, unknown>;
  onAcquire(client: AnyObj): void;
}
const gaps = new WeakMap<AnyObj, Gap>();

function guardGap(pool: AnyObj): Gap {
  let gap = gaps.get(pool);
  if (!gap) {
    const caught = new Map<AnyObj, unknown>();
    gap = {
      pending: 0,
      caught,
      onAcquire(client) {
        const listener = (err: unknown) => {
          if (!caught.has(client)) caught.set(client, err);
        };
        const on = client.on as (e: string, f: (err: unknown) => void) => void;
        const off = client.off as (e: string, f: (err: unknown) => void) => void;
        on.call(client, 'error', listener);
        queueMicrotask(() => off.call(client, 'error', listener));
      },
    };
    gaps.set(pool, gap);
  }
  if (gap.pending++ === 0) (pool.on as (e: string, f: (c: AnyObj) => void) => void).call(pool, 'acquire', gap.onAcquire);
  return gap;
}

function unguardGap(pool: AnyObj, gap: Gap): void {
  if (--gap.pending > 0) return;
  (pool.off as (e: string, f: (c: AnyObj) => void) => void).call(pool, 'acquire', gap.onAcquire);
  gap.caught.clear(); // errors of clients that others checked out meanwhile: theirs to see
}

function checkout(pool: AnyObj, signal: AbortSignal | undefined): Promise<{ client: AnyObj; early: unknown }> {
  if (signal?.aborted) return Promise.reject(abortedBy(signal, 'waiting for a database connection'));
  const gap = guardGap(pool);
  return new Promise((resolve, reject) => {
    let gaveUp = false;
    const onAbort = () => {
      gaveUp = true;
      unguardGap(pool, gap);
      reject(abortedBy(signal as AbortSignal, 'waiting for a database connection'));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    (pool.connect as () => Promise<AnyObj>).call(pool).then(
      (client) => {
        signal?.removeEventListener('abort', onAbort);
        if (gaveUp) {
          (client.release as () => void)();
          return;
        }
        const early = gap.caught.get(client);
        gap.caught.delete(client);
        unguardGap(pool, gap);
        resolve({ client, early });
      },
      (err: unknown) => {
        signal?.removeEventListener('abort', onAbort);
        if (gaveUp) return;
        unguardGap(pool, gap);
        reject(noConnection(err));
      },
    );
  });
}

async function own<T>(
  client: AnyObj,
  pooled: boolean,
  early: unknown,
  begin: string,
  drizzle: AnyObj | undefined,
  body: (s: Scope<unknown>) => Promise<T>,
): Promise<T> {
  const watched = watchPg(client, pooled, early);
  const conn = pgConn(client, true, watched.loss, begin);
  holders.set(client, watched.loss);
  const scope = ownScope<unknown>(conn, async (fn) => {
    // node-postgres cannot pipeline BEGIN with the caller's first statement: send it now.
    if (!conn.sent) await conn.send([]);
    return inside.run(client, () => (drizzle ? drizzlePgTx(drizzle, client, fn) : fn(client)));
  });
  const query = client.query as (text: string) => Promise<unknown>;
  return finish(
    conn,
    watched.loss,
    () => body(scope),
    (text) => query.call(client, text),
    (poisoned) => {
      holders.delete(client);
      watched.release(poisoned);
    },
  );
}

/** A node-postgres Pool, optionally under a drizzle db. */
export class PgPool implements Adapter {
  readonly name = 'node-postgres';
  constructor(
    readonly pool: AnyObj,
    readonly drizzle?: AnyObj,
  ) {}

  transaction<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return checkout(this.pool, signal).then(({ client, early }) => own(client, true, early, begin, this.drizzle, body));
  }

  lazyTransaction<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const drizzle = this.drizzle;
    const loss = new Loss();
    let client: AnyObj | undefined;
    let conn: (Conn & TxState) | undefined;
    let live: (Conn & TxState) | undefined;
    let watched: { release(poisoned?: boolean): void } | undefined;
    let opening: Promise<Conn & TxState> | undefined;
    let over = false;
    // The client, checked out on the first statement and in its transaction (BEGIN sent and
    // answered: pg cannot pipeline it with the caller's statement). One that arrives after the
    // transaction ended (nothing was sent on it) goes straight back.
    const open = (): Promise<Conn & TxState> => {
      if (over) return Promise.reject(new ConnectionLostError('this pgcoord transaction has already ended'));
      if (live) return Promise.resolve(live);
      if (!opening) {
        opening = checkout(this.pool, signal).then(async ({ client: c, early }) => {
          if (over) {
            (c.release as () => void)();
            throw new ConnectionLostError('this pgcoord transaction has already ended');
          }
          client = c;
          watched = watchPg(c, true, early, loss);
          conn = pgConn(c, true, loss, begin);
          await conn.send([]);
          // ended while BEGIN was on its way: finish() rolls it back; nothing more goes on it
          if (over) throw new ConnectionLostError('this pgcoord transaction has already ended');
          live = conn;
          return conn;
        });
        opening.catch(noop); // its failure reaches whoever asked for the connection
      }
      return opening;
    };
    const lazy: Conn & TxState = {
      own: true,
      pipelines: false,
      get lost() {
        return loss.signal;
      },
      get sent() {
        return conn?.sent ?? false;
      },
      get ended() {
        return conn?.ended ?? false;
      },
      attempt: (fn, s) => (s?.aborted ? Promise.reject(abortedBy(s)) : fn(lazy)),
      send: (statements, s, options) => (s?.aborted ? Promise.reject(abortedBy(s)) : open().then((c) => c.send(statements, s, options))),
      sendThen: (statements, then, s) => (s?.aborted ? Promise.reject(abortedBy(s)) : open().then((c) => c.sendThen(statements, then, s))),
      commitAfter: (pending) => open().then((c) => c.commitAfter(pending)),
    };
    const handle = lazyClient(
      () => open().then(() => client as AnyObj),
      () => (live && !over ? client : undefined),
    );
    holders.set(handle, loss);
    const scope = ownScope<unknown>(lazy, (fn) =>
      inside.run(handle, async () => (drizzle ? drizzlePgTx(drizzle, handle, fn) : fn(handle))),
    );
    return finish(
      lazy,
      loss,
      () => body(scope),
      (text) => ((client as AnyObj).query as Query).call(client, text),
      (poisoned) => {
        over = true;
        holders.delete(handle);
        watched?.release(poisoned);
      },
    );
  }

  autocommit(statement: Statement, signal: AbortSignal | undefined): Promise<Row[]> | undefined {
    // (a Pool's query() hides its client, which a cancel needs: with a signal, pgcoord's own transaction)
    if (signal) return undefined;
    return (this.pool.query as Query).call(this.pool, prepared(statement)).then((r) => r.rows);
  }

  async pin(signal?: AbortSignal): Promise<PinnedConn> {
    const { client, early } = await checkout(this.pool, signal);
    const { loss, release } = watchPg(client, true, early);
    const conn = pgConn(client, false, loss);
    try {
      const [[row]] = (await conn.send([{ text: 'select pg_backend_pid()::int as pid' }])) as [Row[]];
      return { conn, pid: Number(row?.pid), lost: loss.signal, release };
    } catch (err) {
      release(true);
      throw err;
    }
  }

  listen(channel: string, onPayload: (payload: string) => void, onLost: () => void): Promise<Listening> {
    return pgListen(this.pool, channel, onPayload, onLost);
  }
}

/** A node-postgres Client or PoolClient of the caller's (or a drizzle db/tx over one). */
export class PgClient implements Adapter {
  readonly name = 'node-postgres client';
  constructor(
    readonly client: AnyObj,
    readonly handle: unknown,
    readonly drizzle?: AnyObj,
  ) {}

  transaction<T>(begin: string, body: (scope: Scope<unknown>) => Promise<T>): Promise<T> {
    const client = this.client;
    const holder = holders.get(client);
    // called from inside pgcoord's callback on this client: join that transaction
    if (holder && inside.getStore() === client) return this.#join(holder, body);
    const previous = queues.get(client) ?? Promise.resolve();
    const turn = previous.then(() =>
      // the caller's own transaction (BEGIN sent by the caller): join it; else pgcoord's own
      inCallerTransaction(client) && !holders.has(client)
        ? this.#join(unwatched, body)
        : own(client, false, undefined, begin, this.drizzle, body),
    );
    const tail = turn.then(
      () => {},
      () => {},
    );
    queues.set(client, tail);
    void tail.then(() => {
      if (queues.get(client) === tail) queues.delete(client);
    });
    return turn;
  }

  #join<T>(loss: Loss, body: (scope: Scope<unknown>) => Promise<T>): Promise<T> {
    if (loss.aborted) return Promise.reject(loss.reason);
    const handle = this.handle;
    const conn = pgConn(this.client, false, loss);
    // node-postgres keeps no memory of failed statements: a savepoint in SQL covers the caller's
    // handle too (a drizzle tx runs on the same client)
    const scope: Scope<unknown> = {
      conn,
      call: async (fn) => fn(handle),
      attempt: (fn, signal) => conn.attempt((c) => fn({ ...scope, conn: c }), signal),
    };
    return body(scope);
  }

  autocommit(statement: Statement, signal: AbortSignal | undefined): Promise<Row[]> | undefined {
    const client = this.client;
    // busy with a transaction (pgcoord's or the caller's): take the transaction path, which joins or
    // waits; with a signal too (its cancel must be delivered before the connection serves again)
    if (signal || holders.has(client) || queues.has(client) || inCallerTransaction(client)) return undefined;
    return (client.query as Query).call(client, prepared(statement)).then((r) => r.rows);
  }
}
