// pgcoord/otel with the real OpenTelemetry SDK (in-memory reader and span exporter): real
// operations against the test database become the documented metrics and one span each, keys
// stay out of every attribute unless asked for, and stop() unsubscribes everything.
import { createHash } from 'node:crypto';
import type { Attributes } from '@opentelemetry/api';
import { DataPointType, MeterProvider, MetricReader } from '@opentelemetry/sdk-metrics';
import { BasicTracerProvider, InMemorySpanExporter, type ReadableSpan, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { afterEach, describe, expect, it } from 'vitest';
import {
  AbortedError,
  acquireLease,
  acquireSessionLock,
  enqueue,
  guardedUpdate,
  IdempotencyInFlightError,
  IdempotencyMismatchError,
  InvalidOptionError,
  idempotent,
  LeaseLostError,
  LockNotAcquiredError,
  LockTimeoutError,
  limit,
  lostChannel,
  migrateIdempotency,
  migrateLeases,
  migrateLimits,
  migrateQueue,
  retry,
  TRACE_FAMILIES,
  traceChannels,
  tryAcquireLease,
  tryWithLock,
  updateVersioned,
  VersionConflictError,
  withFence,
  withLock,
  withRowLock,
  work,
} from '../src/index.js';
import { type Instrumentation, type InstrumentOptions, instrumentPgcoord } from '../src/otel/index.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(8);
await migrateIdempotency(db.sql);
await migrateLeases(db.sql);
await migrateLimits(db.sql);
await migrateQueue(db.sql);
await db.sql`create table otel_orders (id int primary key, total int not null, refunded int not null default 0, version int not null default 1)`;
await db.sql`insert into otel_orders values (1, 200, 0, 1)`;

class TestReader extends MetricReader {
  protected async onShutdown() {}
  protected async onForceFlush() {}
}

interface Point {
  attributes: Attributes;
  /** A counter's sum, a histogram's count. */
  count: number;
  /** A histogram's sum (seconds) and min. */
  sum?: number;
  min?: number;
}

let running: { otel: Instrumentation; reader: TestReader; spans: InMemorySpanExporter } | undefined;
afterEach(() => {
  running?.otel.stop();
  running = undefined;
});

function instrument(options: Omit<InstrumentOptions, 'meterProvider' | 'tracerProvider'> = {}) {
  const reader = new TestReader();
  const spans = new InMemorySpanExporter();
  const meterProvider = new MeterProvider({ readers: [reader] });
  const tracerProvider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] });
  const otel = instrumentPgcoord({ ...options, meterProvider, tracerProvider });
  running = { otel, reader, spans };
  return running;
}

/** Every metric collected, by name: its data points. */
async function collect(reader: TestReader): Promise<Map<string, { unit: string; points: Point[] }>> {
  const { resourceMetrics, errors } = await reader.collect();
  expect(errors).toEqual([]);
  const out = new Map<string, { unit: string; points: Point[] }>();
  for (const scope of resourceMetrics.scopeMetrics) {
    expect(scope.scope.name).toBe('pgcoord');
    for (const metric of scope.metrics) {
      const points = metric.dataPoints.map((p): Point => {
        if (metric.dataPointType === DataPointType.HISTOGRAM) {
          const h = p.value as { count: number; sum?: number; min?: number };
          return { attributes: p.attributes, count: h.count, sum: h.sum, min: h.min };
        }
        return { attributes: p.attributes, count: p.value as number };
      });
      out.set(metric.descriptor.name, { unit: metric.descriptor.unit, points });
    }
  }
  return out;
}

/** The points of `name` whose attributes include `match`, their counts summed. */
function total(metrics: Map<string, { points: Point[] }>, name: string, match: Attributes = {}): number {
  return (metrics.get(name)?.points ?? [])
    .filter((p) => Object.entries(match).every(([k, v]) => p.attributes[k] === v))
    .reduce((n, p) => n + p.count, 0);
}

const allAttributeValues = (metrics: Map<string, { points: Point[] }>, spans: ReadableSpan[]) => [
  ...[...metrics.values()].flatMap((m) => m.points.flatMap((p) => Object.values(p.attributes))),
  ...spans.flatMap((s) => [s.name, s.status.message, ...Object.values(s.attributes)]),
];

