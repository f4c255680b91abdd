// OpenTelemetry for pgcoord: a subscriber to the diagnostics channels of ../trace.ts that turns each
// operation into one span and a few metrics. Nothing here runs until instrumentPgcoord() subscribes,
// and stop() unsubscribes, so pgcoord's own code never asks whether it is instrumented.
//
// Keys never become attributes unless asked: they are labels that may hold personal data (an
// email in a lease name, an order id). 'hash' exports a SHA-256 prefix, a function exports what it
// returns (a key's kind, say). Error messages name keys too, so a span's status carries the error's
// code, never its message.
//
// pgcoord:hold-warning is left alone: with a subscriber there, pgcoord stops printing its process
// warning, and instrumenting must change nothing else.

import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import {
  type Attributes,
  type Context,
  context,
  type Histogram,
  type MeterProvider,
  metrics,
  type Span,
  SpanKind,
  SpanStatusCode,
  type TracerProvider,
  trace,
} from '@opentelemetry/api';
import { InvalidOptionError, sqlState } from '../errors.js';
import { describe } from '../text.js';
import { type LostEvent, lostChannel, TRACE_FAMILIES, type TraceContext, type TraceFamily, traceChannels } from '../trace.js';

/** How keys (lock keys, lease names, limit and queue keys) appear as the attribute `pgcoord.key`. */
export type KeyAttribute = 'none' | 'hash' | ((key: string) => string);

/** Options of {@link instrumentPgcoord}. */
export interface InstrumentOptions {
  /** Where metrics go; default the global one (`metrics.getMeterProvider()`). */
  meterProvider?: MeterProvider;
  /** Where spans go; default the global one (`trace.getTracerProvider()`). */
  tracerProvider?: TracerProvider;
  /**
   * `'none'` (default): no key attribute. `'hash'`: `pgcoord.key` is the first 16 hex digits of
   * the SHA-256 of each key's label (pseudonymous, not anonymous: a short, guessable key such as
   * `order:1` can be found by hashing candidates). A function: `pgcoord.key` is what it returns
   * for each key label (e.g. `(k) => k.split(':')[0]` for the key's kind): the opt-in to names.
   * Several keys are joined with `,`. Every distinct value is a new time series: keep it coarse.
   */
  keyAttribute?: KeyAttribute;
}

/** A running instrumentation (see {@link instrumentPgcoord}). */
export interface Instrumentation {
  /** Unsubscribe from every pgcoord channel: operations after this record nothing. */
  stop(): void;
}

const DURATION_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

// Operations whose start-to-answer is a lock wait, and the kind of lock (`pgcoord.lock.kind`).
const LOCK_KIND: Record<string, string> = {
  withLock: 'advisory',
  tryWithLock: 'advisory',
  acquireSessionLock: 'session',
  tryAcquireSessionLock: 'session',
  withRowLock: 'row',
  lockRows: 'row',
  acquireLease: 'lease',
  tryAcquireLease: 'lease',
};

// Refused before anything was sent: recorded only in pgcoord.operation.duration.
const BAD_INPUT = new Set([
  'PGCOORD_INVALID_KEY',
  'PGCOORD_INVALID_OPTION',
  'PGCOORD_INVALID_IDENTIFIER',
  'PGCOORD_UNSUPPORTED_RUNNER',
  'PGCOORD_NOT_IN_TRANSACTION',
]);

