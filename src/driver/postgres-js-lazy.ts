// pgcoord's own transaction on postgres.js whose connection is reserved only when its first
// statement is sent: the phases of idempotency's phased mode await a payment gateway before they
// write, and must not hold a pooled connection meanwhile (see src/driver/index.ts,
// inLazyTransaction).

import { ConnectionLostError } from '../errors.js';
import { abortedBy, finish, Loss, noop, ownScope, type TxState } from './lifecycle.js';
import {
  builders,
  callWith,
  type Fn,
  guardedHandle,
  owners,
  PgjsConn,
  type PgjsPin,
  type PgjsQuery,
  type PgjsVersion,
  reservePin,
  savepointOn,
  senders,
  type Unsafe,
} from './postgres-js.js';
import type { Conn, Row, Scope, SendOptions, Statement } from './types.js';

/** {@link PgjsPool.lazyTransaction}: `transaction` with the connection reserved at the first statement. */
export function lazyTransaction<T>(
  sql: Fn,
  version: PgjsVersion,
  drizzleDb: Record<string, unknown> | undefined,
  begin: string,
  body: (scope: Scope<unknown>) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  const loss = new Loss();
  let pin: PgjsPin | undefined;
  let conn: PgjsConn | undefined;
  let real: Fn | undefined;
  let reserving: Promise<PgjsConn> | undefined;
  let over = false;
  // The connection, reserved on the first statement. One that arrives after the transaction
  // ended (nothing was sent on it) goes straight back.
  const reserve = (): Promise<PgjsConn> => {
    if (conn) return Promise.resolve(conn);
    if (over) return Promise.reject(new ConnectionLostError('this pgcoord transaction has already ended'));
    if (!reserving) {
      reserving = reservePin(sql, version, signal, loss).then((p) => {
        if (over) {
          p.release();
          throw new ConnectionLostError('this pgcoord transaction has already ended');
        }
        pin = p;
        conn = new PgjsConn(p.raw, true, loss, p, begin);
        return conn;
      });
      reserving.catch(noop); // its failure reaches whoever asked for the connection
    }
    return reserving;
  };
  const ready = (): Promise<Fn> =>
    reserve().then((c) => {
      real ??= guardedHandle(pin as PgjsPin, c);
      return real;
    });
  const lazy = new LazyConn(loss, reserve, () => conn);
  const handle = lazyHandle(sql, ready, () => real, lazy);
  owners.set(handle, lazy);
  const scope = ownScope<unknown>(lazy, (fn) => {
    return callWith(drizzleDb, handle, fn);
  });
  return finish(
    lazy,
    loss,
    () => body(scope),
    (text) => ((pin as PgjsPin).raw.unsafe as Unsafe)(text),
    (poisoned) => {
      over = true;
      pin?.release(poisoned);
    },
  );
}

// pgcoord's own transaction whose connection is reserved on its first statement: every call waits
// for the reservation, then goes to the reserved connection's view. `sent` / `ended` (for finish())
// are false until then: nothing to commit or roll back.
class LazyConn implements Conn, TxState {
  readonly own = true;
  // (a plan's writes are awaited one by one: a COMMIT behind them must not overtake a reservation)
  readonly pipelines = false;

  constructor(
    readonly loss: Loss,
    readonly reserve: () => Promise<PgjsConn>,
    readonly current: () => PgjsConn | undefined,
  ) {}

  get lost(): AbortSignal {
    return this.loss.signal;
  }

  get sent(): boolean {
    return this.current()?.sent ?? false;
  }

  get ended(): boolean {
    return this.current()?.ended ?? false;
  }

  send(statements: readonly Statement[], signal?: AbortSignal, options?: SendOptions): Promise<Row[][]> {
    if (signal?.aborted) return Promise.reject(abortedBy(signal));
    return this.reserve().then((c) => c.send(statements, signal, options));
  }

  sendThen(statements: readonly Statement[], then: () => PromiseLike<unknown>, signal?: AbortSignal): Promise<unknown[]> {
    if (signal?.aborted) return Promise.reject(abortedBy(signal));
    return this.reserve().then((c) => c.sendThen(statements, then, signal));
  }

  // (queries issued before it wait for the same reservation, and go out first)
  commitAfter(pending: readonly PromiseLike<unknown>[]): Promise<unknown[]> {
    return this.reserve().then((c) => c.commitAfter(pending));
  }

  attempt<T>(fn: (conn: Conn) => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(abortedBy(signal));
    return fn(this);
  }
}

type Built = { query: PgjsQuery };

function method(b: Built, name: string, args: unknown[]): unknown {
  return (b.query as unknown as Record<string, (...a: unknown[]) => unknown>)[name]?.(...args);
}

