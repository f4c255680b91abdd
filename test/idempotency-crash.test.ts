// Crashes and leases: a worker process SIGKILLed mid-handler, then a retry; phased mode resumes
// after the last committed phase and a fake gateway (deduplicating by its own idempotency key) is
// charged once. Plus lease loss aborting the handler's signal.
import { type ChildProcess, spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { drizzle } from 'drizzle-orm/postgres-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IdempotencyLeaseLostError, idempotent, migrate } from '../src/idempotency/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(16);
const table = { schema: 'idem_crash', table: 'keys' };
await migrate(db.sql, table);
await db.sql`create table crash_ledger (key text, note text)`;
await db.sql`create table crash_phases (key text, phase text, who text)`;

// The fake payment gateway: one charge per idempotency key, however often it is called.
const charges = new Map<string, string>();
let gatewayCalls = 0;
let gateway: Server;
let gatewayUrl = '';
beforeAll(async () => {
  gateway = createServer((req, res) => {
    gatewayCalls++;
    const key = String(req.headers['idempotency-key']);
    if (!charges.has(key)) charges.set(key, `ch_${charges.size + 1}`);
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ id: charges.get(key) }));
  });
  gateway.listen(0, '127.0.0.1');
  await new Promise((r) => gateway.once('listening', r));
  gatewayUrl = `http://127.0.0.1:${(gateway.address() as AddressInfo).port}`;
});
afterAll(() => new Promise<void>((r) => gateway.close(() => r())));

const worker = fileURLToPath(new URL('./fixtures/idempotency-worker.ts', import.meta.url));

// Start the worker and resolve once it prints "HANG <where>", i.e. it is inside the handler.
function startWorker(args: string[], where: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', worker, ...args], {
    env: { ...process.env, DATABASE_URL: db.url },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stdout!.on('data', (d) => {
      out += d;
      if (out.includes(`HANG ${where}`)) resolve(child);
    });
    child.stderr!.on('data', (d) => (err += d));
    child.once('exit', (code) => reject(new Error(`worker exited (${code}) before HANG ${where}: ${err}`)));
  });
}

async function kill(child: ChildProcess) {
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await exited;
}

describe('a worker killed mid-handler', () => {
  it('transactional: everything rolls back; the retry runs the handler once', async () => {
    const child = await startWorker(['transactional', 'tx-crash', 'handler'], 'handler');
    await kill(child);
    let runs = 0;
    const r = await idempotent(drizzle(db.sql), { scope: 'crash', key: 'tx-crash', table, waitMs: 10_000 }, async ({ tx, attempt }) => {
      runs++;
      await q(tx, `insert into crash_ledger (key, note) values ('tx-crash', 'retry')`);
      return { attempt };
    });
    expect(runs).toBe(1);
    expect(r).toEqual({ value: { attempt: 1 }, replayed: false }); // the killed attempt left nothing behind
    expect((await db.sql`select note from crash_ledger where key = 'tx-crash'`).map((x) => x.note)).toEqual(['retry']);
  });

  for (const hangIn of ['ship', 'charge'] as const) {
    it(`phased, killed in "${hangIn}": the retry waits out the lease, resumes after the last committed phase, the gateway charges once`, async () => {
      const key = `ph-${hangIn}`;
      const child = await startWorker(['phased', key, hangIn, gatewayUrl], hangIn);
      const callsBefore = gatewayCalls;
      await kill(child);
      const ran: string[] = [];
      const started = performance.now();
      const r = await idempotent(
        drizzle(db.sql),
        { scope: 'crash', key, table, mode: 'phased', leaseMs: 1000, heartbeatMs: 200, waitMs: 10_000 },
        async (ctx) => {
          expect(ctx.attempt).toBe(2);
          expect(ctx.recoveryPoint).toBe(hangIn === 'ship' ? 'charge' : 'reserve');
          await ctx.phase('reserve', async (tx) => {
            ran.push('reserve');
            await q(tx, `insert into crash_phases (key, phase, who) values ($1, 'reserve', 'retry')`, [key]);
          });
          const charge = await ctx.phase('charge', async (tx, p) => {
            ran.push('charge');
            const res = await fetch(`${gatewayUrl}/charge`, { method: 'POST', headers: { 'idempotency-key': p.key } });
            await q(tx, `insert into crash_phases (key, phase, who) values ($1, 'charge', 'retry')`, [key]);
            return (await res.json()) as { id: string };
          });
          await ctx.phase('ship', async () => {
            ran.push('ship');
          });
          return { shipped: true, charge: charge.id };
        },
      );
      // The lease (1 s) had to expire first: the retry could not take over a live lease.
      expect(performance.now() - started).toBeGreaterThan(300);
      expect(ran).toEqual(hangIn === 'ship' ? ['ship'] : ['charge', 'ship']);
      const committed = await db.sql`select phase, who from crash_phases where key = ${key} order by phase`;
      expect(committed.map((x) => `${x.phase}:${x.who}`)).toEqual(
        hangIn === 'ship' ? ['charge:worker', 'reserve:worker'] : ['charge:retry', 'reserve:worker'],
      );
      // The gateway was called once or twice (a killed phase is re-run) but always with the same key.
      const keys = [...charges.keys()].filter((k) => charges.get(k) === r.value.charge);
      expect(keys).toHaveLength(1);
      expect(gatewayCalls - callsBefore).toBe(hangIn === 'ship' ? 0 : 1);
      expect(r.value.shipped).toBe(true);
    });
  }
});