/**
 * Publish pgcoord's operations to OpenTelemetry: one span per operation and these metrics (names
 * `pgcoord.<area>.<measure>`, durations in seconds, counters named for what they count):
 *
 * - `pgcoord.operation.duration` (histogram, s): every operation; `pgcoord.outcome` when it has one.
 * - `pgcoord.lock.wait.duration` (histogram, s): asking for a lock to the answer; `pgcoord.lock.kind`
 *   (`advisory` / `session` / `row` / `lease`) and `pgcoord.outcome` (`acquired` / `contended` /
 *   `timeout` / `aborted` / `error`).
 * - `pgcoord.lock.hold.duration` (histogram, s): a transaction lock (`withLock`, `tryWithLock`)
 *   from the grant to the end of the work under it; `error.type` when that work failed.
 * - `pgcoord.retries` (counter): attempts that failed and were retried; `pgcoord.retry.reason`.
 * - `pgcoord.write.conflicts` (counter): a version conflict or a failed guard; `pgcoord.conflict.kind`
 *   (`version` / `guard`).
 * - `pgcoord.holds.lost` (counter): leases, session locks and queue claims lost between operations;
 *   `pgcoord.lost.kind`, `pgcoord.lost.reason` (`lost` / `lapsed`).
 * - `pgcoord.fence.rejections` (counter): fenced writes refused because the lease's term is over.
 * - `pgcoord.idempotency.requests` (counter): `pgcoord.outcome` `first` / `replay` / `in-flight` /
 *   `mismatch` / `error`.
 * - `pgcoord.limit.decisions` (counter): `pgcoord.outcome` `allowed` / `denied` / `timeout` / `aborted` / `error`.
 * - `pgcoord.queue.jobs.processed` (counter): `pgcoord.outcome` `completed` / `retry` / `dead` / `lost` / `error`.
 * - `pgcoord.queue.jobs.enqueued` (counter): `pgcoord.outcome` `enqueued` / `deduplicated` / `error`.
 *
 * Every one carries `db.system.name` = `postgresql` and `db.operation.name` = the pgcoord function
 * (`withLock`, `idempotent`, `process` for a queue job, ...); a failure adds `error.type` (the
 * error's `code`, else the SQLSTATE, else its class name); queue operations add `messaging.system`
 * = `pgcoord`, `messaging.destination.name` = the queue and `messaging.operation.type` (`send` /
 * `process`). Spans have the same attributes, status ERROR with the error's type (never its
 * message: messages name keys), and nest inside the pgcoord operation that runs them. Calls
 * refused for bad input (`PGCOORD_INVALID_*`) appear only in `pgcoord.operation.duration`.
 * Prometheus (`@opentelemetry/exporter-prometheus`) shows them as `pgcoord_lock_wait_duration_bucket`,
 * `pgcoord_retries_total`, ... with dots in attribute names as underscores.
 *
 * @throws {@link InvalidOptionError} for bad options, before anything is subscribed.
 * @example
 * import { instrumentPgcoord } from 'pgcoord/otel';
 * const otel = instrumentPgcoord({ keyAttribute: (key) => key.split(':')[0] });
 * // ... on shutdown
 * otel.stop();
 */
