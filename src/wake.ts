// Waiting for something announced on a notification channel (a lease released, a queue's key
// turned ready), or for a known time (a term's end, a retry), whichever comes first. One LISTEN
// connection per pool and channel serves every waiter of the process; it opens with the first
// waiter and closes a few seconds after the last one left. Without it (a runner that cannot listen,
// a transaction-mode pooler, a lost listener) waiters still wake at the known time, and poll at
// least every POLL_MS, so an announcement is seen late but never missed.

import { type Listening, listen, type Runner } from './driver/index.js';
import { abortedBy } from './driver/lifecycle.js';

const POLL_MS = 1000;
const LISTENING_MAX_MS = 5000;
const LINGER_MS = 5000;

export interface Listener {
  ready: Promise<boolean>;
  live: boolean;
  waiters: Map<string, Set<() => void>>;
  users: number;
  closing?: ReturnType<typeof setTimeout>;
  close?: () => Promise<void>;
}

const listeners = new WeakMap<object, Map<string, Listener>>();

function open(runner: Runner, channel: string): Listener {
  let byChannel = listeners.get(runner);
  if (!byChannel) {
    byChannel = new Map();
    listeners.set(runner, byChannel);
  }
  const channels = byChannel;
  const l = channels.get(channel);
  if (l) return l;
  const listener: Listener = { ready: Promise.resolve(false), live: false, waiters: new Map(), users: 0 };
  channels.set(channel, listener);
  const forget = () => {
    if (channels.get(channel) === listener) channels.delete(channel);
  };
  const wake = (name: string) => {
    for (const w of listener.waiters.get(name) ?? []) w();
  };
  let listening: Promise<Listening> | undefined;
  try {
    listening = listen(runner, channel, wake, () => {
      // notifications may have been missed: wake everyone to look again, and listen anew next time
      listener.live = false;
      forget();
      for (const set of listener.waiters.values()) for (const w of set) w();
    });
  } catch {
    listening = undefined;
  }
  listener.ready = listening
    ? listening.then(
        (handle) => {
          listener.live = true;
          listener.close = () => handle.close();
          return true;
        },
        () => {
          forget();
          return false;
        },
      )
    : Promise.resolve(false);
  return listener;
}

/**
 * Join the waiters on `runner`'s listener of `channel`: resolves once it is up (`listening`) or
 * could not be. Call `leave()` when done waiting.
 */
export async function joinWaiters(runner: Runner, channel: string): Promise<{ listening: boolean; leave(): void; listener: Listener }> {
  const l = open(runner, channel);
  l.users++;
  if (l.closing) {
    clearTimeout(l.closing);
    l.closing = undefined;
  }
  const listening = await l.ready;
  return {
    listening,
    listener: l,
    leave() {
      if (--l.users > 0) return;
      l.closing = setTimeout(() => {
        if (l.users > 0) return;
        const channels = listeners.get(runner);
        if (channels?.get(channel) === l) channels.delete(channel);
        l.close?.().catch(() => {});
      }, LINGER_MS);
      l.closing.unref?.();
    },
  };
}

/** Interest in announcements of some names, registered before a look so that none is missed. */
export interface Armed {
  /** A release of one of the names was announced since arming. */
  readonly woken: boolean;
  /**
   * Sleep until one of the names was announced (at once if one already was), `expiresInMs` (when
   * known) has passed, or the poll interval ran out. Rejects with the abort reason when `signal`
   * fires. Disarms.
   */
  sleep(expiresInMs: number | undefined, capMs: number, signal: AbortSignal | undefined): Promise<void>;
  /** Stop listening for these names. */
  disarm(): void;
}

/**
 * Register interest in an announcement of any of `names` *before* looking at them: one made between
 * the look and the sleep is then not lost (the sleep returns at once). `what` names the wait in an
 * abort's message.
 */
export function arm(listener: Listener, names: readonly string[], what: string): Armed {
  let woken = false;
  let onWake: (() => void) | undefined;
  const wake = () => {
    woken = true;
    onWake?.();
  };
  for (const name of names) {
    const waiters = listener.waiters.get(name) ?? new Set<() => void>();
    listener.waiters.set(name, waiters);
    waiters.add(wake);
  }
  const disarm = () => {
    for (const name of names) {
      const waiters = listener.waiters.get(name);
      waiters?.delete(wake);
      if (waiters?.size === 0) listener.waiters.delete(name);
    }
  };
  return {
    get woken() {
      return woken;
    },
    disarm,
    sleep(expiresInMs, capMs, signal) {
      const poll = listener.live ? LISTENING_MAX_MS : POLL_MS;
      const ms = Math.max(1, Math.min(capMs, poll, expiresInMs === undefined ? poll : expiresInMs + 1));
      return new Promise<void>((resolve, reject) => {
        if (signal?.aborted) {
          disarm();
          return reject(abortedBy(signal, what));
        }
        if (woken) {
          disarm();
          return resolve();
        }
        const done = () => {
          clearTimeout(timer);
          disarm();
          signal?.removeEventListener('abort', onAbort);
        };
        const onAbort = () => {
          done();
          reject(abortedBy(signal as AbortSignal, what));
        };
        const timer = setTimeout(() => {
          done();
          resolve();
        }, ms);
        onWake = () => {
          done();
          resolve();
        };
        signal?.addEventListener('abort', onAbort, { once: true });
      });
    },
  };
}
