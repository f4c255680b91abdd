import { performance } from 'node:perf_hooks';
import {
  type LockOptions,
  lockContext,
  lockError,
  lockRequest,
  lockStatements,
  outcomeOf,
  poolWait,
  timeoutStatements,
  tryOptions,
} from './advisory.js';
import { type PinnedConn, pinConnection, type Runner, type Statement } from './driver/index.js';
import { InvalidOptionError, LockLostError, LockNotAcquiredError, LockTimeoutError, TransactionPoolingError } from './errors.js';
import { publish } from './events.js';
import type { LockKeyInput } from './keys.js';
import { describe } from './text.js';
import { holdSite, publishLost, traced, watchHold } from './trace.js';

/** Options for a session lock. */
export interface SessionLockOptions extends LockOptions {
  /**
   * How often to probe the pinned connection while the lock is held (default 5000 ms; 0 turns the
   * probe off and leaves only the close event). A probe that fails, does not answer within the
   * same period, or answers from another backend aborts `signal`.
   */
  keepaliveMs?: number;
}

/** A held session lock. Release it (or `await using` it); watch `signal` while working. */
export interface SessionLock extends AsyncDisposable {
  /** The keys held, as labels. */
  readonly keys: readonly string[];
  /** Backend pid of the pinned connection that holds the lock. */
  readonly pid: number;
  /**
   * Aborted (reason: {@link LockLostError}) the moment the lock may no longer be held: the
   * connection closed, or the keepalive probe failed. Stop the protected work when it fires.
   */
  readonly signal: AbortSignal;
  /** Unlock and return the connection to the pool (or close it when the unlock cannot be confirmed). */
  release(): Promise<void>;
}

/**
 * Take session-scoped advisory locks on a connection pinned from `pool`, for work that cannot sit
 * inside one transaction. The connection leaves the pool until `release()`; if the unlock cannot be
 * confirmed, the connection is closed instead of going back (closing a session releases its locks).
 *
 * Refused behind a transaction-mode pooler (the backend pid changes between statements), where a
 * session lock would silently be shared: use {@link withLock} there.
 *
 * @throws {@link LockNotAcquiredError} (`timeoutMs: 0`), {@link LockTimeoutError},
 * {@link AbortedError}, {@link TransactionPoolingError}, {@link ConnectionLostError}.
 *
 * @example
 * await using lock = await acquireSessionLock(sql, 'nightly-export', { timeoutMs: 5000 });
 * await exportEverything({ signal: lock.signal }); // long, many transactions
 */
export async function acquireSessionLock(
  pool: Runner,
  keys: readonly LockKeyInput[] | LockKeyInput,
  options: SessionLockOptions = {},
): Promise<SessionLock> {
  return traced('session-lock', lockContext('acquireSessionLock', keys), async () => {
    const lock = await take(pool, keys, options);
    if (!lock) throw new LockNotAcquiredError(lockRequest(keys, options).labels.join(', '));
    return lock;
  });
}

/**
 * Like {@link acquireSessionLock}, but resolves `undefined` when the lock is taken (tries once by
 * default; with `timeoutMs`, when the time passes).
 *
 * @example
 * const lock = await tryAcquireSessionLock(sql, 'leader');
 * if (lock) runAsLeader(lock.signal).finally(() => lock.release());
 */
export async function tryAcquireSessionLock(
  pool: Runner,
  keys: readonly LockKeyInput[] | LockKeyInput,
  options: SessionLockOptions = {},
): Promise<SessionLock | undefined> {
  return traced('session-lock', lockContext('tryAcquireSessionLock', keys), async (ctx) => {
    let lock: SessionLock | undefined;
    try {
      lock = await take(pool, keys, tryOptions(options));
    } catch (err) {
      if (!(err instanceof LockTimeoutError)) throw err;
    }
    if (ctx) ctx.outcome = lock ? 'acquired' : 'not-acquired';
    return lock;
  });
}

