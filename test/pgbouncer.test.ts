// pgcoord behind a real PgBouncer (test/fixtures/pgbouncer.ts), through postgres.js and
// node-postgres.
//
// Transaction mode: session locks are refused with TransactionPoolingError and leave nothing held;
// transaction advisory locks, row locks, idempotency keys and leases stay correct under
// concurrency: N concurrent $200 refunds of a $200 order, exactly one applied.
// Statement mode: every pgcoord transaction is refused at once with a typed error (no hang).
//
// Drivers: postgres.js gets `prepare: false` unless PgBouncer tracks named prepared statements
// (1.21+ with max_prepared_statements, which the fixture sets), and `max_pipeline: 1` (4.x hangs
// behind PgBouncer 1.18 when it pipelines autocommit statements: see the fixture). node-postgres
// has no such switch, and pgcoord sends its parameterised statements as named prepared statements
// (src/driver/node-postgres.ts): below 1.21 those fail behind transaction pooling (the KNOWN BUG
// below reproduces it). There the node-postgres runs strip the statement names on each client,
// which is what an app can do until the fix, so the rest of pgcoord is still tested through pg.
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { doctor } from '../src/cli/api.js';
import {
  acquireLease,
  acquireSessionLock,
  ConnectionLostError,
  guardedUpdate,
  idempotent,
  LeaseLostError,
  LeaseNotAcquiredError,
  migrateIdempotency,
  migrateLeases,
  type Runner,
  TransactionPoolingError,
  transaction,
  tryAcquireSessionLock,
  withFence,
  withLock,
  withRowLock,
} from '../src/index.js';
import {
  PGBOUNCER_MISSING,
  PGBOUNCER_PREPARED,
  type PgBouncer,
  type PgBouncerOptions,
  pgbouncerSuite,
  startPgBouncer,
} from './fixtures/pgbouncer.js';
import { q, sleep, useTestDb } from './helpers.js';
import postgres from './pgjs.js';

const db = await useTestDb(4);
const dbName = new URL(db.url).pathname.slice(1);
await migrateIdempotency(db.sql);
await migrateLeases(db.sql);
await db.sql`create table pgb_orders (id int primary key, total int not null, refunded int not null default 0)`;
await db.sql`create table pgb_refunds (order_id int not null, amount int not null)`;

/** Concurrent requests per race. */
const N = 20;
const AMOUNT = 200;

let nextOrder = 0;
async function newOrder(): Promise<number> {
  const id = ++nextOrder;
  await db.sql`insert into pgb_orders (id, total) values (${id}, ${AMOUNT})`;
  return id;
}
/** The order as the database has it (read directly, not through PgBouncer). */
async function orderState(id: number) {
  const [o] =
    await db.sql`select refunded, (select count(*)::int from pgb_refunds where order_id = ${id}) as refunds from pgb_orders where id = ${id}`;
  return { refunded: o?.refunded as number, refunds: o?.refunds as number };
}

const advisoryHolders = async () =>
  (
    await db.sql`select pid from pg_locks where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database()) and granted order by pid`
  ).map((r) => r.pid as number);

/** Counts callbacks inside a critical section at once; `max` must stay 1. */
function section() {
  let inside = 0;
  const s = {
    max: 0,
    async run<T>(fn: () => Promise<T>): Promise<T> {
      inside++;
      s.max = Math.max(s.max, inside);
      try {
        return await fn();
      } finally {
        inside--;
      }
    },
  };
  return s;
}

/** Read the order, wait (the window a racing request would use), refund if it is still refundable. */
async function refundIn(tx: unknown, id: number): Promise<boolean> {
  const [o] = await q(tx, 'select total, refunded from pgb_orders where id = $1', [id]);
  await q(tx, 'select pg_sleep(0.005)');
  if ((o!.refunded as number) + AMOUNT > (o!.total as number)) return false;
  await q(tx, 'update pgb_orders set refunded = refunded + $1 where id = $2', [AMOUNT, id]);
  await q(tx, 'insert into pgb_refunds (order_id, amount) values ($1, $2)', [id, AMOUNT]);
  return true;
}

interface Opened {
  runner: Runner;
  end(): Promise<void>;
}
interface Driver {
  name: string;
  open(bouncer: PgBouncer, max: number): Opened;
}

