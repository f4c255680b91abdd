// Idempotency and the connection pool: waiting duplicates hold no connection while they wait,
// phased requests do not deadlock their own pool, and a duplicate refused inside a caller's
// transaction leaves that transaction usable.
import { performance } from 'node:perf_hooks';
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { drizzle as drizzlePgjs } from 'drizzle-orm/postgres-js';
import { describe, expect, it } from 'vitest';
import { IdempotencyInFlightError, idempotent, migrate } from '../src/idempotency/index.js';
import { guardedUpdate } from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(8);
const table = { schema: 'idem_pool', table: 'keys' };
await migrate(db.sql, table);
await db.sql`create table pool_accounts (id int primary key, balance int not null)`;
await db.sql`insert into pool_accounts values (1, 0)`;
await db.sql`create table pool_ledger (key text, note text)`;
await db.sql`create table pool_phases (key text, phase text)`;

const pools = [
  { name: 'postgres.js', make: (max: number) => db.newSql({ max }) },
  { name: 'pg', make: (max: number) => db.newPool({ max }) },
];

describe('duplicates waiting for an in-flight key hold no pooled connection', () => {
  for (const p of pools) {
    it(`pool max 4, a 2 s request in flight, 4 duplicates waiting: an unrelated statement is not blocked; all replay (${p.name})`, async () => {
      const pool = p.make(4);
      const key = `wait-${p.name}`;
      let runs = 0;
      const call = () =>
        idempotent(pool, { scope: 's', key, request: { amount: 1 }, table }, async ({ tx }) => {
          runs++;
          await q(tx, 'insert into pool_ledger (key, note) values ($1, $2)', [key, 'first']);
          await sleep(2000);
          return { ok: true, at: 1 };
        });
      const first = call();
      await sleep(200); // the first one holds the key (uncommitted)
      const duplicates = Array.from({ length: 4 }, () => call());
      await sleep(500); // every duplicate is waiting now
      const times: number[] = [];
      for (let i = 0; i < 3; i++) {
        const t0 = performance.now();
        const r = await guardedUpdate(pool, { table: 'pool_accounts', key: { id: 1 }, set: 'balance = balance + 1', guard: 'true' });
        times.push(performance.now() - t0);
        expect(r.status).toBe('applied');
        await sleep(100);
      }
      expect(Math.max(...times)).toBeLessThan(500);
      const results = await Promise.all([first, ...duplicates]);
      expect(runs).toBe(1);
      expect(results.map((r) => r.replayed)).toEqual([false, true, true, true, true]);
      for (const r of results) expect(r.value).toEqual({ ok: true, at: 1 });
      expect(await db.sql`select note from pool_ledger where key = ${key}`).toHaveLength(1);
    });
  }
});

const phasedPools = [
  ...pools,
  { name: 'drizzle postgres-js', make: (max: number) => drizzlePgjs(db.newSql({ max })) },
  { name: 'drizzle node-postgres', make: (max: number) => drizzlePg(db.newPool({ max })) },
];

describe('phased requests do not deadlock their own pool', () => {
  for (const p of phasedPools) {
    it(`pool max 3, 6 concurrent phased requests whose gateway call outlasts the lease: all succeed (${p.name})`, async () => {
      const pool = p.make(3);
      let gatewayCalls = 0;
      const gateway = async () => {
        gatewayCalls++;
        await sleep(1500); // longer than the lease (1 s) and its heartbeat period (333 ms)
        return { id: `ch_${gatewayCalls}` };
      };
      const started = performance.now();
      const results = await Promise.all(
        Array.from({ length: 6 }, (_, i) =>
          idempotent(pool, { scope: 's', key: `phased-${p.name}-${i}`, table, mode: 'phased', leaseMs: 1000 }, async (ctx) => {
            const charge = await ctx.phase('charge', async (tx) => {
              const c = await gateway();
              await q(tx, 'insert into pool_phases (key, phase) values ($1, $2)', [ctx.key, 'charge']);
              return c;
            });
            await ctx.phase('record', async (tx) => {
              // a pgcoord call as the phase's first statement joins the phase's transaction
              const r = await guardedUpdate(tx as object, {
                table: 'pool_accounts',
                key: { id: 1 },
                set: 'balance = balance + 1',
                guard: 'true',
              });
              expect(r.status).toBe('applied');
              await q(tx, 'insert into pool_phases (key, phase) values ($1, $2)', [ctx.key, 'record']);
            });
            return { charge };
          }),
        ),
      );
      expect(results.every((r) => !r.replayed)).toBe(true);
      expect(gatewayCalls).toBe(6);
      // concurrent, not one pool slot at a time
      expect(performance.now() - started).toBeLessThan(6000);
      const rows = await db.sql`select count(*)::int as n from pool_phases where key like ${`phased-${p.name}-%`}`;
      expect(rows[0]?.n).toBe(12);
    });
  }
});

describe('a duplicate refused inside a caller transaction', () => {
  for (const kind of db.runners.filter((r) => r.inTx)) {
    it(`a caught IdempotencyInFlightError leaves the transaction usable and its rows commit (${kind.name})`, async () => {
      const key = `in-tx-${kind.name}`;
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      // the first copy, in flight elsewhere (its claim uncommitted, on another connection)
      const first = idempotent(db.sql, { scope: 's', key, table }, async () => {
        await gate;
        return 'first';
      });
      await sleep(150);
      await kind.use(async (tx) => {
        await q(tx, 'insert into pool_ledger (key, note) values ($1, $2)', [key, 'before']);
        const err = await idempotent(tx, { scope: 's', key, table, waitMs: 400 }, () => 'second').catch((e: unknown) => e);
        expect(err).toBeInstanceOf(IdempotencyInFlightError);
        await q(tx, 'insert into pool_ledger (key, note) values ($1, $2)', [key, 'after']);
      });
      release();
      expect((await first).value).toBe('first');
      const notes = (await db.sql`select note from pool_ledger where key = ${key} order by note`).map((r) => r.note);
      expect(notes).toEqual(['after', 'before']);
      // and the key replays the first copy's result to the caller's next try
      const again = await idempotent(db.sql, { scope: 's', key, table }, () => 'third');
      expect(again).toEqual({ value: 'first', replayed: true });
    });
  }
});
