// Diagnostics: every family of operations publishes on its TracingChannel (start, then asyncEnd or
// error, with one context object carrying the operation, its keys and its outcome), holds lost
// between operations go to pgcoord:lost, and subscribing changes no statement that is sent.
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { afterEach, describe, expect, it } from 'vitest';
import {
  acquireLease,
  acquireSessionLock,
  enqueue,
  guardedUpdate,
  type HoldWarning,
  holdWarningChannel,
  idempotent,
  LeaseLostError,
  type LostEvent,
  limit,
  lostChannel,
  migrateIdempotency,
  migrateLeases,
  migrateLimits,
  migrateQueue,
  retry,
  TRACE_FAMILIES,
  type TraceContext,
  traceChannels,
  tryAcquireLease,
  tryWithLock,
  updateVersioned,
  VersionConflictError,
  warnOnLongHolds,
  withLock,
  withRowLock,
  work,
} from '../src/index.js';
import { sleep, useTestDb } from './helpers.js';

// the caller's frame a hold warning must point at (this file)
const THIS_FILE = 'trace.test.ts';

const db = await useTestDb(8);
await migrateIdempotency(db.sql);
await migrateLeases(db.sql);
await migrateLimits(db.sql);
await migrateQueue(db.sql);
await db.sql`create table trace_orders (id int primary key, total int not null, refunded int not null default 0, version int not null default 1)`;
await db.sql`insert into trace_orders values (1, 200, 0, 1)`;

interface Seen {
  family: string;
  event: 'start' | 'asyncEnd' | 'error';
  ctx: TraceContext;
}

let seen: Seen[] = [];
let stop: (() => void) | undefined;
const record = () => {
  seen = [];
  const subs = TRACE_FAMILIES.map((family) => {
    const handlers = {
      start: (ctx: TraceContext) => seen.push({ family, event: 'start', ctx }),
      end: () => {},
      asyncStart: () => {},
      asyncEnd: (ctx: TraceContext) => seen.push({ family, event: 'asyncEnd', ctx }),
      error: (ctx: TraceContext) => seen.push({ family, event: 'error', ctx }),
    };
    traceChannels[family].subscribe(handlers as never);
    return () => traceChannels[family].unsubscribe(handlers as never);
  });
  stop = () => {
    for (const s of subs) s();
  };
};
afterEach(() => stop?.());
const ended = (operation: string) => seen.find((s) => s.event !== 'start' && s.ctx.operation === operation);

