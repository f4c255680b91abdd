// Cancel, on the server, the statements a drizzle transaction handle runs while a signal is live.
// pgcoord's own statements get this from `conn.send(statements, signal)`; a query built with
// drizzle (for typed rows) runs through drizzle's session instead, so this wraps that session's
// driver client. (A `scope.call(fn, signal)` in runner.ts would make this unnecessary.)

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
    wrapped = new Proxy(client, {
      get(target, prop) {
        const value = Reflect.get(target, prop);
        if (prop !== 'unsafe') return value;
        return (...args: unknown[]) => {
          const query = (value as Fn).apply(target, args) as { cancel(): void };
          queries.push(query);
          return query;
        };
      },
    });
    cancel = () => {
      for (const q of queries) q.cancel();
    };
  } else {
    cancel = () => cancelPgQuery(client);
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

// node-postgres has no cancel on the client itself: a second connection sends the CancelRequest
// with the backend pid and secret key of the client's running query.
function cancelPgQuery(client: AnyObj): void {
  const active = client.activeQuery;
  if (!active) return;
  const Ctor = client.constructor as new (config: unknown) => AnyObj;
  const canceller = new Ctor(client.connectionParameters);
  (canceller.on as (e: string, f: () => void) => void)('error', () => {});
  (canceller.cancel as (c: unknown, q: unknown) => void)(client, active);
  setTimeout(() => (canceller.connection as { end(): void } | undefined)?.end(), 2000).unref();
}
