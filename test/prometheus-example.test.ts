// examples/prometheus.ts on a free port against the test database: refunds under the order's lock
// (granted, waited out, rate-limited), then /metrics scraped over HTTP shows pgcoord's histograms
// and counters with the values those requests must give, and no order key in any label.
import { afterAll, describe, expect, it } from 'vitest';
import * as example from '../examples/prometheus.js';
import { withLock } from '../src/index.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(8);
// The example types its pool as the development driver's (postgres.js 4): the one under test
// (./pgjs.ts) has the same surface for what it uses.
type PgjsSql = Parameters<typeof example.setUp>[0];
const sql = db.newSql() as unknown as PgjsSql;
await example.setUp(sql);

const server = await example.start(sql, { port: 0, lockTimeoutMs: 100, refundsPerMinute: 6 });
afterAll(() => server.close());

const refund = (orderId: number, amount: number) =>
  fetch(`${server.url}/orders/${orderId}/refunds`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ amount_cents: amount }),
  });

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The exposition format's sample lines: `name{label="value",...} number`. */
function parse(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const [, k, v] of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[k as string] = v as string;
    samples.push({ name: m[1] as string, labels, value: Number(m[3]) });
  }
  return samples;
}

/** The sum of the samples named `name` whose labels include `match`. */
const sum = (samples: Sample[], name: string, match: Record<string, string> = {}) =>
  samples.filter((s) => s.name === name && Object.entries(match).every(([k, v]) => s.labels[k] === v)).reduce((n, s) => n + s.value, 0);

describe('examples/prometheus.ts', () => {
  it('a scrape of /metrics shows the lock waits, holds, outcomes and rate-limit decisions of the refunds made', async () => {
    // five refunds of one order at once: they take turns under its lock; the fifth exceeds the total
    const statuses = await Promise.all([1, 2, 3, 4, 5].map(() => refund(1, 5000).then((r) => r.status)));
    expect(statuses.sort()).toEqual([201, 201, 201, 201, 422]);
    // while another transaction holds the order's lock, a refund waits 100 ms and answers 409
    // (this withLock is in the same process: the example's instrumentation records it too)
    await withLock(db.sql, 'order:1', async () => {
      expect((await refund(1, 1)).status).toBe(409);
    });
    // the seventh refund of the order this minute is over its rate
    const limited = await refund(1, 1);
    expect(limited.status).toBe(429);
    expect(Number(limited.headers.get('retry-after'))).toBeGreaterThan(0);

    const res = await fetch(`${server.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('text/plain');
    const text = await res.text();
    const samples = parse(text);

    expect(text).toContain('# TYPE pgcoord_lock_wait_duration histogram');
    expect(text).toContain('# UNIT pgcoord_lock_wait_duration s');
    expect(text).toContain('# TYPE pgcoord_limit_decisions_total counter');
    const withLockWait = { db_operation_name: 'withLock', pgcoord_lock_kind: 'advisory', db_system_name: 'postgresql' };
    const wait = 'pgcoord_lock_wait_duration';
    // five refunds and the test's own lock were granted; one refund timed out after its 100 ms
    expect(sum(samples, `${wait}_count`, { ...withLockWait, pgcoord_outcome: 'acquired', pgcoord_key: 'order' })).toBe(6);
    expect(sum(samples, `${wait}_count`, { ...withLockWait, pgcoord_outcome: 'timeout', error_type: 'PGCOORD_LOCK_TIMEOUT' })).toBe(1);
    expect(sum(samples, `${wait}_sum`, { pgcoord_outcome: 'timeout' })).toBeGreaterThanOrEqual(0.09);
    expect(sum(samples, `${wait}_sum`, { pgcoord_outcome: 'timeout' })).toBeLessThan(5);
    // a bucket's le="+Inf" is the count
    expect(sum(samples, `${wait}_bucket`, { pgcoord_outcome: 'acquired', le: '+Inf' })).toBe(6);
    // holds: the six granted locks, the test's own held for the whole 100 ms wait
    const hold = 'pgcoord_lock_hold_duration';
    expect(sum(samples, `${hold}_count`, withLockWait)).toBe(6);
    expect(sum(samples, `${hold}_sum`, withLockWait)).toBeGreaterThanOrEqual(0.09);
    expect(sum(samples, 'pgcoord_operation_duration_count', { db_operation_name: 'withLock' })).toBe(7);

    expect(sum(samples, 'pgcoord_limit_decisions_total', { pgcoord_outcome: 'allowed', pgcoord_key: 'refunds' })).toBe(6);
    expect(sum(samples, 'pgcoord_limit_decisions_total', { pgcoord_outcome: 'denied', pgcoord_key: 'refunds' })).toBe(1);

    // the key attribute is the key's kind only
    expect(text).not.toMatch(/order:1/);
    expect(new Set(samples.map((s) => s.labels.pgcoord_key).filter(Boolean))).toEqual(new Set(['order', 'refunds']));
  });
});