// Below PgBouncer 1.21 a node-postgres client must not send named statements (see the header).
const stripNames = !PGBOUNCER_PREPARED;
const drivers: Driver[] = [
  {
    name: 'postgres.js',
    open(bouncer, max) {
      const sql = postgres(bouncer.url(db.url), { max, ...bouncer.pgjsOptions, onnotice: () => {} });
      return { runner: sql, end: () => sql.end({ timeout: 1 }) };
    },
  },
  {
    name: stripNames ? 'node-postgres (statement names stripped: PgBouncer < 1.21)' : 'node-postgres',
    open(bouncer, max) {
      const pool = new pg.Pool({ connectionString: bouncer.url(db.url), max });
      pool.on('error', () => {});
      if (stripNames)
        pool.on('connect', (client) => {
          const query = client.query.bind(client) as (...args: unknown[]) => unknown;
          (client as unknown as { query: (...args: unknown[]) => unknown }).query = (config: unknown, ...rest: unknown[]) => {
            if (config && typeof config === 'object' && 'name' in config) {
              const { name: _name, ...unnamed } = config as Record<string, unknown>;
              return query(unnamed, ...rest);
            }
            return query(config, ...rest);
          };
        });
      return { runner: pool, end: () => pool.end() };
    },
  },
];

/** A PgBouncer for one describe block, and the pools opened on it (closed before it stops). */
function useBouncer(options: PgBouncerOptions = {}) {
  const state = { bouncer: undefined as unknown as PgBouncer, opened: [] as Opened[] };
  beforeAll(async () => {
    state.bouncer = await startPgBouncer(db.url, options);
  });
  afterAll(async () => {
    await Promise.all(state.opened.map((o) => o.end()));
    await state.bouncer?.stop();
  });
  return {
    get bouncer() {
      return state.bouncer;
    },
    open(driver: Driver, max = 8): Runner {
      const o = driver.open(state.bouncer, max);
      state.opened.push(o);
      return o.runner;
    },
  };
}

const settle = <T>(p: Promise<T>) =>
  p.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );

