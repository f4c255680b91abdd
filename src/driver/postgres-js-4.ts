// postgres.js 4.x: public API only. 4.x rejects any statement sent on a closed or released
// reserved connection (no crash, no statement on another socket), closes a reserved connection
// released inside a transaction, and takes a waiting `reserve()` back when its signal aborts.
//
// What pgcoord still has to learn is *when* its connection closes, so that a plan deciding in the
// callback, or a session lock, knows at once (not at its next statement). 4.x publishes each close
// on the `postgres:pool` diagnostics channel with the connection's id and the FATAL error as
// `cause`. Which connection a pin got is told by the backend behind it (every result's `state`
// has its pid and cancel secret); the id of a connection met for the first time is read once from
// the `postgres:query` tracing channel's context of a statement marked with a unique comment (its
// `connection` field, set when it is written). That statement is sent unprepared, so the unique
// text costs no prepared statement, and the query channel is subscribed only while it starts.

import dc from 'node:diagnostics_channel';
import { ConnectionLostError, isConnectionLost } from '../errors.js';
import { noop } from './lifecycle.js';
import type { Fn, PgjsPin, PgjsQuery, PgjsVersion } from './postgres-js.js';

interface QueryContext {
  query: string | null;
  connection: number | null;
  host: string | null;
  port: number | null;
  database: string;
}

interface PoolEvent {
  event: string;
  connection: number | null;
  host: string | null;
  port: number | null;
  database: string;
  error?: unknown;
}

interface Connection4 {
  id: number;
  host: string | null;
  port: number | null;
  database: string;
}

interface Watch4 {
  connection?: Connection4;
}

const START = 'tracing:postgres:query:start';

// The connection (id and address) behind each backend pgcoord has met, keyed by the backend's pid
// and cancel secret (together unique to one backend), and back: learned once per connection.
const connectionOf = new Map<string, Connection4>();
const backendOf = new Map<number, string>();
const ambiguous = new Set<string>();
// Statements sent to learn a connection's id, waiting for their query context, by their text.
const learning = new Map<string, (ctx: QueryContext) => void>();
// Pins by the id of their connection.
const byConnection = new Map<number, Set<PgjsPin>>();
let seq = 0;
let poolSubscribed = false;

function onStart(message: unknown): void {
  const ctx = message as QueryContext;
  const learnt = ctx.query ? learning.get(ctx.query) : undefined;
  if (learnt) learnt(ctx);
}

// ids are per copy of the driver: the address tells two copies' connections apart
const same = (c: Connection4, e: PoolEvent) => c.host === e.host && c.port === e.port && c.database === e.database;

function onPool(message: unknown): void {
  const e = message as PoolEvent;
  if (e.event !== 'close' || e.connection === null) return;
  const backend = backendOf.get(e.connection);
  const known = backend === undefined ? undefined : connectionOf.get(backend);
  if (backend !== undefined && (!known || same(known, e))) {
    backendOf.delete(e.connection);
    if (known?.id === e.connection) connectionOf.delete(backend);
  }
  const pins = byConnection.get(e.connection);
  if (!pins) return;
  for (const pin of pins) {
    const c = (pin.watch as Watch4).connection;
    if (c && same(c, e)) pin.loss.abort(new ConnectionLostError(undefined, { cause: e.error }));
  }
}

// From now on a close of `connection` aborts the pin's loss.
function register(pin: PgjsPin, connection: Connection4): void {
  if (pin.released) return;
  (pin.watch as Watch4).connection = connection;
  const pins = byConnection.get(connection.id) ?? new Set<PgjsPin>();
  byConnection.set(connection.id, pins);
  pins.add(pin);
}

