// Which adapter a runner gets, from what the instance has (never from a package version: an app
// may carry several copies of a driver). Adapters are kept per runner object.

import { UnsupportedRunnerError } from '../errors.js';
import { isDrizzle } from './drizzle.js';
import { isCallerTransaction, PgClient, PgPool } from './node-postgres.js';
import { type Fn, isPgjs4, PgjsJoined, PgjsPool, pgjsUnsupported } from './postgres-js.js';
import { postgresJs3 } from './postgres-js-3.js';
import { postgresJs4 } from './postgres-js-4.js';
import type { Adapter } from './types.js';

type AnyObj = Record<string, unknown>;

const adapters = new WeakMap<object, Adapter>();

/** The adapter for `runner`; throws {@link UnsupportedRunnerError} for anything else. */
export function adapterOf(runner: unknown): Adapter {
  if (runner === null || (typeof runner !== 'object' && typeof runner !== 'function')) {
    throw new UnsupportedRunnerError(
      `expected a postgres.js sql, a pg Pool/Client or a drizzle db/tx, got ${runner === null ? 'null' : typeof runner}`,
    );
  }
  let adapter = adapters.get(runner);
  if (!adapter) {
    adapter = detect(runner as AnyObj, runner);
    adapters.set(runner, adapter);
  }
  return adapter;
}

function detect(r: AnyObj, handle: unknown, drizzle?: AnyObj): Adapter {
  if (isDrizzle(r)) {
    if (drizzle) throw new UnsupportedRunnerError('a drizzle db over a drizzle db');
    const session = r.session as AnyObj;
    if (typeof r.rollback === 'function') {
      // a drizzle transaction: join it through its driver handle, giving callbacks the drizzle tx
      const inner = detect(session.client as AnyObj, r);
      if (inner instanceof PgjsJoined || inner instanceof PgClient) return inner;
      throw new UnsupportedRunnerError('drizzle transaction over an unknown driver');
    }
    const client = (r.$client ?? session.client) as AnyObj | undefined;
    if (!client) throw new UnsupportedRunnerError('drizzle database over an unknown driver');
    return detect(client, client, r);
  }
  const f = r as Fn;
  if (typeof f === 'function' && typeof f.unsafe === 'function') {
    if (typeof f.savepoint === 'function') return new PgjsJoined(f, handle);
    if (typeof f.begin === 'function' && typeof f.reserve === 'function')
      return new PgjsPool(f, isPgjs4(f) ? postgresJs4 : postgresJs3, drizzle);
    pgjsUnsupported();
  }
  if (typeof r.query === 'function') {
    if ('idleCount' in r && typeof r.connect === 'function') return new PgPool(r, drizzle);
    if (typeof r.getTransactionStatus === 'function' || '_txStatus' in r) return new PgClient(r, handle, drizzle);
  }
  throw new UnsupportedRunnerError('expected a postgres.js sql, a pg Pool/Client or a drizzle db/tx');
}

/** True when `runner` is a transaction (pgcoord joins it) rather than a pool or an idle client. */
export function isTransaction(runner: unknown): boolean {
  const a = adapterOf(runner);
  return a instanceof PgjsJoined || (a instanceof PgClient && isCallerTransaction(a.client));
}

/** True when `runner` can give a connection of its own (a pool, or a drizzle db over one). */
export function isPool(runner: unknown): boolean {
  const a = adapterOf(runner);
  return a instanceof PgjsPool || a instanceof PgPool;
}