describe('diagnostics channels', () => {
  it('each family publishes start and end with its operation, keys and outcome', async () => {
    record();
    await withLock(db.sql, 'order:1', async () => {
      await sleep(20);
    });
    await db.sql.begin(async (tx) => {
      const held = await tryWithLock(db.sql, 'order:1', () => 1).catch(() => undefined);
      expect(held).toMatchObject({ acquired: true });
      await withLock(tx, 'order:2', () => 1);
      const other = await tryWithLock(db.pool, 'order:2', () => 1);
      expect(other.acquired).toBe(false);
    });
    const session = await acquireSessionLock(db.sql, 'session:1');
    await session.release();
    await withRowLock(db.sql, { table: 'trace_orders', key: { id: 1 } }, () => 1);
    expect(
      await guardedUpdate(db.sql, { table: 'trace_orders', key: { id: 1 }, set: { refunded: 10 }, guard: 'refunded = 0' }),
    ).toMatchObject({
      status: 'applied',
    });
    await expect(
      updateVersioned(db.sql, { table: 'trace_orders', key: { id: 1 }, set: { total: 300 }, expected: 99 }),
    ).rejects.toBeInstanceOf(VersionConflictError);
    let tries = 0;
    await retry(async () => {
      if (++tries < 3) throw new VersionConflictError('trace_orders', 1, 2);
      return 'ok';
    });
    await idempotent(db.sql, { scope: 's', key: 'k1' }, () => 1);
    await idempotent(db.sql, { scope: 's', key: 'k1' }, () => 1);
    const lease = await acquireLease(db.sql, 'lease:1', { ttlMs: 5000 });
    expect(await tryAcquireLease(db.pool, 'lease:1', { ttlMs: 5000 })).toBeUndefined();
    await lease.release();
    await limit(db.sql, 'api', { rate: 1, per: 60_000 });
    await limit(db.sql, 'api', { rate: 1, per: 60_000 });
    await enqueue(db.sql, 'traced', 'k', { n: 1 });
    const worker = work(db.sql, 'traced', () => {});
    for (let i = 0; i < 100 && !ended('process'); i++) await sleep(20);
    await worker.stop();

    const lock = ended('withLock');
    expect(lock).toMatchObject({ family: 'lock', event: 'asyncEnd', ctx: { keys: ['"order:1"'], outcome: 'acquired' } });
    expect(lock?.ctx.waitMs).toBeGreaterThanOrEqual(0);
    expect(lock?.ctx.holdMs).toBeGreaterThanOrEqual(15);
    expect(seen.filter((s) => s.ctx.operation === 'tryWithLock' && s.event === 'asyncEnd').map((s) => s.ctx.outcome)).toEqual([
      'acquired',
      'not-acquired',
    ]);
    expect(ended('acquireSessionLock')).toMatchObject({ family: 'session-lock', event: 'asyncEnd' });
    expect(ended('withRowLock')?.ctx.waitMs).toBeGreaterThanOrEqual(0);
    expect(ended('guardedUpdate')).toMatchObject({ family: 'write', event: 'asyncEnd' });
    expect(ended('updateVersioned')).toMatchObject({ family: 'write', event: 'error' });
    expect(ended('updateVersioned')?.ctx.error).toBeInstanceOf(VersionConflictError);
    expect(ended('retry')?.ctx).toMatchObject({ attempts: 3, reasons: ['version-conflict', 'version-conflict'] });
    expect(seen.filter((s) => s.ctx.operation === 'idempotent' && s.event === 'asyncEnd').map((s) => s.ctx.outcome)).toEqual([
      'first',
      'replay',
    ]);
    expect(ended('acquireLease')).toMatchObject({ family: 'lease', ctx: { keys: ['lease:1'] } });
    expect(ended('tryAcquireLease')?.ctx.outcome).toBe('not-acquired');
    expect(seen.filter((s) => s.ctx.operation === 'limit' && s.event === 'asyncEnd').map((s) => s.ctx.outcome)).toEqual([
      'allowed',
      'denied',
    ]);
    expect(ended('enqueue')?.ctx).toMatchObject({ queue: 'traced', keys: ['k'], outcome: 'enqueued' });
    expect(ended('process')?.ctx).toMatchObject({ queue: 'traced', keys: ['k'], attempts: 1, outcome: 'completed' });
    // every start has its end, and each family was seen
    for (const s of seen.filter((x) => x.event === 'start')) expect(seen.some((e) => e.event !== 'start' && e.ctx === s.ctx)).toBe(true);
    expect(new Set(seen.map((s) => s.family))).toEqual(new Set(TRACE_FAMILIES));
  });

  it('a lease lost between operations is published on pgcoord:lost', async () => {
    const lost: LostEvent[] = [];
    const onLost = (e: unknown) => lost.push(e as LostEvent);
    subscribe(lostChannel.name, onLost);
    try {
      const lease = await acquireLease(db.sql, 'lease:lost', { ttlMs: 1000, renewEveryMs: false });
      await db.sql`update pgcoord.leases set expires_at = clock_timestamp() where name = 'lease:lost'`;
      await expect(lease.renew()).rejects.toBeInstanceOf(LeaseLostError);
      expect(lost).toEqual([{ kind: 'lease', keys: ['lease:lost'], reason: 'lost' }]);
    } finally {
      unsubscribe(lostChannel.name, onLost);
    }
  });

  it('subscribing sends the same statements (round trips counted on the socket)', async () => {
    const { sql: counting, writes } = db.countingSql();
    const refund = () => withLock(counting, 'order:9', async (tx) => tx`select 1`);
    await refund(); // warm: prepared statements, connection
    const before = writes.count;
    await refund();
    const plain = writes.count - before;
    record();
    const traced = writes.count;
    await refund();
    expect(writes.count - traced).toBe(plain);
    expect(ended('withLock')).toBeDefined();
  });

  it('a lock or session lock held past the threshold is warned once, with its keys and the stack of the call that took it; a short hold is not', async () => {
    const warnings: HoldWarning[] = [];
    const onWarning = (w: unknown) => warnings.push(w as HoldWarning);
    subscribe(holdWarningChannel.name, onWarning);
    warnOnLongHolds(100);
    try {
      await withLock(db.sql, 'order:short', async () => {});
      await withLock(db.sql, 'order:stuck', () => sleep(350));
      const lock = await acquireSessionLock(db.sql, 'export:stuck');
      await sleep(250);
      await lock.release();
      await sleep(150); // a released hold never warns late
      expect(warnings.map((w) => [w.kind, w.keys, w.heldMs])).toEqual([
        // the keys as every lock event labels them (a string key JSON-quoted)
        ['lock', ['"order:stuck"'], 100],
        ['session-lock', ['"export:stuck"'], 100],
      ]);
      for (const w of warnings) expect(w.stack.split('\n')[0]).toContain(THIS_FILE);
    } finally {
      warnOnLongHolds(undefined);
      unsubscribe(holdWarningChannel.name, onWarning);
    }
    // off: nothing watched
    await withLock(db.sql, 'order:stuck', () => sleep(150));
    expect(warnings).toHaveLength(2);
    // with nobody subscribed: a process warning
    const emitted: Error[] = [];
    const onProcessWarning = (w: Error) => emitted.push(w);
    process.on('warning', onProcessWarning);
    warnOnLongHolds(50);
    try {
      await withLock(db.sql, 'order:stuck', () => sleep(150));
      await sleep(20);
    } finally {
      warnOnLongHolds(undefined);
      process.off('warning', onProcessWarning);
    }
    expect(emitted.map((w) => (w as Error & { code?: string }).code)).toEqual(['PGCOORD_LONG_HOLD']);
    expect(() => warnOnLongHolds(0)).toThrow(/thresholdMs/);
    expect(() => warnOnLongHolds(1.5)).toThrow(/thresholdMs/);
  });
});
