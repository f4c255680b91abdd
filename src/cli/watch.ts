// `pgcoord locks --watch`: the locks listing refreshed every few seconds, top-like, on one pinned
// connection (one round trip per refresh), until Ctrl-C, SIGTERM, `--count` refreshes, or the
// connection is lost.

import { pinConnection } from '../driver/index.js';
import { ConnectionLostError, isConnectionLost } from '../errors.js';
import type { CliConnection } from './connect.js';
import { CliFailedError } from './errors.js';
import {
  type BlockingChain,
  blockingChains,
  formatChains,
  formatLocks,
  type KeyCandidate,
  type LockSnapshot,
  lockSnapshots,
} from './locks.js';

/** ANSI: cursor home, clear the screen. */
export const CLEAR = '\x1b[H\x1b[2J';

/** Options of {@link watchLocks}. */
export interface WatchLocksOptions {
  /** Time between refreshes, in milliseconds. */
  intervalMs: number;
  /** Stop after this many refreshes (default: until stopped). */
  count?: number;
  /** One JSON document per line per refresh (NDJSON) instead of the screen. */
  json?: boolean;
  /** Clear the screen before each refresh (stdout is a terminal); else refreshes are separated by a blank line. */
  tty?: boolean;
  /** Candidate key strings, as for `listLocks`. */
  names?: Iterable<KeyCandidate>;
  /** Where each refresh goes (one call per refresh; the writer ends it with a newline). */
  write(text: string): void;
  /** Stops the watch (SIGINT, SIGTERM): it resolves after the refresh in flight, if any, is cancelled. */
  signal?: AbortSignal;
}

/** One refresh as one NDJSON line: the snapshot, its counts and chains, keys' int8 ids as strings. */
export function watchJson(snapshot: LockSnapshot, intervalMs: number, chains: BlockingChain[]): string {
  const { held, waiting } = counts(snapshot);
  const { database, at, locks } = snapshot;
  return JSON.stringify({ database, at, intervalMs, held, waiting, locks, chains }, (_k, v) => (typeof v === 'bigint' ? String(v) : v));
}

function counts(snapshot: LockSnapshot): { held: number; waiting: number } {
  const held = snapshot.locks.filter((l) => l.status === 'held').length;
  return { held, waiting: snapshot.locks.length - held };
}

/** One refresh as text: a header line, the table, the blocking chains. */
export function formatWatch(snapshot: LockSnapshot, intervalMs: number): string {
  const { held, waiting } = counts(snapshot);
  const header = `pgcoord locks: database ${snapshot.database} at ${snapshot.at} (database clock), every ${intervalMs / 1000}s: ${held} held, ${waiting} waiting`;
  return [header, '', formatLocks(snapshot.locks), '', formatChains(snapshot.locks)].join('\n');
}

/**
 * Refresh the locks listing every `intervalMs` on one connection of `connection` (pinned for the
 * whole watch) until `signal` fires or `count` refreshes are done. A lost connection ends the
 * watch with a {@link CliFailedError} saying so; the pinned connection is given back either way.
 */
export async function watchLocks(connection: CliConnection, options: WatchLocksOptions): Promise<void> {
  const { intervalMs, count, json = false, tty = false, write, signal } = options;
  const lost = (err?: unknown) => {
    const why = cause(err);
    return new CliFailedError(`lost the database connection${why ? ` (${why})` : ''}; the watch ended`, { cause: err });
  };
  let pin: Awaited<ReturnType<typeof pinConnection>>;
  try {
    pin = await pinConnection(connection.runner, signal);
  } catch (err) {
    if (signal?.aborted) return;
    throw err;
  }
  let poisoned = false;
  // Ends a wait (between refreshes, or a refresh in flight) when the watch is stopped or its connection dies.
  const stop = AbortSignal.any([pin.lost, ...(signal ? [signal] : [])]);
  try {
    const read = await lockSnapshots(pin.conn, options.names);
    for (let n = 1; !stop.aborted; n++) {
      let snapshot: LockSnapshot;
      try {
        snapshot = await read(stop);
      } catch (err) {
        if (signal?.aborted && !pin.lost.aborted) return;
        if (pin.lost.aborted || isConnectionLost(err)) {
          poisoned = true;
          throw lost(pin.lost.aborted ? (pin.lost.reason ?? err) : err);
        }
        throw err;
      }
      if (json) write(watchJson(snapshot, intervalMs, blockingChains(snapshot.locks)));
      else write(`${tty ? CLEAR : n > 1 ? '\n' : ''}${formatWatch(snapshot, intervalMs)}`);
      if (count !== undefined && n >= count) return;
      await pause(intervalMs, stop);
    }
    if (pin.lost.aborted) {
      poisoned = true;
      throw lost(pin.lost.reason);
    }
  } catch (err) {
    if (!poisoned && isConnectionLost(err)) {
      poisoned = true;
      throw lost(err);
    }
    throw err;
  } finally {
    pin.release(poisoned);
  }
}

/** The driver's or the server's own words under pgcoord's ConnectionLostError, on one line. */
function cause(err: unknown): string | undefined {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    if (e instanceof ConnectionLostError) continue;
    const message = (e as { message?: unknown }).message;
    if (typeof message === 'string' && message) return message.split('\n')[0];
  }
  return undefined;
}

/** Resolve after `ms`, or as soon as `signal` fires. */
function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((done) => {
    if (signal.aborted) return done();
    const onAbort = () => {
      clearTimeout(timer);
      done();
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      done();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
