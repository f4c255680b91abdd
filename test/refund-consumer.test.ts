// examples/refund-consumer.ts as the seed tells it: three instances (each a process with the API and
// a consumer), three $200 refund requests for one $200 order sent at once through different
// instances, more orders with mixed amounts, a consumer SIGKILLed right after its decision committed,
// and an instance SIGKILLed while it holds orders mid-decision. Checked on the rows: every request
// decided, each order's in enqueue order, nothing refunded twice, never more than the order's total.
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import * as example from '../examples/refund-consumer.js';
import { queueStats } from '../src/index.js';
import { runTs, sleep, useTestDb } from './helpers.js';

// small pools: three instances (10 connections each) connect too, beside the other test file running at once
const db = await useTestDb(4);
type PgjsSql = Parameters<typeof example.setUp>[0];
const sql = db.sql as unknown as PgjsSql;
await example.setUp(sql);

const script = fileURLToPath(new URL('../examples/refund-consumer.ts', import.meta.url));
const crashConsumer = fileURLToPath(new URL('./fixtures/refund-crash-consumer.ts', import.meta.url));
const env = { DATABASE_URL: db.url, CLAIM_TTL_MS: '3000' };

/** A process's end: its last JSON line, or why it did not exit 0. */
type Ended = { out?: { pid: number; role: string; stopped: boolean }; error?: Error };
interface Instance {
  url: string;
  pid: number;
  exited: Promise<Ended>;
}
const instances: Instance[] = [];
const alive = new Set<number>();

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as AddressInfo;
  await new Promise((r) => s.close(r));
  return port;
}

/** An instance of the example (API + consumer), ready once its /health answers. */
async function startInstance(): Promise<Instance> {
  const port = await freePort();
  const exited = runTs<{ pid: number; role: string; stopped: boolean }>(script, ['both'], {
    env: { ...env, PORT: String(port) },
    timeoutMs: 300_000, // killed by then, whatever happens (afterAll kills it sooner)
  }).then(
    (out): Ended => ({ out }),
    (error: Error): Ended => ({ error }),
  );
  let gone: Error | undefined;
  void exited.then((e) => {
    gone = e.error ?? new Error('exited');
  });
  const url = `http://127.0.0.1:${port}`;
  for (const end = Date.now() + 90_000; ; await sleep(100)) {
    if (gone) throw new Error(`instance on port ${port} exited before it answered: ${gone.message}`);
    if (Date.now() > end) throw new Error(`instance on port ${port} did not answer within 90 s`);
    const health = await fetch(`${url}/health`).then(
      (r) => r.json() as Promise<{ pid: number }>,
      () => undefined,
    );
    if (health) {
      alive.add(health.pid);
      void exited.then(() => alive.delete(health.pid));
      return { url, pid: health.pid, exited };
    }
  }
}