async function take(
  pool: Runner,
  keys: readonly LockKeyInput[] | LockKeyInput,
  options: SessionLockOptions,
): Promise<SessionLock | undefined> {
  const site = holdSite(); // the caller's stack, while hold warnings are on
  let req = lockRequest(keys, options);
  const keepaliveMs = options.keepaliveMs ?? 5000;
  if (typeof keepaliveMs !== 'number' || !Number.isInteger(keepaliveMs) || keepaliveMs < 0 || keepaliveMs > 2_147_483_647) {
    // (a longer timer fires at once in Node: the lock would be reported lost right away)
    throw new InvalidOptionError(`keepaliveMs must be an integer from 0 to 2147483647, got ${describe(keepaliveMs)}`);
  }
  const mode = req.shared ? 'shared' : 'exclusive';
  const asked = performance.now();
  const event = (outcome: string, error?: unknown) =>
    publish('acquire', { keys: req.labels, mode, scope: 'session', outcome, waitMs: performance.now() - asked, error });
  const wait = poolWait(req);
  const pin = await pinConnection(pool, wait.signal).catch((err: unknown) => {
    throw wait.timedOut(err);
  });
  req = wait.left();
  const tryOnly = req.timeoutMs === 0;
  const fn = `pg${tryOnly ? '_try' : ''}_advisory_lock${req.shared ? '_shared' : ''}`;
  const locks = lockStatements(req, fn);
  // A session lock taken inside a transaction outlives it; the transaction only scopes the
  // lock_timeout setting. The pid is read inside that transaction and after it, and compared with
  // the pin's, so a transaction-mode pooler (another backend per transaction) shows itself.
  const timed = req.timeoutMs ? timeoutStatements(req.timeoutMs) : undefined;
  //
  // Behind such a pooler, statements after COMMIT may reach yet another backend, so an unlock sent
  // later could miss the one holding the locks: a backend that is not the pinned one unlocks them
  // in the same transaction that took them.
  const statements: Statement[] = [
    { text: 'begin' },
    ...(timed ? [timed.before] : []),
    ...locks,
    {
      text: 'select pg_backend_pid()::int as pid, case when pg_backend_pid() <> $1::int then (select 1 from (select pg_advisory_unlock_all()) u) end as unlocked',
      params: [pin.pid],
    },
    { text: 'commit' },
    { text: 'select pg_backend_pid()::int as pid' },
  ];
  let rows: Record<string, unknown>[][];
  try {
    rows = await pin.conn.send(statements, req.signal);
  } catch (err) {
    // Postgres can grant a lock and still raise lock_timeout (or the cancel) in the same instant,
    // and a session lock survives the rollback: clear every lock on this connection (it is ours
    // alone) before it goes back to the pool, or close it.
    await cleanup(pin, true);
    const mapped = lockError(err, req);
    event(outcomeOf(mapped), mapped);
    throw mapped;
  }
  const first = 1 + (timed ? 1 : 0);
  const ok = rows.slice(first, first + locks.length).every((r) => r[0]?.ok !== 'false');
  // The backend that took the lock (inside the transaction) and the one answering afterwards
  // must both be the pinned one.
  const pidHolding = Number(rows[rows.length - 3]?.[0]?.pid);
  const pidAfter = Number(rows[rows.length - 1]?.[0]?.pid);
  if (pidHolding !== pin.pid || pidAfter !== pin.pid) {
    await cleanup(pin, true);
    event('error');
    throw new TransactionPoolingError();
  }
  if (!ok) {
    await cleanup(pin, true);
    event('not-acquired');
    return undefined;
  }
  event('acquired');
  return held(pin, req.labels, mode, keepaliveMs, performance.now() - asked, site);
}

// Unlock everything this dedicated connection holds and give it back; close it if that fails.
async function cleanup(pin: PinnedConn, rollbackFirst: boolean): Promise<boolean> {
  if (pin.lost.aborted) {
    pin.release(true);
    return false;
  }
  try {
    await pin.conn.send([...(rollbackFirst ? [{ text: 'rollback' }] : []), { text: 'select pg_advisory_unlock_all()' }]);
    pin.release(false);
    return true;
  } catch {
    pin.release(true);
    return false;
  }
}

function held(
  pin: PinnedConn,
  labels: string[],
  mode: 'exclusive' | 'shared',
  keepaliveMs: number,
  waitMs: number,
  site: string | undefined,
): SessionLock {
  const controller = new AbortController();
  const endHold = watchHold('session-lock', () => labels, site);
  const grantedAt = performance.now();
  const label = labels.join(', ');
  let released: Promise<void> | undefined;
  let timer: NodeJS.Timeout | undefined;
  const lose = (cause: unknown) => {
    if (controller.signal.aborted || released) return;
    controller.abort(new LockLostError(label, { cause }));
    clearTimeout(timer);
    endHold();
    pin.release(true); // the lock may still be held by a live backend: closing the session frees it
    publish('release', {
      keys: labels,
      mode,
      scope: 'session',
      outcome: 'lost',
      waitMs,
      holdMs: performance.now() - grantedAt,
      error: cause,
    });
    publishLost(() => ({ kind: 'session-lock', keys: labels, reason: 'lost' }));
  };
  const onLost = () => lose(pin.lost.reason);
  pin.lost.addEventListener('abort', onLost, { once: true });
  // The probe is a plain query on the pinned connection (no pg_sleep, so it does not pollute query
  // statistics with long-running statements); it also catches a pooler swapping the backend.
  const probe = async () => {
    const answer = pin.conn.send([{ text: 'select pg_backend_pid()::int as pid' }]);
    let slow: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      slow = setTimeout(() => reject(new Error(`keepalive probe got no answer within ${keepaliveMs} ms`)), keepaliveMs);
    });
    try {
      const [[row]] = (await Promise.race([answer, deadline])) as [Record<string, unknown>[]];
      if (Number(row?.pid) !== pin.pid) throw new TransactionPoolingError();
      if (!controller.signal.aborted && !released) schedule();
    } catch (err) {
      answer.catch(() => {});
      lose(err);
    } finally {
      clearTimeout(slow);
    }
  };
  const schedule = () => {
    if (keepaliveMs === 0) return;
    timer = setTimeout(probe, keepaliveMs);
    timer.unref();
  };
  schedule();
  const release = () => {
    released ??= (async () => {
      clearTimeout(timer);
      endHold();
      pin.lost.removeEventListener('abort', onLost);
      if (controller.signal.aborted) return;
      const ok = await cleanup(pin, false);
      publish('release', {
        keys: labels,
        mode,
        scope: 'session',
        outcome: ok ? 'released' : 'error',
        waitMs,
        holdMs: performance.now() - grantedAt,
      });
    })();
    return released;
  };
  const lock: SessionLock = {
    keys: labels,
    pid: pin.pid,
    signal: controller.signal,
    release,
    [Symbol.asyncDispose]: release,
  };
  // A handle dropped without release() (lost in a failed code path) would keep its connection and
  // its lock until the process exits: once it is garbage, its session is ended (as DistributedLock
  // does for abandoned handles). The registry holds only `abandon`, never the handle.
  abandoned.register(lock, () => {
    clearTimeout(timer);
    endHold();
    if (!released && !controller.signal.aborted) pin.release(true);
  });
  return lock;
}

const abandoned = new FinalizationRegistry<() => void>((abandon) => abandon());