describe('pgcoord/otel', () => {
  it('lock waits by outcome (acquired, contended, timeout, aborted, error) and holds, with the lock kind', async () => {
    const { reader } = instrument();
    await withLock(db.sql, 'order:1', () => sleep(30));
    await expect(withLock(db.sql, 'order:1', () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    await db.sql.begin(async (tx) => {
      await withLock(tx, 'order:2', () => 1);
      expect((await tryWithLock(db.pool, 'order:2', () => 1)).acquired).toBe(false);
      await expect(withLock(db.pool, 'order:2', () => 1, { timeoutMs: 0 })).rejects.toBeInstanceOf(LockNotAcquiredError);
      await expect(withLock(db.pool, 'order:2', () => 1, { timeoutMs: 50 })).rejects.toBeInstanceOf(LockTimeoutError);
      await expect(withLock(db.pool, 'order:2', () => 1, { signal: AbortSignal.timeout(50) })).rejects.toBeInstanceOf(AbortedError);
    });
    const session = await acquireSessionLock(db.sql, 'export:1');
    await session.release();
    await withRowLock(db.sql, { table: 'otel_orders', key: { id: 1 } }, () => 1);
    const lease = await acquireLease(db.sql, 'lease:1', { ttlMs: 5000 });
    expect(await tryAcquireLease(db.pool, 'lease:1', { ttlMs: 5000 })).toBeUndefined();
    await lease.release();
    // bad input: only in the operation histogram
    await expect(withLock(db.sql, '', () => 1)).rejects.toMatchObject({ code: 'PGCOORD_INVALID_KEY' });

    const m = await collect(reader);
    const wait = 'pgcoord.lock.wait.duration';
    expect(m.get(wait)?.unit).toBe('s');
    const advisory = { 'pgcoord.lock.kind': 'advisory', 'db.system.name': 'postgresql' };
    expect(total(m, wait, { ...advisory, 'pgcoord.outcome': 'acquired' })).toBe(3);
    expect(total(m, wait, { ...advisory, 'pgcoord.outcome': 'contended' })).toBe(2);
    expect(total(m, wait, { ...advisory, 'pgcoord.outcome': 'contended', 'db.operation.name': 'tryWithLock' })).toBe(1);
    expect(total(m, wait, { ...advisory, 'pgcoord.outcome': 'contended', 'error.type': 'PGCOORD_LOCK_NOT_ACQUIRED' })).toBe(1);
    expect(total(m, wait, { ...advisory, 'pgcoord.outcome': 'timeout', 'error.type': 'PGCOORD_LOCK_TIMEOUT' })).toBe(1);
    expect(total(m, wait, { ...advisory, 'pgcoord.outcome': 'aborted', 'error.type': 'PGCOORD_ABORTED' })).toBe(1);
    // the timed-out wait lasted its 50 ms
    const timedOut = m.get(wait)?.points.find((p) => p.attributes['pgcoord.outcome'] === 'timeout');
    expect(timedOut?.min).toBeGreaterThanOrEqual(0.04);
    expect(
      total(m, wait, { 'pgcoord.lock.kind': 'session', 'pgcoord.outcome': 'acquired', 'db.operation.name': 'acquireSessionLock' }),
    ).toBe(1);
    expect(total(m, wait, { 'pgcoord.lock.kind': 'row', 'pgcoord.outcome': 'acquired', 'db.operation.name': 'withRowLock' })).toBe(1);
    expect(total(m, wait, { 'pgcoord.lock.kind': 'lease', 'pgcoord.outcome': 'acquired' })).toBe(1);
    expect(total(m, wait, { 'pgcoord.lock.kind': 'lease', 'pgcoord.outcome': 'contended', 'db.operation.name': 'tryAcquireLease' })).toBe(
      1,
    );
    expect(total(m, wait)).toBe(11); // the bad key is not a wait

    // holds: the three granted transaction locks; the one whose work failed says how
    const hold = 'pgcoord.lock.hold.duration';
    expect(total(m, hold)).toBe(3);
    expect(total(m, hold, { 'error.type': 'Error' })).toBe(1);
    const held = m.get(hold)?.points.find((p) => p.attributes['error.type'] === undefined);
    expect(held?.sum).toBeGreaterThanOrEqual(0.025);

    const op = 'pgcoord.operation.duration';
    expect(total(m, op, { 'db.operation.name': 'withLock', 'error.type': 'PGCOORD_INVALID_KEY' })).toBe(1);
    expect(total(m, op, { 'db.operation.name': 'tryWithLock', 'pgcoord.outcome': 'not-acquired' })).toBe(1);
    expect(total(m, op)).toBe(12);
  });

  it('retries by reason, write conflicts by kind, fence rejections, lost leases', async () => {
    const { reader } = instrument();
    let tries = 0;
    await retry(async () => {
      if (++tries < 3) throw new VersionConflictError('otel_orders', 1, 2);
      return 'ok';
    });
    await expect(
      updateVersioned(db.sql, { table: 'otel_orders', key: { id: 1 }, set: { total: 300 }, expected: 99 }),
    ).rejects.toBeInstanceOf(VersionConflictError);
    expect(await guardedUpdate(db.sql, { table: 'otel_orders', key: { id: 1 }, set: { refunded: 10 }, guard: 'refunded > 1000' })).toEqual({
      status: 'guard-failed',
    });
    await guardedUpdate(db.sql, { table: 'otel_orders', key: { id: 1 }, set: { refunded: 10 }, guard: 'refunded = 0' });

    // a lease whose term ran out: its fenced write is refused, and renewing it reports it lost
    const lease = await acquireLease(db.sql, 'lease:fenced', { ttlMs: 5000, renewEveryMs: false });
    await db.sql`update pgcoord.leases set expires_at = clock_timestamp() where name = 'lease:fenced'`;
    await expect(withFence(db.sql, lease, (tx: typeof db.sql) => tx`update otel_orders set refunded = 0`)).rejects.toBeInstanceOf(
      LeaseLostError,
    );
    await expect(lease.renew()).rejects.toBeInstanceOf(LeaseLostError);

    const m = await collect(reader);
    expect(m.get('pgcoord.retries')?.points.map((p) => [p.attributes, p.count])).toEqual([
      [{ 'db.system.name': 'postgresql', 'db.operation.name': 'retry', 'pgcoord.retry.reason': 'version-conflict' }, 2],
    ]);
    expect(total(m, 'pgcoord.write.conflicts', { 'pgcoord.conflict.kind': 'version', 'db.operation.name': 'updateVersioned' })).toBe(1);
    expect(total(m, 'pgcoord.write.conflicts', { 'pgcoord.conflict.kind': 'guard', 'db.operation.name': 'guardedUpdate' })).toBe(1);
    expect(total(m, 'pgcoord.write.conflicts')).toBe(2);
    expect(total(m, 'pgcoord.operation.duration', { 'db.operation.name': 'guardedUpdate', 'pgcoord.outcome': 'written' })).toBe(1);
    expect(m.get('pgcoord.fence.rejections')?.points.map((p) => [p.attributes, p.count])).toEqual([
      [{ 'db.system.name': 'postgresql', 'db.operation.name': 'withFence', 'error.type': 'PGCOORD_LEASE_LOST' }, 1],
    ]);
    expect(m.get('pgcoord.holds.lost')?.points.map((p) => [p.attributes, p.count])).toEqual([
      [{ 'db.system.name': 'postgresql', 'pgcoord.lost.kind': 'lease', 'pgcoord.lost.reason': 'lost' }, 1],
    ]);
  });

  it('idempotency outcomes (first, replay, in-flight, mismatch) and rate-limit decisions', async () => {
    const { reader } = instrument();
    await idempotent(db.sql, { scope: 's', key: 'k1', request: { amount: 1 } }, () => 1);
    await idempotent(db.sql, { scope: 's', key: 'k1', request: { amount: 1 } }, () => 1);
    await expect(idempotent(db.sql, { scope: 's', key: 'k1', request: { amount: 2 } }, () => 1)).rejects.toBeInstanceOf(
      IdempotencyMismatchError,
    );
    let release!: () => void;
    const blocked = new Promise<void>((r) => {
      release = r;
    });
    const first = idempotent(db.sql, { scope: 's', key: 'k2' }, () => blocked.then(() => 2));
    await sleep(100);
    await expect(idempotent(db.sql, { scope: 's', key: 'k2', waitMs: 0 }, () => 2)).rejects.toBeInstanceOf(IdempotencyInFlightError);
    release();
    await first;

    await limit(db.sql, 'api:acme', { rate: 1, per: 60_000 });
    await limit(db.sql, 'api:acme', { rate: 1, per: 60_000 });
    await limit(db.sql, 'api:acme', { rate: 1, per: 60_000 });

    const m = await collect(reader);
    const idem = 'pgcoord.idempotency.requests';
    expect(total(m, idem, { 'pgcoord.outcome': 'first' })).toBe(2);
    expect(total(m, idem, { 'pgcoord.outcome': 'replay' })).toBe(1);
    expect(total(m, idem, { 'pgcoord.outcome': 'mismatch', 'error.type': 'PGCOORD_IDEMPOTENCY_MISMATCH' })).toBe(1);
    expect(total(m, idem, { 'pgcoord.outcome': 'in-flight', 'error.type': 'PGCOORD_IDEMPOTENCY_IN_FLIGHT' })).toBe(1);
    expect(total(m, idem)).toBe(5);
    expect(total(m, 'pgcoord.limit.decisions', { 'pgcoord.outcome': 'allowed', 'db.operation.name': 'limit' })).toBe(1);
    expect(total(m, 'pgcoord.limit.decisions', { 'pgcoord.outcome': 'denied' })).toBe(2);
  });

  it('queue jobs enqueued and processed by outcome, with messaging attributes and producer / consumer spans', async () => {
    const { reader, spans } = instrument();
    await enqueue(db.sql, 'otel-q', 'order:1', { n: 1 });
    await enqueue(db.sql, 'otel-q', 'order:2', { n: 2 }, { dedupeKey: 'd' });
    await enqueue(db.sql, 'otel-q', 'order:2', { n: 2 }, { dedupeKey: 'd' });
    const ran: number[] = [];
    const worker = work<{ n: number }>(
      db.sql,
      'otel-q',
      (job) => {
        ran.push(job.payload.n);
        if (job.payload.n === 2) throw new Error('no');
      },
      { maxAttempts: 1 },
    );
    const processed = async () => total(await collect(reader), 'pgcoord.queue.jobs.processed');
    for (let i = 0; i < 200 && (await processed()) < 2; i++) await sleep(20);
    await worker.stop();

    const m = await collect(reader);
    const messaging = {
      'messaging.system': 'pgcoord',
      'messaging.destination.name': 'otel-q',
      'db.system.name': 'postgresql',
    };
    expect(
      total(m, 'pgcoord.queue.jobs.enqueued', { ...messaging, 'messaging.operation.type': 'send', 'pgcoord.outcome': 'enqueued' }),
    ).toBe(2);
    expect(total(m, 'pgcoord.queue.jobs.enqueued', { 'pgcoord.outcome': 'deduplicated' })).toBe(1);
    expect(
      total(m, 'pgcoord.queue.jobs.processed', { ...messaging, 'messaging.operation.type': 'process', 'pgcoord.outcome': 'completed' }),
    ).toBe(1);
    expect(total(m, 'pgcoord.queue.jobs.processed', { 'pgcoord.outcome': 'dead' })).toBe(1);

    const finished = spans.getFinishedSpans();
    const send = finished.filter((s) => s.name === 'send otel-q');
    expect(send).toHaveLength(3);
    expect(send[0]?.kind).toBe(3); // SpanKind.PRODUCER
    const process = finished.filter((s) => s.name === 'process otel-q');
    expect(process.map((s) => s.kind)).toEqual([4, 4]); // SpanKind.CONSUMER
    expect(process.map((s) => s.attributes['pgcoord.outcome']).sort()).toEqual(['completed', 'dead']);
    expect(process[0]?.attributes).toMatchObject({ ...messaging, 'messaging.operation.type': 'process', 'pgcoord.attempts': 1 });
  });

  it('one span per operation, status ERROR with the error type, nested in the pgcoord operation that runs it', async () => {
    const { spans } = instrument();
    let tries = 0;
    await retry(async () => {
      tries++;
      const [o] = await db.sql`select version from otel_orders where id = 1`;
      await updateVersioned(db.sql, { table: 'otel_orders', key: { id: 1 }, set: { total: 200 }, expected: tries === 1 ? 99 : o?.version });
    });
    await withLock(db.sql, 'order:5', async () => {
      await limit(db.sql, 'api:nested', { rate: 10, per: 1000 });
    });
    await expect(withLock(db.sql, 'order:5', () => Promise.reject(new Error('boom')))).rejects.toThrow();

    const finished = spans.getFinishedSpans();
    const byName = (name: string) => finished.filter((s) => s.name === name);
    const [retrySpan] = byName('pgcoord.retry');
    expect(retrySpan?.attributes).toMatchObject({
      'db.system.name': 'postgresql',
      'db.operation.name': 'retry',
      'pgcoord.attempts': 2,
      'pgcoord.retry.reasons': ['version-conflict'],
    });
    expect(retrySpan?.status.code).toBe(0); // UNSET: it succeeded
    const versioned = byName('pgcoord.updateVersioned');
    expect(versioned.length).toBeGreaterThanOrEqual(1);
    expect(versioned[0]?.status).toEqual({ code: 2, message: 'PGCOORD_VERSION_CONFLICT' }); // ERROR, the code not the message
    for (const v of versioned) expect(v.parentSpanContext?.spanId).toBe(retrySpan?.spanContext().spanId);
    expect(versioned[0]?.spanContext().traceId).toBe(retrySpan?.spanContext().traceId);

    const [lockSpan, failedLock] = byName('pgcoord.withLock');
    const [limitSpan] = byName('pgcoord.limit');
    expect(limitSpan?.parentSpanContext?.spanId).toBe(lockSpan?.spanContext().spanId);
    expect(lockSpan?.parentSpanContext).toBeUndefined();
    expect(lockSpan?.attributes).toMatchObject({ 'pgcoord.outcome': 'acquired' });
    expect(lockSpan?.attributes['pgcoord.lock.wait.duration']).toBeGreaterThanOrEqual(0);
    expect(lockSpan?.attributes['pgcoord.lock.hold.duration']).toBeGreaterThanOrEqual(0);
    expect(failedLock?.status).toEqual({ code: 2, message: 'Error' });
    expect(failedLock?.attributes['error.type']).toBe('Error');
    expect(finished.every((s) => s.ended && s.instrumentationScope.name === 'pgcoord')).toBe(true);
  });

  it('no raw key in any attribute by default; hash puts a SHA-256 prefix; a function is the opt-in to names', async () => {
    const keys = ['order:secret-1', 'alice@example.com', 'lease:bob', 'api:carol', 'q-key:dave'];
    const run = async () => {
      await withLock(db.sql, ['order:secret-1', 'alice@example.com'], () => 1);
      const lease = await acquireLease(db.sql, 'lease:bob', { ttlMs: 5000, renewEveryMs: false });
      await db.sql`update pgcoord.leases set expires_at = clock_timestamp() where name = 'lease:bob'`;
      await expect(withFence(db.sql, lease, () => 1)).rejects.toBeInstanceOf(LeaseLostError);
      await expect(lease.renew()).rejects.toBeInstanceOf(LeaseLostError);
      await limit(db.sql, 'api:carol', { rate: 5, per: 1000 });
      await enqueue(db.sql, 'otel-keys', 'q-key:dave', {});
    };

    let r = instrument();
    await run();
    let m = await collect(r.reader);
    let values = allAttributeValues(m, r.spans.getFinishedSpans());
    expect(values.length).toBeGreaterThan(20);
    const text = JSON.stringify(values);
    for (const key of keys) expect(text).not.toContain(key);
    for (const metric of m.values()) for (const p of metric.points) expect(p.attributes).not.toHaveProperty('pgcoord.key');
    r.otel.stop();

    r = instrument({ keyAttribute: 'hash' });
    await run();
    m = await collect(r.reader);
    values = allAttributeValues(m, r.spans.getFinishedSpans());
    for (const key of keys) expect(JSON.stringify(values)).not.toContain(key);
    const hash = (label: string) => createHash('sha256').update(label).digest('hex').slice(0, 16);
    // lock keys as pgcoord labels them (a string JSON-quoted), joined in lock order
    const lockPoint = m.get('pgcoord.lock.wait.duration')?.points.find((p) => p.attributes['db.operation.name'] === 'withLock');
    expect(String(lockPoint?.attributes['pgcoord.key']).split(',').sort()).toEqual(
      [hash('"order:secret-1"'), hash('"alice@example.com"')].sort(),
    );
    expect(m.get('pgcoord.holds.lost')?.points[0]?.attributes['pgcoord.key']).toBe(hash('lease:bob'));
    expect(m.get('pgcoord.fence.rejections')?.points[0]?.attributes['pgcoord.key']).toBe(hash('lease:bob'));
    expect(r.spans.getFinishedSpans().find((s) => s.name === 'pgcoord.limit')?.attributes['pgcoord.key']).toBe(hash('api:carol'));
    r.otel.stop();

    r = instrument({
      keyAttribute: (key) => {
        if (key.includes('@')) throw new Error('a mapper that throws leaves the key out');
        return key.replace(/^"/, '').split(':')[0] as string;
      },
    });
    await run();
    m = await collect(r.reader);
    expect(m.get('pgcoord.lock.wait.duration')?.points.map((p) => p.attributes['pgcoord.key'])).toEqual(['order', 'lease']); // alice@ left out
    expect(total(m, 'pgcoord.limit.decisions', { 'pgcoord.key': 'api' })).toBe(1);
    expect(total(m, 'pgcoord.queue.jobs.enqueued', { 'pgcoord.key': 'q-key' })).toBe(1);
    expect(total(m, 'pgcoord.holds.lost', { 'pgcoord.key': 'lease' })).toBe(1);
  });

  it('stop() unsubscribes everything: later operations record nothing and the channels have no subscriber', async () => {
    const quiet = () => TRACE_FAMILIES.every((f) => !traceChannels[f].hasSubscribers) && !lostChannel.hasSubscribers;
    expect(quiet()).toBe(true);
    const { otel, reader, spans } = instrument();
    expect(TRACE_FAMILIES.every((f) => traceChannels[f].hasSubscribers)).toBe(true);
    expect(lostChannel.hasSubscribers).toBe(true);
    await withLock(db.sql, 'order:7', () => 1);
    const before = await collect(reader);
    expect(total(before, 'pgcoord.operation.duration')).toBe(1);
    expect(spans.getFinishedSpans()).toHaveLength(1);
    otel.stop();
    otel.stop(); // twice is fine
    expect(quiet()).toBe(true);
    await withLock(db.sql, 'order:7', () => 1);
    await limit(db.sql, 'api:after', { rate: 5, per: 1000 });
    const after = await collect(reader);
    expect(total(after, 'pgcoord.operation.duration')).toBe(1);
    expect(total(after, 'pgcoord.limit.decisions')).toBe(0);
    expect(spans.getFinishedSpans()).toHaveLength(1);
  });

  it('bad options: InvalidOptionError before anything is subscribed', () => {
    const bad: unknown[] = [
      null,
      'hash',
      { keyAttribute: 'raw' },
      { keyAttribute: 42 },
      { meterProvider: {} },
      { tracerProvider: { getTracer: 1 } },
      { keyAtribute: 'hash' },
    ];
    for (const options of bad) {
      expect(() => instrumentPgcoord(options as InstrumentOptions), JSON.stringify(options)).toThrow(InvalidOptionError);
      expect(TRACE_FAMILIES.some((f) => traceChannels[f].hasSubscribers) || lostChannel.hasSubscribers).toBe(false);
    }
    expect(() => instrumentPgcoord({ keyAttribute: 'raw' as never })).toThrow(/keyAttribute must be 'none', 'hash' or a function/);
  });
});
