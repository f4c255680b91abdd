import { type Isolation, inTransaction, type Runner, type TransactionOptions } from './driver/index.js';
import type { HandleOf } from './handles.js';

export type { Isolation, Runner, TransactionOptions };

/**
 * Run `fn` in a transaction on any runner, with pgcoord's connection-loss guarantees: if the
 * connection dies, this rejects with {@link ConnectionLostError} and no statement of the
 * transaction is sent anywhere else (postgres.js 3.4.9's own `sql.begin` cannot promise that).
 * Given a transaction, it joins it.
 *
 * @example
 * await transaction(sql, async (tx) => { await tx`update accounts set ...` }, { isolation: 'serializable' });
 */
export function transaction<R extends Runner, T>(
  runner: R,
  fn: (tx: HandleOf<R>) => Promise<T> | T,
  options: TransactionOptions = {},
): Promise<T> {
  return inTransaction<HandleOf<R>, T>(runner, options, (scope) => scope.call(fn));
}