export function instrumentPgcoord(options: InstrumentOptions = {}): Instrumentation {
  const keyOf = checkOptions(options);
  const meter = (options.meterProvider ?? metrics.getMeterProvider()).getMeter('pgcoord', VERSION);
  const tracer = (options.tracerProvider ?? trace.getTracerProvider()).getTracer('pgcoord', VERSION);
  const histogram = (name: string, description: string): Histogram =>
    meter.createHistogram(name, { unit: 's', description, advice: { explicitBucketBoundaries: DURATION_BUCKETS } });
  const m = {
    duration: histogram('pgcoord.operation.duration', 'Duration of pgcoord operations'),
    wait: histogram('pgcoord.lock.wait.duration', 'Time from asking for a lock (advisory, session, row, lease) to the answer'),
    hold: histogram('pgcoord.lock.hold.duration', 'Time a transaction lock was held: from the grant to the end of the work under it'),
    retries: meter.createCounter('pgcoord.retries', { unit: '{retry}', description: 'Failed attempts that were retried' }),
    conflicts: meter.createCounter('pgcoord.write.conflicts', {
      unit: '{conflict}',
      description: 'Versioned writes refused for a stale version, guarded writes whose guard failed',
    }),
    lost: meter.createCounter('pgcoord.holds.lost', {
      unit: '{hold}',
      description: 'Leases, session locks and queue claims lost between operations',
    }),
    fence: meter.createCounter('pgcoord.fence.rejections', {
      unit: '{rejection}',
      description: 'Fenced writes refused: the lease term is over',
    }),
    idempotency: meter.createCounter('pgcoord.idempotency.requests', { unit: '{request}', description: 'Idempotent requests by outcome' }),
    limit: meter.createCounter('pgcoord.limit.decisions', { unit: '{decision}', description: 'Rate-limit decisions by outcome' }),
    processed: meter.createCounter('pgcoord.queue.jobs.processed', {
      unit: '{job}',
      description: 'Queue jobs run by a worker, by outcome',
    }),
    enqueued: meter.createCounter('pgcoord.queue.jobs.enqueued', { unit: '{job}', description: 'Queue jobs enqueued, by outcome' }),
  };

  // Each operation's start time and span, by its context object; the span of the operation that
  // is running, for the operations it runs (their parent).
  const running = new WeakMap<object, { at: number; span: Span }>();
  const current = new AsyncLocalStorage<Context>();

  const begin = (ctx: TraceContext): Context => {
    const parent = current.getStore() ?? context.active();
    const queueOp = ctx.operation === 'process' || ctx.operation === 'enqueue';
    const name = queueOp ? `${ctx.operation === 'process' ? 'process' : 'send'} ${ctx.queue ?? ''}`.trim() : `pgcoord.${ctx.operation}`;
    const kind = !queueOp ? SpanKind.INTERNAL : ctx.operation === 'process' ? SpanKind.CONSUMER : SpanKind.PRODUCER;
    const span = tracer.startSpan(name, { kind, attributes: base(ctx, keyOf) }, parent);
    running.set(ctx, { at: performance.now(), span });
    return trace.setSpan(parent, span);
  };

  const finish = (family: TraceFamily, ctx: TraceContext) => {
    const run = running.get(ctx);
    if (!run) return;
    running.delete(ctx);
    const seconds = (performance.now() - run.at) / 1000;
    const failed = 'error' in ctx;
    const attrs = base(ctx, keyOf);
    const error = failed ? errorType(ctx.error) : undefined;
    if (error !== undefined) attrs['error.type'] = error;
    const outcome = family === 'write' ? writeOutcome(ctx) : ctx.outcome;
    const recorded = outcome === undefined ? attrs : { ...attrs, 'pgcoord.outcome': outcome };
    m.duration.record(seconds, recorded);
    const spanAttrs: Attributes = { ...recorded };
    if (ctx.attempts !== undefined) spanAttrs['pgcoord.attempts'] = ctx.attempts;
    if (ctx.reasons?.length) spanAttrs['pgcoord.retry.reasons'] = ctx.reasons;
    if (!(error !== undefined && BAD_INPUT.has(error))) {
      const lockKind = LOCK_KIND[ctx.operation];
      if (lockKind) {
        const waited = ctx.waitMs === undefined ? seconds : ctx.waitMs / 1000;
        const answer = lockOutcome(ctx);
        m.wait.record(waited, { ...attrs, 'pgcoord.lock.kind': lockKind, 'pgcoord.outcome': answer });
        spanAttrs['pgcoord.lock.wait.duration'] = waited;
        // (a try that found the lock taken has a holdMs too: the time to its rollback)
        if (ctx.holdMs !== undefined && answer === 'acquired') {
          m.hold.record(ctx.holdMs / 1000, { ...attrs, 'pgcoord.lock.kind': lockKind });
          spanAttrs['pgcoord.lock.hold.duration'] = ctx.holdMs / 1000;
        }
      }
      count(family, ctx, attrs, outcome);
    }
    run.span.setAttributes(spanAttrs);
    if (error !== undefined) run.span.setStatus({ code: SpanStatusCode.ERROR, message: error });
    run.span.end();
  };

  const count = (family: TraceFamily, ctx: TraceContext, attrs: Attributes, outcome: string | undefined) => {
    const code = codeOf(ctx.error);
    const failed = 'error' in ctx;
    if (family === 'retry') for (const reason of ctx.reasons ?? []) m.retries.add(1, { ...attrs, 'pgcoord.retry.reason': reason });
    else if (family === 'write' && outcome === 'conflict')
      m.conflicts.add(1, { ...attrs, 'pgcoord.conflict.kind': ctx.operation === 'updateVersioned' ? 'version' : 'guard' });
    else if (ctx.operation === 'withFence' && failed && (code === 'PGCOORD_LEASE_LOST' || sqlState(ctx.error) === 'PGF01'))
      m.fence.add(1, attrs);
    else if (family === 'idempotency')
      m.idempotency.add(1, {
        ...attrs,
        'pgcoord.outcome': !failed
          ? (outcome ?? 'first')
          : code === 'PGCOORD_IDEMPOTENCY_IN_FLIGHT'
            ? 'in-flight'
            : code === 'PGCOORD_IDEMPOTENCY_MISMATCH'
              ? 'mismatch'
              : 'error',
      });
    else if (family === 'limit')
      m.limit.add(1, {
        ...attrs,
        'pgcoord.outcome': !failed
          ? (outcome ?? 'allowed')
          : code === 'PGCOORD_RATE_LIMIT_TIMEOUT'
            ? 'timeout'
            : code === 'PGCOORD_ABORTED'
              ? 'aborted'
              : 'error',
      });
    else if (ctx.operation === 'process') m.processed.add(1, { ...attrs, 'pgcoord.outcome': failed ? 'error' : (outcome ?? 'completed') });
    else if (ctx.operation === 'enqueue') m.enqueued.add(1, { ...attrs, 'pgcoord.outcome': failed ? 'error' : (outcome ?? 'enqueued') });
  };

  const onLost = (message: unknown) => {
    const e = message as LostEvent;
    const attrs: Attributes = { 'db.system.name': 'postgresql', 'pgcoord.lost.kind': e.kind, 'pgcoord.lost.reason': e.reason };
    if (e.queue !== undefined) Object.assign(attrs, { 'messaging.system': 'pgcoord', 'messaging.destination.name': e.queue });
    const key = keyOf(e.keys);
    if (key !== undefined) attrs['pgcoord.key'] = key;
    m.lost.add(1, attrs);
  };

  const undo: (() => void)[] = [];
  for (const family of TRACE_FAMILIES) {
    const channel = traceChannels[family];
    const handlers = {
      start() {},
      // a synchronous throw (pgcoord's operations reject instead, but a subscriber must not leak spans)
      end(ctx: TraceContext) {
        if ('error' in ctx) finish(family, ctx);
      },
      asyncStart() {},
      asyncEnd: (ctx: TraceContext) => finish(family, ctx),
      error() {},
    };
    // The span is made in the start channel's store transform (it runs before the start event),
    // so that the operation, and the pgcoord operations it runs, see it as the running one.
    channel.start.bindStore(current as AsyncLocalStorage<unknown>, (ctx) => begin(ctx as TraceContext));
    channel.subscribe(handlers as never);
    undo.push(() => {
      channel.unsubscribe(handlers as never);
      channel.start.unbindStore(current as AsyncLocalStorage<unknown>);
    });
  }
  lostChannel.subscribe(onLost);
  undo.push(() => lostChannel.unsubscribe(onLost));

  return {
    stop() {
      for (const u of undo.splice(0)) u();
    },
  };
}

