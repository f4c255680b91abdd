import { channel } from 'node:diagnostics_channel';

/** What pgcoord publishes on `pgcoord:lock:acquire` and `pgcoord:lock:release`. */
export interface LockEvent {
  /** Keys as labels (`42`, `"order:7"`, `[1,2]`). */
  keys: string[];
  mode: 'exclusive' | 'shared';
  scope: 'transaction' | 'session';
  /** acquire: acquired | not-acquired | timeout | aborted | deadlock | lost | error; release: released | lost | error. */
  outcome: string;
  /** Milliseconds from asking to the server's answer. */
  waitMs: number;
  /** Milliseconds held (release events only). */
  holdMs?: number;
  error?: unknown;
}

/**
 * Diagnostics channels for lock events, so metrics and tracing attach without touching lock code.
 *
 * @example
 * import { subscribe } from 'node:diagnostics_channel';
 * subscribe('pgcoord:lock:acquire', (e) => histogram.record((e as LockEvent).waitMs));
 */
export const lockChannels = {
  acquire: channel('pgcoord:lock:acquire'),
  release: channel('pgcoord:lock:release'),
} as const;

/** True when somebody listens on the channel: build events only then (they cost on every lock). */
export function watched(which: keyof typeof lockChannels): boolean {
  return lockChannels[which].hasSubscribers;
}

export function publish(which: keyof typeof lockChannels, event: LockEvent): void {
  const ch = lockChannels[which];
  if (ch.hasSubscribers) ch.publish(event);
}
