// node-postgres's side connections, each a Client of its own beside the one pgcoord works on:
// the CancelRequest for a running statement, and the LISTEN that wakes lease waiters.

import { noConnection, noop } from './lifecycle.js';
import type { Listening } from './types.js';

type AnyObj = Record<string, unknown>;

/**
 * node-postgres has no cancel on the client itself: a second connection sends the CancelRequest
 * for the running query (the backend's pid and secret key), as pg's own Client#cancel does. pg 8
 * deprecates its `activeQuery` accessor (a warning on first use, also from Client#cancel), so the
 * running query is read with `_getActiveQuery()` and the request is sent on the cancel client's
 * `connection`: internals pinned by test/driver-internals.test.ts.
 */
export function cancelPg(client: AnyObj): Promise<void> {
  const active = typeof client._getActiveQuery === 'function' ? (client._getActiveQuery as () => unknown)() : client.activeQuery;
  if (!active) return Promise.resolve();
  const Ctor = client.constructor as new (config: unknown) => AnyObj;
  const canceller = new Ctor(client.connectionParameters);
  const connection = canceller.connection as
    | {
        connect(port: unknown, host?: unknown): void;
        cancel(pid: unknown, secret: unknown): void;
        end(): void;
        on(e: string, f: () => void): void;
        once(e: string, f: () => void): void;
      }
    | undefined;
  if (!connection) return Promise.resolve();
  const host = canceller.host as string | undefined;
  // delivered once the server closed the cancel connection (it signals the backend first)
  return new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      connection.end();
      resolve();
    }, 2000);
    timer.unref();
    const done = () => {
      clearTimeout(timer);
      resolve();
    };
    connection.once('end', done);
    connection.on('error', done);
    connection.once('connect', () => connection.cancel(client.processID, client.secretKey));
    if (host?.startsWith('/')) connection.connect(`${host}/.s.PGSQL.${canceller.port}`);
    else connection.connect(canceller.port, host);
  });
}

// A LISTEN on a Client of its own, made like the pool's (pg-pool's `Client` and `options`), so it
// takes no slot of the pool. pg does not reconnect it: a lost one calls `onLost` and stays closed.
export async function pgListen(
  pool: AnyObj,
  channel: string,
  onPayload: (payload: string) => void,
  onLost: () => void,
): Promise<Listening> {
  const Ctor = pool.Client as new (options: unknown) => AnyObj;
  const client = new Ctor(pool.options);
  let closing = false;
  const lost = () => {
    if (!closing) {
      closing = true;
      onLost();
    }
  };
  const on = client.on as (e: string, f: (x?: unknown) => void) => void;
  on.call(client, 'error', lost);
  on.call(client, 'end', lost);
  on.call(client, 'notification', (m) => {
    const n = m as { channel?: string; payload?: string };
    if (n.channel === channel) onPayload(n.payload ?? '');
  });
  const end = () => (client.end as () => Promise<void>).call(client).catch(noop);
  try {
    await (client.connect as () => Promise<void>).call(client);
    await (client.query as (t: string) => Promise<unknown>).call(client, `listen "${channel.replaceAll('"', '""')}"`);
  } catch (err) {
    closing = true;
    await end();
    throw noConnection(err);
  }
  // Once listening, the listener alone must not keep the process alive (postgres.js unrefs its
  // listen socket too); it is ref'd again to be closed, which is awaited. pg has no public unref:
  // its connection's stream (pinned by test/driver-internals.test.ts).
  const stream = (client.connection as { stream?: { ref?: () => void; unref?: () => void } } | undefined)?.stream;
  stream?.unref?.();
  return {
    close() {
      closing = true;
      stream?.ref?.();
      return end();
    },
  };
}

/**
 * Drop `client`'s connection at once: its socket is destroyed, so every statement in flight on it
 * rejects and pg emits 'end'. For a server that answers nothing (a network partition), where
 * `client.end()` would wait for the server's goodbye. `connection.stream`: pinned by
 * test/driver-internals.test.ts.
 */
export function destroyPg(client: AnyObj): void {
  const stream = (client.connection as { stream?: { destroy?(): void } } | undefined)?.stream;
  stream?.destroy?.();
}