describe.skipIf(PGBOUNCER_MISSING !== undefined)(pgbouncerSuite('behind PgBouncer in transaction mode'), () => {
  const txMode = useBouncer({ mode: 'transaction', poolSize: 4 });
  // server_round_robin: a client's consecutive transactions land on different servers, as they do
  // on a busy PgBouncer, deterministically
  const rotating = useBouncer({ mode: 'transaction', poolSize: 2, roundRobin: true });

  for (const driver of drivers) {
    describe(driver.name, () => {
      it('session locks are refused with TransactionPoolingError, and nothing is left held', async () => {
        await rotating.bouncer.warm(db.url);
        const runner = rotating.open(driver, 2);
        for (const key of ['pooled-a', 'pooled-b', 'pooled-c']) {
          const err = await acquireSessionLock(runner, key).catch((e: unknown) => e);
          expect(err).toBeInstanceOf(TransactionPoolingError);
          expect(err).toMatchObject({ code: 'PGCOORD_TRANSACTION_POOLING' });
          await expect(tryAcquireSessionLock(runner, key)).rejects.toBeInstanceOf(TransactionPoolingError);
        }
        expect(await rotating.bouncer.servers(dbName)).toBeGreaterThan(1);
        for (let i = 0; i < 20 && (await advisoryHolders()).length; i++) await sleep(100);
        expect(await advisoryHolders()).toEqual([]);
        // transaction-scoped locks are the answer there, and they work
        expect(await withLock(runner, 'pooled-a', () => 'ok')).toBe('ok');
        expect(await advisoryHolders()).toEqual([]);
      });

      it(`withLock: ${N} concurrent $${AMOUNT} refunds of a $${AMOUNT} order, exactly one applied`, async () => {
        const runner = txMode.open(driver);
        const id = await newOrder();
        const s = section();
        const results = await Promise.all(
          Array.from({ length: N }, () => withLock(runner, `order:${id}`, (tx) => s.run(() => refundIn(tx, id)), { timeoutMs: 30_000 })),
        );
        expect(results.filter(Boolean)).toHaveLength(1);
        expect(s.max).toBe(1);
        expect(await orderState(id)).toEqual({ refunded: AMOUNT, refunds: 1 });
        expect(await txMode.bouncer.servers(dbName)).toBeGreaterThan(1);
        expect(await advisoryHolders()).toEqual([]);
      });

      it(`withRowLock: ${N} concurrent $${AMOUNT} refunds of a $${AMOUNT} order, exactly one applied`, async () => {
        const runner = txMode.open(driver);
        const id = await newOrder();
        const s = section();
        const results = await Promise.all(
          Array.from({ length: N }, () =>
            withRowLock(runner, { table: 'pgb_orders', key: { id } }, (_row, tx) => s.run(() => refundIn(tx, id))),
          ),
        );
        expect(results.filter(Boolean)).toHaveLength(1);
        expect(s.max).toBe(1);
        expect(await orderState(id)).toEqual({ refunded: AMOUNT, refunds: 1 });
      });

      it(`idempotent: ${N} concurrent retries of one refund request run it once, and all get its answer`, async () => {
        const runner = txMode.open(driver);
        const id = await newOrder();
        let runs = 0;
        const results = await Promise.all(
          Array.from({ length: N }, () =>
            idempotent(
              runner,
              { scope: 'pgbouncer', key: `refund-${driver.name}-${id}`, request: { order: id, amount: AMOUNT }, waitMs: 30_000 },
              async ({ tx }) => {
                runs++;
                return { applied: await refundIn(tx, id) };
              },
            ),
          ),
        );
        expect(runs).toBe(1);
        expect(results.filter((r) => !r.replayed)).toHaveLength(1);
        for (const r of results) expect(r.value).toEqual({ applied: true });
        expect(await orderState(id)).toEqual({ refunded: AMOUNT, refunds: 1 });
      });

      it(`leases: ${N} concurrent acquires, one winner, whose fenced refund is applied once`, async () => {
        const runner = txMode.open(driver);
        const id = await newOrder();
        const name = `refund:${driver.name}:${id}`;
        const tries = await Promise.all(
          Array.from({ length: N }, () => settle(acquireLease(runner, name, { ttlMs: 30_000, timeoutMs: 0 }))),
        );
        const won = tries.flatMap((t) => (t.ok ? [t.value] : []));
        expect(won).toHaveLength(1);
        for (const t of tries) if (!t.ok) expect(t.error).toBeInstanceOf(LeaseNotAcquiredError);
        const lease = won[0]!;
        expect(await withFence(runner, lease, (tx) => refundIn(tx, id))).toBe(true);
        expect(await lease.release()).toBe(true);
        expect(await orderState(id)).toEqual({ refunded: AMOUNT, refunds: 1 });
      });

      it('leases: waiters take turns, fences grow, never two holders at once', async () => {
        const runner = txMode.open(driver);
        const id = await newOrder();
        const s = section();
        const fences: bigint[] = [];
        // Behind transaction pooling no notification reaches the LISTEN connection: a waiter sees a
        // release at its next look (every 5 s, as pgcoord takes the listener for live).
        const results = await Promise.all(
          Array.from({ length: 3 }, async () => {
            const lease = await acquireLease(runner, `turns:${driver.name}:${id}`, { ttlMs: 30_000, timeoutMs: 45_000 });
            try {
              fences.push(lease.fence);
              return await s.run(() => withFence(runner, lease, (tx) => refundIn(tx, id)));
            } finally {
              await lease.release();
            }
          }),
        );
        expect(results.filter(Boolean)).toHaveLength(1);
        expect(s.max).toBe(1);
        expect(new Set(fences).size).toBe(3);
        expect(fences).toEqual([...fences].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
        expect(await orderState(id)).toEqual({ refunded: AMOUNT, refunds: 1 });
      }, 60_000);

      it('leases: a write fenced by a term taken over is refused by the database, nothing written', async () => {
        const runner = txMode.open(driver);
        const id = await newOrder();
        const name = `takeover:${driver.name}:${id}`;
        const old = await acquireLease(runner, name, { ttlMs: 300, renewEveryMs: false });
        await sleep(450);
        const next = await acquireLease(runner, name, { ttlMs: 30_000, timeoutMs: 0 });
        expect(next.fence).toBeGreaterThan(old.fence);
        // the old holder's fence, as another system would carry it (no signal: the database decides)
        const err = await withFence(runner, { name, fence: old.fence }, (tx) => refundIn(tx, id)).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(LeaseLostError);
        expect(await orderState(id)).toEqual({ refunded: 0, refunds: 0 });
        expect(await withFence(runner, next, (tx) => refundIn(tx, id))).toBe(true);
        await next.release();
        await old.release();
      });
    });
  }
});

describe.skipIf(PGBOUNCER_MISSING !== undefined)(pgbouncerSuite('behind PgBouncer in statement mode'), () => {
  const stmtMode = useBouncer({ mode: 'statement', poolSize: 2 });

  for (const driver of drivers) {
    it(`every pgcoord transaction is refused at once with ConnectionLostError (08P01 from PgBouncer), nothing written (${driver.name})`, async () => {
      const runner = stmtMode.open(driver, 2);
      const id = await newOrder();
      const lease = await acquireLease(runner, `stmt:${driver.name}:${id}`, { ttlMs: 30_000, timeoutMs: 0 });
      // each on a pool of its own: postgres.js 3.4 leaves a pool whose connection PgBouncer closed
      // this way unusable (its next statements fail with 08P01, then wait for a connection)
      const attempts: [string, (runner: Runner) => Promise<unknown>][] = [
        ['withLock', (r) => withLock(r, `order:${id}`, (tx) => refundIn(tx, id))],
        ['withRowLock', (r) => withRowLock(r, { table: 'pgb_orders', key: { id } }, (_row, tx) => refundIn(tx, id))],
        ['transaction', (r) => transaction(r, (tx) => refundIn(tx, id))],
        ['idempotent', (r) => idempotent(r, { scope: 'pgbouncer-stmt', key: `k-${id}` }, ({ tx }) => refundIn(tx, id))],
        ['withFence', (r) => withFence(r, lease, (tx) => refundIn(tx, id))],
        ['acquireSessionLock', (r) => acquireSessionLock(r, `order:${id}`)],
      ];
      for (const [what, attempt] of attempts) {
        const own = stmtMode.open(driver, 1);
        const t0 = performance.now();
        const err = await attempt(own).catch((e: unknown) => e);
        expect(performance.now() - t0, what).toBeLessThan(5000);
        expect(err, what).toBeInstanceOf(ConnectionLostError);
        // PgBouncer answers BEGIN with 08P01 and closes the connection: pg gives that error as the
        // cause; postgres.js the error or the close, whichever it met first (3.4: always the close)
        const cause = (err as Error).cause as { code?: string; message?: string };
        if (cause.code === 'CONNECTION_CLOSED') expect(driver.name, what).toBe('postgres.js');
        else
          expect(cause, what).toMatchObject({
            code: '08P01',
            message: expect.stringMatching(/transaction blocks not allowed in statement pooling mode/),
          });
      }
      expect(await orderState(id)).toEqual({ refunded: 0, refunds: 0 });
      expect(await advisoryHolders()).toEqual([]);
      // what is one statement works there: a guarded update, a lease's acquire and release
      const r = await guardedUpdate(runner, {
        table: 'pgb_orders',
        key: { id },
        set: 'refunded = refunded + $1',
        guard: 'refunded + $1 <= total',
        params: [AMOUNT],
      });
      expect(r).toMatchObject({ status: 'applied' });
      expect(await lease.release()).toBe(true);
    });
  }
});

describe.skipIf(PGBOUNCER_MISSING !== undefined)(pgbouncerSuite('KNOWN BUGS behind PgBouncer in transaction mode (src/ to fix)'), () => {
  // PgBouncer's defaults: LIFO server reuse, here one server per pool.
  const single = useBouncer({ mode: 'transaction', poolSize: 1 });

  // acquireSessionLock detects a pooler only when the backend pid changes between its statements.
  // PgBouncer hands a lone client the server it just released (LIFO), so nothing changes: the lock
  // is granted on a pooled server that every other client shares. With pool_size = 1 two clients
  // both "hold" the same exclusive lock. (doctor, probing with two connections, does flag it.)
  it.fails('session locks are refused on a pooled server even when the pid does not change (two clients hold one exclusive lock today)', async () => {
    const a = single.open(drivers[0]!, 1);
    const b = single.open(drivers[0]!, 1);
    const locks: { release(): Promise<void> }[] = [];
    try {
      const first = await acquireSessionLock(a, 'shared-by-accident').catch((e: unknown) => e);
      if (first && typeof first === 'object' && 'release' in first) locks.push(first as { release(): Promise<void> });
      const second = await tryAcquireSessionLock(b, 'shared-by-accident').catch((e: unknown) => e);
      if (second && typeof second === 'object' && 'release' in second) locks.push(second as { release(): Promise<void> });
      expect(first).toBeInstanceOf(TransactionPoolingError);
      expect(second).toBeInstanceOf(TransactionPoolingError);
    } finally {
      for (const lock of locks) await lock.release();
    }
  });

  it('doctor flags that same setup as a hazard', async () => {
    // (and the locks granted above were released: checked here, as a failure above is expected)
    expect(await advisoryHolders()).toEqual([]);
    const report = await doctor({ runner: single.open(drivers[0]!, 2) });
    expect(report.findings.find((f) => f.id === 'transaction-pooler')).toMatchObject({
      severity: 'hazard',
      message: expect.stringMatching(/waited \d+ ms while another connection held a transaction open: they share backends/),
    });
  });

  // pgcoord sends its parameterised statements as named prepared statements on node-postgres
  // (src/driver/node-postgres.ts, prepared()). PgBouncer < 1.21 does not track them: a second
  // client's Parse of the same name on a server that has it fails with 42P05, and a client that
  // prepared it on one server fails with 26000 on the next. An untyped driver error either way.
  (PGBOUNCER_PREPARED ? it : it.fails)('node-postgres: two pools take the same lock one after the other', async () => {
    const plain = () => {
      const pool = new pg.Pool({ connectionString: single.bouncer.url(db.url), max: 1 });
      pool.on('error', () => {});
      return pool;
    };
    const [p1, p2] = [plain(), plain()];
    try {
      expect(await settle(withLock(p1, 'named', () => 1))).toEqual({ ok: true, value: 1 });
      expect(await settle(withLock(p2, 'named', () => 2))).toEqual({ ok: true, value: 2 });
    } finally {
      await Promise.all([p1.end(), p2.end()]);
    }
  });
});