// A statement issued through a lazy transaction's handle before its connection is reserved: it
// records what is asked of it (values(), raw(), ...), reserves the connection when it is awaited
// or executed, and then runs as the real statement on the reserved handle.
class LazyQuery implements PromiseLike<unknown> {
  #steps: [string, unknown[]][] = [];
  #built: Promise<Built> | undefined;

  constructor(
    readonly ready: () => Promise<Fn>,
    readonly make: (handle: Fn) => unknown,
  ) {}

  /** The real query on `handle`, with the recorded modifiers, not executed. */
  build(handle: Fn): PgjsQuery {
    let query = this.make(handle) as Record<string, (...a: unknown[]) => unknown>;
    for (const [name, args] of this.#steps) query = (query[name] as (...a: unknown[]) => typeof query).apply(query, args);
    return query as unknown as PgjsQuery;
  }

  #start(): Promise<Built> {
    // boxed: a query is a thenable, which a promise would run and unwrap
    this.#built ??= this.ready().then((h) => ({ query: this.build(h) }));
    return this.#built;
  }

  #step(name: string, args: unknown[]): this {
    this.#steps.push([name, args]);
    return this;
  }

  values(...a: unknown[]): this {
    return this.#step('values', a);
  }
  raw(...a: unknown[]): this {
    return this.#step('raw', a);
  }
  simple(...a: unknown[]): this {
    return this.#step('simple', a);
  }
  describe(...a: unknown[]): this {
    return this.#step('describe', a);
  }
  transform(...a: unknown[]): this {
    return this.#step('transform', a);
  }
  signal(...a: unknown[]): this {
    return this.#step('signal', a);
  }

  execute(): this {
    this.#start().then((b) => b.query.execute(), noop);
    return this;
  }

  cancel(): Promise<unknown> {
    return this.#start().then((b) => b.query.cancel());
  }

  forEach(...a: unknown[]): Promise<unknown> {
    return this.#start().then((b) => method(b, 'forEach', a));
  }

  readable(): Promise<unknown> {
    return this.#start().then((b) => method(b, 'readable', []));
  }

  writable(): Promise<unknown> {
    return this.#start().then((b) => method(b, 'writable', []));
  }

  cursor(...a: unknown[]): unknown {
    const cursor = (b: Built) => method(b, 'cursor', a);
    if (typeof a[a.length - 1] === 'function') return this.#start().then(cursor);
    let iterator: AsyncIterator<unknown> | undefined;
    const open = async () => {
      iterator ??= (cursor(await this.#start()) as AsyncIterable<unknown>)[Symbol.asyncIterator]();
      return iterator;
    };
    return {
      [Symbol.asyncIterator]: () => ({
        next: async () => (await open()).next(),
        return: async (value?: unknown) => (iterator?.return ? iterator.return(value) : ({ done: true, value } as IteratorResult<unknown>)),
      }),
    };
  }

  // biome-ignore lint/suspicious/noThenProperty: it stands for a postgres.js query, which is a thenable
  then<A = unknown, B = never>(
    onfulfilled?: ((value: unknown) => A | PromiseLike<A>) | null,
    onrejected?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    return this.#start()
      .then((b) => b.query)
      .then(onfulfilled, onrejected);
  }

  catch<B = never>(onrejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<unknown> {
    return this.then(undefined, onrejected);
  }

  finally(onfinally?: (() => void) | null): Promise<unknown> {
    return this.then().finally(onfinally);
  }
}

// The handle a callback gets in a lazy transaction: before the connection is reserved, its
// statements are LazyQuery objects (the first one awaited or executed reserves it), its value
// builders are the pool's (they need no connection); once reserved, it is the reserved handle.
function lazyHandle(pool: Fn, ready: () => Promise<Fn>, current: () => Fn | undefined, conn: Conn): Fn {
  const statement = (make: (h: Fn) => unknown): unknown => {
    const h = current();
    return h ? make(h) : new LazyQuery(ready, make);
  };
  const handle = ((...args: unknown[]) => {
    const first = args[0] as { raw?: unknown } | undefined;
    if (Array.isArray(first) && Array.isArray(first.raw)) return statement((h) => h(...args));
    return (current() ?? pool)(...args); // a helper (identifier, values list): no connection needed
  }) as Fn;
  for (const key of builders) if (key in pool) handle[key] = pool[key];
  for (const key of senders)
    if (typeof pool[key] === 'function')
      handle[key] = (...args: unknown[]) =>
        statement((h) => {
          // a batch made before the reservation holds lazy statements: their real ones, unsent
          const list = key === 'batch' && Array.isArray(args[0]) ? [args[0].map((x) => (x instanceof LazyQuery ? x.build(h) : x))] : args;
          return (h[key] as Fn)(...list);
        });
  handle.savepoint = savepointOn(handle, conn);
  return handle;
}