function checkOptions(options: InstrumentOptions): (keys: string[] | undefined) => string | undefined {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError(`options must be an object, got ${describe(options)}`);
  for (const name of Object.keys(options))
    if (name !== 'meterProvider' && name !== 'tracerProvider' && name !== 'keyAttribute')
      throw new InvalidOptionError(
        `unknown option ${JSON.stringify(name)}: instrumentPgcoord takes meterProvider, tracerProvider, keyAttribute`,
      );
  const { meterProvider, tracerProvider, keyAttribute = 'none' } = options;
  if (meterProvider !== undefined && typeof (meterProvider as { getMeter?: unknown } | null)?.getMeter !== 'function')
    throw new InvalidOptionError(`meterProvider must be an OpenTelemetry MeterProvider (with getMeter), got ${describe(meterProvider)}`);
  if (tracerProvider !== undefined && typeof (tracerProvider as { getTracer?: unknown } | null)?.getTracer !== 'function')
    throw new InvalidOptionError(
      `tracerProvider must be an OpenTelemetry TracerProvider (with getTracer), got ${describe(tracerProvider)}`,
    );
  if (keyAttribute === 'none') return () => undefined;
  let one: (key: string) => string | undefined;
  if (keyAttribute === 'hash') one = (key) => createHash('sha256').update(key).digest('hex').slice(0, 16);
  else if (typeof keyAttribute === 'function')
    one = (key) => {
      // a throwing mapper must not break the operation (a subscriber's throw is an uncaught exception)
      try {
        const v = keyAttribute(key);
        return v === undefined || v === null ? undefined : String(v);
      } catch {
        return undefined;
      }
    };
  else throw new InvalidOptionError(`keyAttribute must be 'none', 'hash' or a function (key) => string, got ${describe(keyAttribute)}`);
  return (keys) => {
    if (!keys?.length) return undefined;
    const values = [...new Set(keys.map(one).filter((v): v is string => v !== undefined))];
    return values.length ? values.join(',') : undefined;
  };
}