describe('phased mode', () => {
  it('a thrown error frees the key at once; the retry resumes after the committed phases', async () => {
    const ran: string[] = [];
    const job = (failInShip: boolean) =>
      idempotent(db.sql, { scope: 'p', key: 'resume-1', table, mode: 'phased', leaseMs: 1000 }, async (ctx) => {
        const a = await ctx.phase('a', () => {
          ran.push('a');
          return { n: 1 };
        });
        await ctx.phase('b', () => {
          ran.push('b');
          if (failInShip) throw new Error('gateway down');
        });
        return { a, attempt: ctx.attempt };
      });
    await expect(job(true)).rejects.toThrow('gateway down');
    const r = await job(false);
    expect(ran).toEqual(['a', 'b', 'b']);
    expect(r.value).toEqual({ a: { n: 1 }, attempt: 2 });
    expect(await job(false)).toEqual({ value: { a: { n: 1 }, attempt: 2 }, replayed: true });
  });

  it('50 parallel calls run once (waiters poll the committed running row)', async () => {
    let runs = 0;
    const results = await Promise.all(
      Array.from({ length: 50 }, () =>
        idempotent(db.sql, { scope: 'p', key: 'par-phased', table, mode: 'phased', leaseMs: 2000 }, async (ctx) => {
          runs++;
          await ctx.phase('one', () => sleep(100));
          return 'ok';
        }),
      ),
    );
    expect(runs).toBe(1);
    expect(results.every((r) => r.value === 'ok')).toBe(true);
  });

  it('losing the lease aborts the handler signal and nothing more commits', async () => {
    const err = await idempotent(
      db.sql,
      { scope: 'p', key: 'lost-1', table, mode: 'phased', leaseMs: 600, heartbeatMs: 100 },
      async (ctx) => {
        await ctx.phase('first', () => 1);
        // Another attempt takes the key over (as after a lease expiry): the token changes.
        await db.sql.unsafe(`update "idem_crash"."keys" set lease_token = gen_random_uuid() where key = 'lost-1'`);
        await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve, { once: true }));
        expect(ctx.signal.reason).toBeInstanceOf(IdempotencyLeaseLostError);
        await ctx.phase('second', () => 2);
        return 'unreachable';
      },
    ).catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyLeaseLostError);
    expect(err.code).toBe('PGCOORD_IDEMPOTENCY_LEASE_LOST');
    const [row] = await db.sql.unsafe(`select recovery_point, state from "idem_crash"."keys" where key = 'lost-1'`);
    expect(row).toEqual({ recovery_point: 'first', state: 'running' });
  });

  it('phase keys are stable across attempts of one (scope, key) and differ across scopes', async () => {
    const seen: string[] = [];
    const job = (scope: string, fail: boolean) =>
      idempotent(db.sql, { scope, key: 'pk', table, mode: 'phased' }, (ctx) => {
        seen.push(`${scope}:${ctx.attempt}:${ctx.phaseKey('charge')}`);
        if (fail) throw new Error('retry me');
      });
    await expect(job('p', true)).rejects.toThrow('retry me');
    await job('p', false);
    await job('q', false);
    const [p1, p2, q1] = seen.map((x) => x.split(':'));
    expect([p1![1], p2![1], q1![1]]).toEqual(['1', '2', '1']);
    expect(p2![2]).toBe(p1![2]);
    expect(q1![2]).not.toBe(p1![2]);
    expect(p1![2]).toMatch(/^[0-9a-f]{64}$/);
  });
});
