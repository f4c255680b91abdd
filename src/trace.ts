// Diagnostics: one `node:diagnostics_channel` TracingChannel per family of public operations, so
// metrics, traces and logs attach without touching pgcoord's code (`pgcoord/otel` is one such
// subscriber). An operation runs through `traced()`: with nobody subscribed it calls the operation
// directly and builds nothing; with a subscriber it runs the very same function inside
// `tracePromise`, which publishes start / end / asyncStart / asyncEnd / error around it. Subscribing
// never changes which statements are sent.

import { channel, type TracingChannel, tracingChannel } from 'node:diagnostics_channel';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { InvalidOptionError } from './errors.js';
import { describe } from './text.js';

/** The operation families, each with the channel `pgcoord:<family>` (see {@link traceChannels}). */
export const TRACE_FAMILIES = ['lock', 'session-lock', 'row', 'write', 'retry', 'idempotency', 'lease', 'limit', 'queue'] as const;

/** One of {@link TRACE_FAMILIES}. */
export type TraceFamily = (typeof TRACE_FAMILIES)[number];

/**
 * The context object every event of one operation carries (the same object from start to end).
 * `tracePromise` adds `result` or `error`; pgcoord fills the fields that only it knows as the
 * operation goes.
 */
export interface TraceContext {
  /** The public function: `withLock`, `idempotent`, `enqueue`, `process` (a queue job), ... */
  operation: string;
  /** Lock keys, lease names, limit keys, queue keys as labels. Personal data may hide in them: hash before exporting. */
  keys?: string[];
  /** The queue's name (queue family). */
  queue?: string;
  /** ms from asking to the answer: the lock granted (lock, session-lock, row), the lease taken. */
  waitMs?: number;
  /** ms the lock was held (lock family: from the grant to COMMIT or ROLLBACK). */
  holdMs?: number;
  /**
   * How it ended when the result alone does not say: `acquired` / `not-acquired` (try forms),
   * `first` / `replay` (idempotency), `allowed` / `denied` (limits), `written` / `conflict`
   * (guarded and versioned writes), `completed` / `retry` / `dead` / `lost` (a queue job).
   * Failures carry `error`, whose `code` says which.
   */
  outcome?: string;
  /** Attempts made (retry family; a queue job's attempt number). */
  attempts?: number;
  /** Why each failed attempt was retried (retry family): `serialization`, `deadlock`, ... */
  reasons?: string[];
  /** Set by `tracePromise`: the operation's value. */
  result?: unknown;
  /** Set by `tracePromise`: the operation's failure. */
  error?: unknown;
}

type Channel = TracingChannel<unknown, TraceContext & object>;

/**
 * The TracingChannel of each family: `pgcoord:lock`, `pgcoord:session-lock`, `pgcoord:row`,
 * `pgcoord:write`, `pgcoord:retry`, `pgcoord:idempotency`, `pgcoord:lease`, `pgcoord:limit`,
 * `pgcoord:queue`.
 *
 * @example
 * import { tracingChannel } from 'node:diagnostics_channel';
 * tracingChannel('pgcoord:lock').subscribe({
 *   start(ctx) { ctx.t0 = performance.now(); },
 *   asyncEnd(ctx) { histogram.record(performance.now() - ctx.t0, { outcome: ctx.outcome }); },
 *   error(ctx) { errors.add(1, { code: ctx.error.code }); },
 * });
 */
export const traceChannels: Readonly<Record<TraceFamily, Channel>> = Object.fromEntries(
  TRACE_FAMILIES.map((family) => [family, tracingChannel(`pgcoord:${family}`) as Channel]),
) as Record<TraceFamily, Channel>;

/**
 * Run `fn` as one operation of `family`: traced when somebody listens (then `context()` is built
 * and handed to `fn` to fill in), else called as is with no context.
 */
export function traced<T>(family: TraceFamily, context: () => TraceContext, fn: (ctx: TraceContext | undefined) => Promise<T>): Promise<T> {
  const channel = traceChannels[family];
  if (!(channel as { hasSubscribers?: boolean }).hasSubscribers) return settled(fn, undefined);
  const ctx = context();
  return channel.tracePromise(() => settled(fn, ctx), ctx);
}

// Every pgcoord operation fails by rejecting, never by throwing where it is called: a bad input
// checked synchronously inside `fn` becomes the returned promise's rejection.
function settled<T>(fn: (ctx: TraceContext | undefined) => Promise<T>, ctx: TraceContext | undefined): Promise<T> {
  try {
    return fn(ctx);
  } catch (err) {
    return Promise.reject(err);
  }
}

