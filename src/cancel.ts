// Cancel, on the server, the statements a drizzle transaction handle runs while a signal is live.
// pgcoord's own statements get this from `conn.send(statements, signal)`; a query built with
// drizzle (for typed rows) runs through drizzle's session instead, so this wraps that session's
// driver client. (A `scope.call(fn, signal)` in runner.ts would make this unnecessary.)

import { cancelPg } from './runner.js';

type AnyObj = Record<string, unknown>;
type Fn = ((...args: unknown[]) => unknown) & AnyObj;

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
