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
 * Open a postgres.js pool of `max` connections on `url` whose socket writes are counted.
 * Only TCP URLs are supported (the bench server is always on a TCP port).
 */
export function countedSql(url: string, max: number): CountedSql {
  const trips: RoundTrips = { count: 0 };
  const u = new URL(url);
  const host = u.hostname || '127.0.0.1';
  const port = Number(u.port || 5432);
  // `socket` is a postgres.js option its type definitions do not declare: it must return a
  // connected socket (postgres.js then skips its own connect).
  const options = {
    max,
    onnotice: () => {},
    idle_timeout: 0,
    socket: () =>
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
      }),
  };
  const sql = postgres(url, options as postgres.Options<Record<string, postgres.PostgresType>>);
  return { sql, trips };
}

/** Open all `n` connections of a pool now (concurrent queries force postgres.js to open them). */
export async function openConnections(sql: postgres.Sql, n: number): Promise<void> {
  await Promise.all(Array.from({ length: n }, () => sql.unsafe('select pg_sleep(0.02)')));
}
