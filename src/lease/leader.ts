// Leader election on a lease: one leader per name, its term is the lease's term and its fence the
// lease's fence. Followers wait on the lease (woken by the leader's release, or at its expiry);
// the leader's signal aborts the moment its term is not safely held; stop() resigns, which wakes a
// follower at once (clean hand-over on shutdown).

import { noop } from '../driver/lifecycle.js';
import type { Runner } from '../driver/types.js';
import { AbortedError, InvalidOptionError } from '../errors.js';
import { acquireLease, checkLeaseOptions, type Lease, type LeaseOptions } from './lease.js';

/** Options of {@link leader}: a lease's, without `timeoutMs` (followers wait as long as it takes). */
export interface LeaderOptions extends Omit<LeaseOptions, 'timeoutMs'> {
  /** Aborting it is `stop()`. */
  signal?: AbortSignal;
  /** Errors of campaigning (a lost connection, ...) and of `onLead`; the campaign goes on. Default: ignored. */
  onError?: (err: unknown) => void;
  /** After `onLead` throws, the leader resigns and waits this long before campaigning again (default `ttlMs`). */
  backoffMs?: number;
}

/** A campaign for leadership, from {@link leader}. */
export interface Leadership extends AsyncDisposable {
  /** The current term's lease while this process leads, else undefined. */
  readonly lease: Lease | undefined;
  /** True while this process leads (its lease's signal has not aborted). */
  readonly isLeader: boolean;
  /** Stop campaigning; a leader resigns (releases its lease: a follower takes over at once). */
  stop(): Promise<void>;
}

const delay = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });

const ended = (a: AbortSignal, b: AbortSignal) => delay(2_147_483_647, AbortSignal.any([a, b]));

/**
 * Campaign for leadership of `name` until stopped. Each time this process becomes leader,
 * `onLead(lease)` runs with the term's lease: do the leader's work under `lease.signal`, and fence
 * its writes with {@link withFence}. Leadership lasts until `stop()` or until the term is lost
 * (then the campaign starts again); `onLead` returning does not end it, throwing does (the leader
 * resigns, waits `backoffMs`, and campaigns again).
 *
 * @example
 * const leadership = leader(sql, 'scheduler', { ttlMs: 15_000 }, async (lease) => {
 *   while (!lease.signal.aborted) await runDueJobs({ signal: lease.signal, fence: lease.fence });
 * });
 * process.on('SIGTERM', () => leadership.stop());
 */
export function leader(runner: Runner, name: string, options: LeaderOptions, onLead: (lease: Lease) => unknown): Leadership {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('leader options must be an object with ttlMs');
  const { signal, onError = noop, backoffMs, ...leaseOptions } = options;
  checkLeaseOptions(name, leaseOptions);
  if (typeof onLead !== 'function') throw new InvalidOptionError('leader needs an onLead callback');
  if (typeof onError !== 'function') throw new InvalidOptionError('onError must be a function');
  if (signal !== undefined && !(signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  if (backoffMs !== undefined && (!Number.isInteger(backoffMs) || backoffMs < 0 || backoffMs > 2_147_483_647))
    throw new InvalidOptionError(`backoffMs must be an integer from 0 to 2147483647, got ${String(backoffMs)}`);
  const report = (err: unknown) => {
    try {
      onError(err);
    } catch {
      // the campaign goes on whatever the error handler does
    }
  };
  const stopper = new AbortController();
  const stopped = signal ? AbortSignal.any([signal, stopper.signal]) : stopper.signal;
  let current: Lease | undefined;

  const campaign = async () => {
    while (!stopped.aborted) {
      let lease: Lease;
      try {
        lease = await acquireLease(runner, name, { ...leaseOptions, signal: stopped });
      } catch (err) {
        if (stopped.aborted) break;
        if (!(err instanceof AbortedError)) report(err);
        await delay(Math.min(1000, leaseOptions.ttlMs), stopped);
        continue;
      }
      current = lease;
      let failed = false;
      try {
        await onLead(lease);
      } catch (err) {
        failed = true;
        report(err);
      }
      if (!failed) await ended(lease.signal, stopped);
      current = undefined;
      await lease.release().catch(report);
      if (failed) await delay(backoffMs ?? leaseOptions.ttlMs, stopped);
    }
  };
  const running = campaign();

  // Resign first: the leader's signal aborts (an onLead that works until it does returns), and the
  // release wakes a follower at once. Then the campaign ends.
  async function stop(): Promise<void> {
    stopper.abort();
    await current?.release().catch(report);
    await running;
  }

  return {
    get lease() {
      return current && !current.signal.aborted ? current : undefined;
    },
    get isLeader() {
      return current !== undefined && !current.signal.aborted;
    },
    stop,
    [Symbol.asyncDispose]: stop,
  };
}