async function post(instance: Instance, orderId: number | string, body: unknown, contentType = 'application/json') {
  const res = await fetch(`${instance.url}/orders/${orderId}/refunds`, {
    method: 'POST',
    headers: { 'content-type': contentType },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  return {
    status: res.status,
    type: res.headers.get('content-type'),
    location: res.headers.get('location'),
    body: (await res.json()) as Record<string, string>,
  };
}

interface Status {
  id: string;
  orderId: number;
  amount: number;
  requester: string;
  status: 'pending' | 'approved' | 'rejected';
  reason: string | null;
}

/** Poll the status endpoints (through `via`, in turn) until no request is pending. */
async function settle(ids: string[], via: Instance[], ms = 60_000): Promise<Map<string, Status>> {
  const seen = new Map<string, Status>();
  const end = Date.now() + ms;
  for (let round = 0; ; round++) {
    const pending = ids.filter((id) => seen.get(id)?.status !== 'approved' && seen.get(id)?.status !== 'rejected');
    if (pending.length === 0) return seen;
    if (Date.now() > end) throw new Error(`${pending.length} refund requests still pending after ${ms} ms`);
    await Promise.all(
      pending.map(async (id, i) => {
        const res = await fetch(`${(via[(i + round) % via.length] as Instance).url}/refunds/${id}`);
        expect(res.status).toBe(200);
        seen.set(id, (await res.json()) as Status);
      }),
    );
    await sleep(200);
  }
}

// mulberry32: the same "random" orders on every run
function random(seed: number) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('examples/refund-consumer.ts', () => {
  afterAll(async () => {
    // whatever a failed test left running
    for (const pid of alive) process.kill(pid, 'SIGKILL');
    await Promise.all(instances.map((i) => i.exited));
  });

  it('three $200 requests for a $200 order through three instances: one approved; crashes lose and double nothing', async () => {
    const pick = random(20260512);
    const from = <T>(xs: readonly T[]) => xs[Math.floor(pick() * xs.length)] as T;
    const orders = new Map<number, number>([
      [1, 20_000], // the seed's order: $200
      [2, 20_000], // the one whose consumer dies after its decision
    ]);
    for (let id = 10; id < 50; id++) orders.set(id, from([5_000, 10_000, 20_000, 35_000]));
    for (const [id, total] of orders) await db.sql`insert into orders (id, total_cents) values (${id}, ${total})`;
    const ids: string[] = [];

    // 1. A consumer dies (SIGKILL) the moment its first decision committed, before the queue heard
    // the job was done. The job is still queued, its order held by the dead consumer's claim.
    for (const [amount, who] of [
      [6_000, 'customer'],
      [10_000, 'seller'],
    ] as const) {
      ids.push((await example.requestRefund(sql, 2, amount, who)) as string);
    }
    await expect(runTs(crashConsumer, [], { env, timeoutMs: 120_000 })).rejects.toThrow(/exited null: decided job \d+, now SIGKILL/);
    expect(await db.sql`select status from refund_requests where order_id = 2 order by job_id`).toEqual([
      { status: 'approved' },
      { status: 'pending' },
    ]);
    expect(await db.sql`select refunded_cents from orders where id = 2`).toEqual([{ refunded_cents: 6_000 }]);
    expect(await db.sql`select count(*)::int as n from pgcoord.queue_jobs`).toEqual([{ n: 2 }]);

    // 2. Three instances, each a process with the API and a consumer.
    instances.push(...(await Promise.all([startInstance(), startInstance(), startInstance()])));
    const [a, b, c] = instances as [Instance, Instance, Instance];

    // 3. The seed's race: three $200 requests for the $200 order, at once, through three instances.
    const race = await Promise.all(
      (['customer', 'seller', 'fraud-system'] as const).map((requester, i) =>
        post(instances[i] as Instance, 1, { amount: 20_000, requester }),
      ),
    );
    for (const r of race) {
      expect(r.status).toBe(202);
      expect(r.body).toEqual({ id: expect.any(String), status: 'pending', statusUrl: `/refunds/${r.body.id}` });
      expect(r.location).toBe(r.body.statusUrl);
      ids.push(r.body.id as string);
    }

    const amounts = [2_500, 5_000, 7_500, 10_000, 15_000, 20_000];
    const requesters = ['customer', 'seller', 'fraud-system'];

    // 4. Orders 10-29 are locked by this test (FOR NO KEY UPDATE: requests can still be recorded),
    // so every consumer that approves one of them waits inside its decision, holding the order.
    let unlock!: () => void;
    const locked = new Promise<void>((r) => {
      unlock = r;
    });
    let lockTaken!: () => void;
    const lockReady = new Promise<void>((r) => {
      lockTaken = r;
    });
    const locking = db.sql.begin(async (tx) => {
      await tx`select id from orders where id between 10 and 29 for no key update`;
      lockTaken();
      await locked;
    });
    await lockReady;
    let heldByC: string[] = [];
    try {
      const wave1 = [...orders.keys()]
        .filter((id) => id >= 10 && id < 30)
        .flatMap((id) => Array.from({ length: 2 + Math.floor(pick() * 4) }, () => id));
      const posted1 = await Promise.all(
        wave1.map((id) => post(from(instances), id, { amount: from(amounts), requester: from(requesters) })),
      );
      for (const r of posted1) expect(r.status).toBe(202);
      ids.push(...posted1.map((r) => r.body.id as string));

      // 5. Instance c is SIGKILLed while it holds orders, its decisions open (waiting on the lock).
      const held = async () =>
        (await db.sql`select key from pgcoord.queue_keys where holder_label like ${`%:${c.pid}`} and ready_at > clock_timestamp()`).map(
          (r) => r.key as string,
        );
      for (const end = Date.now() + 30_000; heldByC.length === 0 && Date.now() < end; await sleep(20)) heldByC = await held();
      expect(heldByC.length).toBeGreaterThan(0);
      process.kill(c.pid, 'SIGKILL');
      expect((await c.exited).error?.message).toMatch(/exited null/);
      await sleep(300);
    } finally {
      unlock();
      await locking;
    }

    // 6. More requests through the two instances left: new orders, and more for the locked ones
    // (queued behind the requests the dead instance held).
    const wave2 = [...orders.keys()].filter((id) => id >= 10).flatMap((id) => (id < 30 ? [id] : [id, id, id]));
    const posted2 = await Promise.all(
      wave2.map((id, i) => post(i % 2 ? a : b, id, { amount: from(amounts), requester: from(requesters) })),
    );
    for (const r of posted2) expect(r.status).toBe(202);
    ids.push(...posted2.map((r) => r.body.id as string));

    // 7. Every request decided, as the status endpoints say.
    const statuses = await settle(ids, [a, b]);
    const rows = await db.sql`select id, order_id, amount_cents, status, reason, decided_at from refund_requests order by order_id, job_id`;
    expect(rows).toHaveLength(ids.length);
    for (const r of rows)
      expect(statuses.get(r.id)).toMatchObject({ orderId: r.order_id, amount: r.amount_cents, status: r.status, reason: r.reason });
    const refunded = new Map(
      (await db.sql`select id, refunded_cents from orders`).map((o) => [o.id as number, o.refunded_cents as number]),
    );

    // The seed's order: exactly one of the three $200 requests approved.
    expect(
      rows
        .filter((r) => r.order_id === 1)
        .map((r) => r.status)
        .sort(),
    ).toEqual(['approved', 'rejected', 'rejected']);
    // The crashed consumer's order: its $60 refunded once (run twice, it would leave $80, not $140,
    // for the $100 after it).
    expect(rows.filter((r) => r.order_id === 2).map((r) => r.status)).toEqual(['approved', 'approved']);
    expect(refunded.get(2)).toBe(16_000);

    // Each order's requests decided in enqueue order: replaying them in job order gives the same
    // decisions, and their decision times follow that order. The refunded total is what was
    // approved, once (no decision counted twice), and never more than the order's total.
    for (const [id, total] of orders) {
      const mine = rows.filter((r) => r.order_id === id);
      let left = total;
      const expected = mine.map((r) => {
        if (r.amount_cents > left) return 'rejected';
        left -= r.amount_cents;
        return 'approved';
      });
      expect({ order: id, decisions: mine.map((r) => r.status) }).toEqual({ order: id, decisions: expected });
      for (let i = 1; i < mine.length; i++) expect(mine[i]?.decided_at.getTime()).toBeGreaterThanOrEqual(mine[i - 1]?.decided_at.getTime());
      expect(refunded.get(id)).toBe(total - left);
      expect(refunded.get(id)).toBeLessThanOrEqual(total);
    }
    for (const r of rows.filter((r) => r.status === 'rejected'))
      expect(r.reason).toMatch(/^only \$\d+\.\d\d of order \d+ is left to refund/);

    // Nothing left in the queue, nothing dead; one stored decision per job.
    expect(await queueStats(db.sql, example.QUEUE)).toEqual([]);
    expect(
      await db.sql`select state, count(*)::int as n from pgcoord.idempotency_keys where scope = ${example.QUEUE} group by state`,
    ).toEqual([{ state: 'completed', n: ids.length }]);
    console.log(
      `refunds: ${ids.length} requests on ${orders.size} orders; instance ${c.pid} killed holding ${heldByC.join(', ')}; ${rows.filter((r) => r.status === 'approved').length} approved`,
    );
  }, 240_000); // three processes to start (tsx, migrations) on a loaded host, two claims to run out

  it('bad input is a 4xx with a JSON problem, never a crash; nothing is recorded', async () => {
    const [a] = instances as [Instance];
    const before = await db.sql`select count(*)::int as n from refund_requests`;
    const bad: [string, number | string, unknown, string | undefined, number][] = [
      ['not JSON', 1, '{"amount": 100,', undefined, 400],
      ['not a JSON content type', 1, 'amount=100', 'text/plain', 415],
      ['a JSON string', 1, '"refund"', undefined, 400],
      ['null', 1, 'null', undefined, 400],
      ['an array', 1, [{ amount: 100, requester: 'x' }], undefined, 400],
      ['no amount', 1, { requester: 'customer' }, undefined, 400],
      ['negative amount', 1, { amount: -20_000, requester: 'customer' }, undefined, 400],
      ['zero amount', 1, { amount: 0, requester: 'customer' }, undefined, 400],
      ['fractional amount', 1, { amount: 199.5, requester: 'customer' }, undefined, 400],
      ['huge amount', 1, '{"amount": 1e300, "requester": "customer"}', undefined, 400],
      ['amount past an int', 1, { amount: 2 ** 31, requester: 'customer' }, undefined, 400],
      ['amount as a string', 1, { amount: '200', requester: 'customer' }, undefined, 400],
      ['no requester', 1, { amount: 100 }, undefined, 400],
      ['NUL in requester', 1, { amount: 100, requester: 'cust\u0000omer' }, undefined, 400],
      ['lone surrogate in requester', 1, '{"amount": 100, "requester": "\\ud800"}', undefined, 400],
      ['requester too long', 1, { amount: 100, requester: 'x'.repeat(101) }, undefined, 400],
      ['body too large', 1, { amount: 100, requester: 'x', pad: 'y'.repeat(20_000) }, undefined, 413],
      ['unknown order', 999_999, { amount: 100, requester: 'customer' }, undefined, 404],
      ['order id not a number', 'abc', { amount: 100, requester: 'customer' }, undefined, 404],
      ['order id past an int', '99999999999', { amount: 100, requester: 'customer' }, undefined, 404],
      ['order id that does not decode', '%E0%A4%A', { amount: 100, requester: 'customer' }, undefined, 400],
    ];
    for (const [what, orderId, body, type, status] of bad) {
      const r = await post(a, orderId, body, type);
      expect({ what, status: r.status, type: r.type }).toEqual({
        what,
        status,
        type: expect.stringMatching(/^application\/problem\+json/),
      });
      expect(r.body).toMatchObject({ status, title: expect.any(String), detail: expect.any(String) });
    }
    for (const path of ['/refunds/nope', `/refunds/${randomUUID()}`, '/orders/1/refunds', '/nowhere']) {
      const res = await fetch(`${a.url}${path}`);
      expect({ path, status: res.status, type: res.headers.get('content-type') }).toEqual({
        path,
        status: 404,
        type: expect.stringMatching(/^application\/problem\+json/),
      });
    }
    expect(await db.sql`select count(*)::int as n from refund_requests`).toEqual(before);
    expect((await fetch(`${a.url}/health`)).status).toBe(200);
  });

  it('SIGTERM: the instances left stop cleanly (running decisions finish, orders released)', async () => {
    const running = instances.filter((i) => alive.has(i.pid));
    expect(running).toHaveLength(2);
    for (const i of running) process.kill(i.pid, 'SIGTERM');
    for (const i of running) expect(await i.exited).toEqual({ out: { pid: i.pid, role: 'both', stopped: true } });
  });
});
