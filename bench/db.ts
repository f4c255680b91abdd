// postgres.js pools whose round trips are counted.
//
// How round trips are counted: every postgres.js connection of a bench pool runs on a socket we
// create, whose `write` is wrapped to count calls. postgres.js buffers everything a connection
// sends in one event-loop turn and flushes it with a single `socket.write` (statements issued
// without awaiting in between, i.e. a pipeline, go out together), and a request/response client
// must then wait for the answer, so one write is one round trip. Connection start-up writes are
// excluded: pools are opened and warmed before the counter is reset.
import net from 'node:net';
import postgres from 'postgres';

/** A counter of client→server flushes, shared by all the connections of a pool. */
export interface RoundTrips {
  count: number;
}

/** A postgres.js pool with a round-trip counter. */
export interface CountedSql {
  sql: postgres.Sql;
  trips: RoundTrips;
}

/**
 * A postgres.js `socket` option (which its type definitions do not declare): a TCP connection to
 * `url` whose writes are counted in `trips` (one write = one round trip). It must return a connected
 * socket (postgres.js then skips its own connect). Only TCP URLs are supported.
 */
export function countedSocket(url: string, trips: RoundTrips): () => Promise<net.Socket> {
  const u = new URL(url);
  const host = u.hostname || '127.0.0.1';
  const port = Number(u.port || 5432);
  return () =>
    new Promise<net.Socket>((resolve, reject) => {
      const socket = net.connect(port, host);
      socket.setNoDelay(true);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        const write = socket.write.bind(socket) as (...a: unknown[]) => boolean;
        socket.write = ((...args: unknown[]) => {
          trips.count++;
          return write(...args);
        }) as typeof socket.write;
        resolve(socket);
      });
    });
}

/** Open a postgres.js pool of `max` connections on `url` whose socket writes are counted. */
export function countedSql(url: string, max: number): CountedSql {
  const trips: RoundTrips = { count: 0 };
  const options = { max, onnotice: () => {}, idle_timeout: 0, socket: countedSocket(url, trips) };
  const sql = postgres(url, options as postgres.Options<Record<string, postgres.PostgresType>>);
  return { sql, trips };
}

/** Open all `n` connections of a pool now (concurrent queries force postgres.js to open them). */
export async function openConnections(sql: postgres.Sql, n: number): Promise<void> {
  await Promise.all(Array.from({ length: n }, () => sql.unsafe('select pg_sleep(0.02)')));
}
