// drizzle over either driver: the drizzle tx a callback gets inside pgcoord's own transaction, and
// cancellation of the statements a drizzle tx runs while a signal is live.

import { cancelPg } from './node-postgres-side.js';

type AnyObj = Record<string, unknown>;
type Fn = ((...args: unknown[]) => unknown) & AnyObj;

/** True when `x` is a drizzle db or tx (for pg-core). */
export function isDrizzle(x: AnyObj): boolean {
  return typeof x.session === 'object' && x.session !== null && typeof x.dialect === 'object' && typeof x.select === 'function';
}

// A drizzle tx over pgcoord's own postgres.js transaction. drizzle's PostgresJsSession.transaction
// calls `this.client.begin(cb)` and builds the tx from the handle cb receives; a session whose
// client "begins" by handing over our already-open transaction gives a real drizzle tx, with the
// user's schema, casing and logger, and no second BEGIN.
export function drizzlePgjsTx<T>(db: AnyObj, handle: Fn, fn: (tx: unknown) => T | Promise<T>): Promise<T> {
  const session = Object.create(db.session as object) as AnyObj;
  const begin = async (cb: (h: Fn) => unknown) => cb(handle);
  session.client = new Proxy(handle, {
    get: (target, prop) => (prop === 'begin' ? begin : Reflect.get(target, prop)),
  });
  return (session.transaction as (cb: (tx: unknown) => Promise<T>) => Promise<T>)(async (tx) => fn(tx));
}

export async function drizzlePgTx<T>(db: AnyObj, client: AnyObj, fn: (tx: unknown) => T | Promise<T>): Promise<T> {
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

// pgcoord's own statements get cancellation from `conn.send(statements, signal)`; a query built
// with drizzle (for typed rows) runs through drizzle's session instead, so this wraps that
// session's driver client.
/**
 * Run `fn` with a copy of the drizzle transaction `tx` whose statements are cancelled on the
 * server when `signal` aborts: postgres.js queries through `Query#cancel()`, node-postgres through
 * a CancelRequest for the client's running query (what pg's own `Client#cancel` sends).
 */
export async function withCancel<H, T>(tx: H, signal: AbortSignal | undefined, fn: (tx: H) => Promise<T>): Promise<T> {
  if (!signal) return fn(tx);
  const session = (tx as AnyObj).session as AnyObj | undefined;
  const client = session?.client as Fn | undefined;
  if (!session || !client) return fn(tx);
  let cancel: () => void;
  let wrapped: unknown = client;
  if (typeof client.unsafe === 'function') {
    const queries: { cancel(): void }[] = [];
    const settled = new Set<unknown>();
    wrapped = new Proxy(client, {
      get(target, prop) {
        const value = Reflect.get(target, prop);
        if (prop !== 'unsafe') return value;
        return (...args: unknown[]) => {
          const query = (value as Fn).apply(target, args) as { cancel(): void } & PromiseLike<unknown>;
          queries.push(query);
          // a settled query must not be cancelled: the cancel would hit the next statement
          query.then(
            () => settled.add(query),
            () => settled.add(query),
          );
          return query;
        };
      },
    });
    cancel = () => {
      for (const q of queries) if (!settled.has(q)) q.cancel();
    };
  } else {
    cancel = () => void cancelPg(client);
  }
  const copySession = Object.create(session) as AnyObj;
  copySession.client = wrapped;
  const copy = Object.create(tx as object) as AnyObj;
  copy.session = copySession;
  signal.addEventListener('abort', cancel, { once: true });
  try {
    if (signal.aborted) throw signal.reason;
    return await fn(copy as H);
  } finally {
    signal.removeEventListener('abort', cancel);
  }
}