// A backend met for the first time: one statement, sent unprepared with a unique comment while the
// query channel is subscribed, gives its connection's id (its context's `connection`, set when it
// is written). It is a `select 1` on the pin's own connection, harmless wherever it lands.
function learn(pin: PgjsPin, backend: string): void {
  if (pin.released || pin.loss.aborted) return;
  const tagged = `select 1 /* pgcoord ${++seq} */`;
  let ctx: QueryContext | undefined;
  if (learning.size === 0) dc.subscribe(START, onStart);
  learning.set(tagged, (c) => {
    ctx = c;
  });
  const done = () => {
    if (learning.delete(tagged) && learning.size === 0) dc.unsubscribe(START, onStart);
  };
  (pin.raw.unsafe as (t: string, p: unknown[], o: object) => PgjsQuery)(tagged, [], { prepare: false }).then(
    () => {
      done();
      if (typeof ctx?.connection !== 'number') return;
      const connection = { id: ctx.connection, host: ctx.host, port: ctx.port, database: ctx.database };
      // A server (or something between) that gives two connections the same pid and secret: that
      // backend key names no connection, and is learnt anew each time.
      const before = connectionOf.get(backend);
      if (ambiguous.has(backend) || (before && before.id !== connection.id)) {
        ambiguous.add(backend);
        connectionOf.delete(backend);
      } else {
        connectionOf.set(backend, connection);
        backendOf.set(connection.id, backend);
      }
      register(pin, connection);
    },
    // The connection closed before this statement's answer came: the close event may have gone by
    // before its id was known, so this rejection is the notice. 4.x rejects a statement sent on a
    // closed reservation, and one in flight when it closes, with the close's error.
    (err: unknown) => {
      done();
      if (isConnectionLost(err)) pin.loss.abort(new ConnectionLostError(undefined, { cause: err }));
    },
  );
}

export const postgresJs4: PgjsVersion = {
  name: 'postgres.js 4',

  reserve(sql: Fn, signal: AbortSignal | undefined): Promise<Fn> {
    const leasing = (sql.reserve as () => Promise<Fn> & { signal(s: AbortSignal | undefined): Promise<Fn> })();
    return signal ? leasing.signal(signal) : leasing;
  },

  // The first statement goes out as it is; its result's backend (pid and cancel secret, public on
  // every result) names the connection when pgcoord has met it before, else it is learnt.
  capture(pin: PgjsPin, text: string): PgjsQuery {
    if (!poolSubscribed) {
      poolSubscribed = true;
      dc.subscribe('postgres:pool', onPool);
    }
    pin.watch = {} satisfies Watch4;
    const q = (pin.raw.unsafe as (t: string, p: unknown[], o: object) => PgjsQuery)(text, [], { prepare: true });
    q.then((result) => {
      const state = (result as { state?: { pid?: number; secret?: number } }).state;
      if (!state?.pid) return;
      const backend = `${state.pid}:${state.secret}`;
      const known = ambiguous.has(backend) ? undefined : connectionOf.get(backend);
      if (known) register(pin, known);
      else learn(pin, backend);
    }, noop);
    return q;
  },

  forget(pin: PgjsPin): void {
    const id = (pin.watch as Watch4 | undefined)?.connection?.id;
    if (id === undefined) return;
    const pins = byConnection.get(id);
    pins?.delete(pin);
    if (pins?.size === 0) byConnection.delete(id);
  },

  // 4.x sends no cancel for a query whose result has arrived, and holds one for a query queued
  // behind another until its turn comes.
  cancel(query: PgjsQuery): Promise<unknown> {
    return Promise.resolve(query.cancel());
  },

  // 4.x keeps a closed reservation until it is released.
  gone(pin: PgjsPin): void {
    (pin.raw.release as () => void)();
  },

  // The session ends itself: the server releases whatever it held, and 4.x sees an ordinary FATAL
  // close and connects anew for the next caller. The reservation is given back once the statement
  // settled, or after a second at most (a backend that does not answer): 4.x refuses statements on
  // a released reservation, and closes one released with a statement in flight once it ends.
  drop(pin: PgjsPin): void {
    const release = () => {
      clearTimeout(timer);
      (pin.raw.release as () => void)();
    };
    const timer = setTimeout(release, 1000);
    timer.unref();
    (pin.raw.unsafe as (t: string) => PgjsQuery)('select pg_terminate_backend(pg_backend_pid())').then(release, release);
  },
};
