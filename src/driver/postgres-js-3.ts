// postgres.js 3.4: what pgcoord must do around it. This file relies on two internals of 3.4, and
// test/driver-internals.test.ts fails when they change:
// - the `onexecute` query option, called with the driver's connection object when a query is
//   handed to it;
// - that connection's `onclose` field, which the pool calls synchronously inside the socket's close
//   handler, before any promise continuation.
//
// 3.4.9 and 3.4.10 cannot be trusted with a connection that dies (porsager/postgres #1066, #1154,
// #1208, #1216): a statement sent through a `sql.begin` or `sql.reserve()` handle after a close
// writes to a null socket (the process exits) or runs, outside any transaction, on the reconnected
// socket. pgcoord ships a patch (patches/) and learns of every close at once, so it never sends on
// a dead connection itself.

import { ConnectionLostError } from '../errors.js';
import { noop } from './lifecycle.js';
import type { Fn, PgjsPin, PgjsQuery, PgjsVersion } from './postgres-js.js';

interface Connection3 {
  onclose: ((err: unknown) => void) | null;
}

interface Watch3 {
  connection: Connection3 | undefined;
  onclose: (err: unknown) => void;
}

interface Reservation {
  ms: number;
  deadline: number;
  late: boolean;
  /** True while pgcoord holds every connection of the pool (the wait is a queue, not a loss). */
  busy(): boolean;
  reject(err: unknown): void;
}

// Connections pgcoord holds reserved, per pool.
const held = new WeakMap<object, number>();
const hold = (pool: object, n: number) => held.set(pool, (held.get(pool) ?? 0) + n);

// 3.4 can lose a reservation request when its connection attempt fails (seen after a server
// restart): the promise never settles. A request still pending after the pool's connect_timeout
// (default 30 s) is given up; one that arrives after that is handed straight back. A request that
// waits because pgcoord itself holds every connection of the pool is not lost, only queued: its
// deadline moves on instead. One coarse (1 s) watchdog for all of them instead of a timer each.
const reservations = new Set<Reservation>();
let watchdog: NodeJS.Timeout | undefined;
function watch(entry: Reservation): void {
  reservations.add(entry);
  if (watchdog) return;
  watchdog = setInterval(() => {
    const now = performance.now();
    for (const r of reservations) {
      if (r.deadline > now) continue;
      if (r.busy()) {
        r.deadline = now + r.ms;
        continue;
      }
      reservations.delete(r);
      r.late = true;
      r.reject(new ConnectionLostError(`no database connection within ${r.ms} ms (connect_timeout); nothing was run`));
    }
    if (reservations.size === 0) {
      clearInterval(watchdog);
      watchdog = undefined;
    }
  }, 1000);
  watchdog.unref();
}

export const postgresJs3: PgjsVersion = {
  name: 'postgres.js 3',

  reserve(sql: Fn, signal: AbortSignal | undefined): Promise<Fn> {
    const seconds = Number((sql.options as { connect_timeout?: unknown } | undefined)?.connect_timeout ?? 30);
    const ms = Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 30_000;
    const pending = (sql.reserve as () => Promise<Fn>)();
    return new Promise<Fn>((resolve, reject) => {
      const max = Number((sql.options as { max?: unknown } | undefined)?.max ?? 10);
      const busy = () => (held.get(sql) ?? 0) >= max;
      const entry: Reservation = { ms, deadline: performance.now() + ms, late: false, busy, reject };
      watch(entry);
      // 3.4 cannot take a reservation request back: an abort leaves it queued, and the connection
      // it gets later goes straight back to the pool
      const onAbort = () => {
        reservations.delete(entry);
        entry.late = true;
        reject(signal?.reason);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      pending.then(
        (reserved) => {
          reservations.delete(entry);
          signal?.removeEventListener('abort', onAbort);
          if (entry.late) (reserved.release as () => void)();
          else {
            hold(sql, 1);
            resolve(reserved);
          }
        },
        (err: unknown) => {
          reservations.delete(entry);
          signal?.removeEventListener('abort', onAbort);
          reject(err);
        },
      );
    });
  },

  // On a freshly reserved connection nothing is in flight, so postgres.js always calls onexecute
  // for this first statement (it skips it only past its pipeline limit, #1189).
  capture(pin: PgjsPin, text: string): PgjsQuery {
    const w: Watch3 = {
      connection: undefined,
      onclose: (err: unknown) => pin.loss.abort(new ConnectionLostError(undefined, { cause: err })),
    };
    pin.watch = w;
    const onexecute = (c: Connection3) => {
      w.connection = c;
      c.onclose = w.onclose;
      return true; // "ready for more": lets the next statements pipeline behind this one
    };
    return (pin.raw.unsafe as (t: string, p: unknown[], o: object) => PgjsQuery)(text, [], { onexecute });
  },

  forget(pin: PgjsPin): void {
    hold(pin.pool, -1);
    const w = pin.watch as Watch3 | undefined;
    if (w?.connection?.onclose === w?.onclose && w?.connection) w.connection.onclose = null;
  },

  // 3.4 sends a cancel for a pipelined query that is not the active one later, when it becomes
  // active on the client, which can be after the server finished it (the cancel then hits the next
  // statement), and its bookkeeping skips that query. So pgcoord cancels only the active query
  // (an internal flag, `query.active`, pinned by test/driver-internals.test.ts).
  cancel(query: PgjsQuery): Promise<unknown> | undefined {
    return (query as PgjsQuery & { active?: boolean }).active ? Promise.resolve(query.cancel()) : undefined;
  },

  // 3.4's pool takes a closed reserved connection back by itself: a release() now would hand the
  // slot out twice.
  gone(): void {},

  // Never back to the pool, and never release()d: 3.4's release() puts the connection back among
  // the open ones even when its socket is gone, and the pool then hands a dead connection to the
  // next reservation. The backend's session is ended instead (releasing whatever it holds); the
  // pool sees an ordinary close, which also frees the reservation. Another connection of the pool
  // ends it, or, on a one-connection pool (no other connection to ask), the session itself.
  drop(pin: PgjsPin): void {
    const pid = (pin.captured as { state?: { pid?: number | null } } | undefined)?.state?.pid;
    const max = Number((pin.pool.options as { max?: unknown } | undefined)?.max ?? 10);
    const send = (sql: Fn, text: string, params: unknown[]) =>
      (sql.unsafe as (t: string, p: unknown[]) => PgjsQuery)(text, params).then(noop, noop);
    if (pid && max > 1) send(pin.pool, 'select pg_terminate_backend($1)', [pid]);
    else send(pin.raw, 'select pg_terminate_backend(pg_backend_pid())', []);
  },
};