// The attributes an operation has from its start: what it is, where, and (opted in) its keys.
function base(ctx: TraceContext, keyOf: (keys: string[] | undefined) => string | undefined): Attributes {
  const attrs: Attributes = { 'db.system.name': 'postgresql', 'db.operation.name': ctx.operation };
  if (ctx.operation === 'process' || ctx.operation === 'enqueue') {
    attrs['messaging.system'] = 'pgcoord';
    attrs['messaging.operation.type'] = ctx.operation === 'process' ? 'process' : 'send';
    attrs['messaging.operation.name'] = ctx.operation;
    if (ctx.queue !== undefined) attrs['messaging.destination.name'] = ctx.queue;
  }
  const key = keyOf(ctx.keys);
  if (key !== undefined) attrs['pgcoord.key'] = key;
  return attrs;
}

function codeOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** `error.type`: a pgcoord code (or a driver's: SQLSTATE, ECONNRESET), else the SQLSTATE under a wrapper, else the class. */
function errorType(err: unknown): string {
  const code = codeOf(err) ?? sqlState(err);
  if (code) return code;
  return err instanceof Error ? err.constructor.name : '_OTHER';
}

function lockOutcome(ctx: TraceContext): string {
  if (ctx.outcome === 'acquired') return 'acquired';
  if (ctx.outcome === 'not-acquired') return 'contended';
  if (!('error' in ctx)) return 'acquired';
  switch (codeOf(ctx.error)) {
    case 'PGCOORD_LOCK_NOT_ACQUIRED':
    case 'PGCOORD_LEASE_NOT_ACQUIRED':
    case 'PGCOORD_ROW_LOCKED':
      return 'contended';
    case 'PGCOORD_LOCK_TIMEOUT':
    case 'PGCOORD_LEASE_TIMEOUT':
      return 'timeout';
    case 'PGCOORD_ABORTED':
      return 'aborted';
    default:
      return 'error';
  }
}

// Guarded and versioned writes: `written`, `conflict` (a stale version, a failed guard), `not-found`.
function writeOutcome(ctx: TraceContext): string | undefined {
  if (ctx.outcome !== undefined) return ctx.outcome;
  if ('error' in ctx) return codeOf(ctx.error) === 'PGCOORD_VERSION_CONFLICT' ? 'conflict' : undefined;
  const r = ctx.result as { status?: unknown; replayed?: unknown } | undefined;
  if (r?.replayed === true) return 'replay';
  if (r?.status === 'guard-failed') return 'conflict';
  if (r?.status === 'not-found') return 'not-found';
  return 'written';
}

const VERSION = (() => {
  try {
    return String(JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')).version);
  } catch {
    return undefined;
  }
})();