/** What pgcoord publishes on `pgcoord:lost`: something held outside any operation was lost. */
export interface LostEvent {
  /** A lease (semaphore permits and single-flight leases included), a session lock, a queue worker's claim of a key. */
  kind: 'lease' | 'session-lock' | 'job-claim';
  /** The lease's name, the lock's keys, the queue key (labels). */
  keys: string[];
  /** `lost`: the server said it is over (taken over, expired, the connection died); `lapsed`: no renewal was confirmed in time. */
  reason: 'lost' | 'lapsed';
  /** The queue's name (job claims). */
  queue?: string;
}

/**
 * `pgcoord:lost`: a plain diagnostics channel for holds that end on their own, between operations:
 * a lease or a session lock whose signal aborts, a queue claim taken over.
 */
export const lostChannel = channel('pgcoord:lost');

/** Publish a {@link LostEvent} (built only when somebody listens). */
export function publishLost(event: () => LostEvent): void {
  if (lostChannel.hasSubscribers) lostChannel.publish(event());
}

/** What pgcoord publishes on `pgcoord:hold-warning` (see {@link warnOnLongHolds}). */
export interface HoldWarning {
  kind: 'lock' | 'session-lock';
  /** The lock's keys or the lease's name (labels). */
  keys: string[];
  /** How long it has been held so far, in ms. */
  heldMs: number;
  /** Where it was taken: the caller's stack at the call that took it. */
  stack: string;
}

/** `pgcoord:hold-warning`: a lock or lease held longer than the threshold of {@link warnOnLongHolds}. */
export const holdWarningChannel = channel('pgcoord:hold-warning');

let holdThresholdMs: number | undefined;

// pgcoord's own folder (src/ here, dist/ once built): frames in it are not the caller's
const OWN_DIR = dirname(fileURLToPath(import.meta.url));

/**
 * Warn when a transaction lock or a session lock is held longer than `thresholdMs` (a stuck
 * holder, before it becomes an outage): once per hold, on `pgcoord:hold-warning` with the
 * keys and the stack of the call that took it, or, with nobody subscribed, as a process warning
 * (`process.emitWarning`, printed on stderr by default). `undefined` turns it off (the default: the
 * stack is captured only while it is on). Leases are not watched: their TTL already bounds a stuck
 * holder, and a leader holds one for as long as it leads.
 *
 * @example
 * warnOnLongHolds(30_000);
 * subscribe('pgcoord:hold-warning', (w) => log.warn(w, 'lock held for 30 s'));
 */
export function warnOnLongHolds(thresholdMs: number | undefined): void {
  if (thresholdMs !== undefined && !(Number.isInteger(thresholdMs) && thresholdMs >= 1 && thresholdMs <= 2_147_483_647))
    throw new InvalidOptionError(
      `thresholdMs must be an integer from 1 to 2147483647 (or undefined to stop warning), got ${describe(thresholdMs)}`,
    );
  holdThresholdMs = thresholdMs;
}

/** Where a hold is taken: the caller's stack when hold warnings are on, else undefined (free). */
export function holdSite(): string | undefined {
  if (holdThresholdMs === undefined) return undefined;
  const stack = new Error().stack ?? '';
  // drop the message line and pgcoord's own frames: the first frame left is the caller's
  const own = stack
    .split('\n')
    .slice(1)
    .filter((line) => !line.includes(OWN_DIR) && !line.includes('node:internal'));
  return own.join('\n').trim() || stack;
}

/** Watch a hold that just started (taken at `site`); call the returned function when it ends. */
export function watchHold(kind: HoldWarning['kind'], keys: () => string[], site: string | undefined): () => void {
  const threshold = holdThresholdMs;
  if (threshold === undefined || site === undefined) return noop;
  const timer = setTimeout(() => {
    const warning: HoldWarning = { kind, keys: keys(), heldMs: threshold, stack: site };
    if (holdWarningChannel.hasSubscribers) holdWarningChannel.publish(warning);
    else
      process.emitWarning(`pgcoord: ${kind} ${warning.keys.join(', ')} held for over ${threshold} ms, taken at\n${site}`, {
        code: 'PGCOORD_LONG_HOLD',
      });
  }, threshold);
  timer.unref?.();
  return () => clearTimeout(timer);
}

const noop = () => {};
