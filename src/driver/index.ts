// The driver seam as features use it: a transaction (pgcoord's own or the caller's, joined), one
// statement on its own, a pinned connection. Every feature goes through these; which driver is
// behind them is the adapters' business (detect.ts).

import {
  CommitUnknownError,
  ConnectionLostError,
  InvalidOptionError,
  isConnectFailure,
  isConnectionLost,
  UnsupportedRunnerError,
} from '../errors.js';
import { adapterOf } from './detect.js';
import { abortedBy, beginText, noConnection } from './lifecycle.js';
import type { Listening, PinnedConn, Row, Runner, Scope, Statement, TransactionOptions } from './types.js';

export { adapterOf, isPool, isTransaction } from './detect.js';
export { withCancel } from './drizzle.js';
export { commitWith } from './lifecycle.js';
export type * from './types.js';

/** Check a runner early (for constructors and the CLI); throws {@link UnsupportedRunnerError}. */
export function assertRunner(runner: unknown): void {
  adapterOf(runner);
}

/**
 * Run `body` inside a transaction on `runner`: pgcoord's own (BEGIN is sent with the first
 * statements, COMMIT after `body`, ROLLBACK on error) or the caller's (joined; nothing is
 * committed or rolled back here). `signal` bounds the wait for a pool connection.
 */
export function inTransaction<H, T>(
  runner: Runner,
  opts: TransactionOptions,
  body: (scope: Scope<H>) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  try {
    const begin = beginText(opts);
    return adapterOf(runner).transaction(begin, body as (scope: Scope<unknown>) => Promise<T>, signal);
  } catch (err) {
    return Promise.reject(err);
  }
}

/**
 * {@link inTransaction} (pgcoord's own transaction, with default options) whose pooled connection
 * is reserved only when the first statement is sent, through `scope.conn` or the handle
 * `scope.call` gives: a callback that awaits something else first (an HTTP call) holds no
 * connection meanwhile. A transaction that never sends a statement never takes one. Given a
 * runner without a pool (a single client, a transaction) it is plain {@link inTransaction}.
 */
export function inLazyTransaction<H, T>(runner: Runner, body: (scope: Scope<H>) => Promise<T>, signal?: AbortSignal): Promise<T> {
  try {
    const adapter = adapterOf(runner);
    const run = body as (scope: Scope<unknown>) => Promise<T>;
    return adapter.lazyTransaction ? adapter.lazyTransaction('begin', run, signal) : adapter.transaction('begin', run, signal);
  } catch (err) {
    return Promise.reject(err);
  }
}

/**
 * Run one data-modifying statement. On a pool (or a single idle client) it runs in autocommit: one
 * statement is atomic on its own, so it needs no BEGIN/COMMIT and no reserved connection (one
 * round trip). In a caller's transaction it joins it, as an attempt (a cancel leaves the caller's
 * transaction usable). An isolation level or read-only option gets pgcoord's own transaction.
 *
 * Outcomes of a lost connection: refused or timed out while connecting = nothing ran
 * (ConnectionLostError); lost while the statement was in flight = it may or may not have committed
 * (CommitUnknownError), unless `reads` (a read commits nothing).
 */
export function runStatement(
  runner: Runner,
  statement: Statement,
  opts: TransactionOptions & { signal?: AbortSignal } = {},
  reads = false,
): Promise<Row[]> {
  let pending: Promise<Row[]> | undefined;
  const { signal } = opts;
  try {
    if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
    const begin = beginText(opts);
    if (signal?.aborted) return Promise.reject(abortedBy(signal));
    const adapter = adapterOf(runner);
    if (opts.isolation === undefined && !opts.readOnly) pending = adapter.autocommit?.(statement, signal);
    if (!pending)
      return adapter.transaction(
        begin,
        (scope) => scope.conn.attempt(async (c) => (await c.send([statement], signal))[0] ?? [], signal),
        signal,
      );
  } catch (err) {
    return Promise.reject(err);
  }
  return pending.then(undefined, (err: unknown) => {
    if (signal?.aborted) throw abortedBy(signal);
    if (isConnectFailure(err)) throw noConnection(err);
    if (!isConnectionLost(err)) throw err;
    if (reads) throw new ConnectionLostError(undefined, { cause: err });
    throw new CommitUnknownError({
      cause: err,
      message: 'database connection lost while an autocommit statement was in flight: it may or may not have committed',
    });
  });
}

/**
 * Pin one connection of a pool (postgres.js `sql`, pg `Pool`, or a drizzle db over either) and
 * learn its backend pid. Transactions and single clients are refused: pinning needs a pool.
 */
export function pinConnection(runner: Runner, signal?: AbortSignal): Promise<PinnedConn> {
  try {
    const adapter = adapterOf(runner);
    if (!adapter.pin)
      throw new UnsupportedRunnerError(
        'session locks pin their own connection: pass a pool (postgres.js sql, pg Pool or a drizzle db), not a transaction or a single client',
      );
    return adapter.pin(signal);
  } catch (err) {
    return Promise.reject(err);
  }
}

/**
 * LISTEN on `channel` on a connection of its own, or undefined when the runner cannot (a
 * transaction, a single client): callers then poll.
 */
export function listen(
  runner: Runner,
  channel: string,
  onPayload: (payload: string) => void,
  onLost: () => void,
): Promise<Listening> | undefined {
  const adapter = adapterOf(runner);
  return adapter.listen?.(channel, onPayload, onLost);
}
