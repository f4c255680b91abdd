// Two of the seed's scenarios as examples, checked on the rows.
// examples/refund-storm.ts: three $200 refunds of a $200 order sent at once from three processes
// (each an "instance"), released together by a start barrier: the naive code pays $600 (its 50 ms
// gateway call between read and write makes that certain), each pgcoord strategy pays $200 once.
// examples/account-creation.ts: the signup crashes (a throw, then a SIGKILLed process) at each
// point between and inside its phases; the retry with the same key leaves exactly one user in the
// auth provider, in the SaaS tool and in the database, the row naming both; a repeat replays.
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import * as accounts from '../examples/account-creation.js';
import * as storm from '../examples/refund-storm.js';
import { acquireSessionLock } from '../src/index.js';
import { runTs, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(8);
// The examples type their pools as the development driver's (postgres.js 4); the one under test
// (./pgjs.ts) has the same surface for what they use.
type PgjsSql = Parameters<typeof storm.setUp>[0];
const sql = db.sql as unknown as PgjsSql;
await storm.setUp(sql);
await accounts.setUp(sql);

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));
const BARRIER = 7007; // the start barrier's pair-key space, the same in the fixture

describe('examples/refund-storm.ts', () => {
  it('in one process: the naive version pays $600, every pgcoord strategy $200', async () => {
    for (const [name, refund] of Object.entries(storm.strategies)) {
      const { approved, refunds, cents } = await storm.storm(sql, refund);
      // naive: all three read before the first one (50 ms at the gateway) writes; 2 is already too many
      if (name === 'naive')
        expect({ name, over: approved >= 2, refunds, cents }).toEqual({ name, over: true, refunds: approved, cents: approved * 20_000 });
      else expect({ name, approved, refunds, cents }).toEqual({ name, approved: 1, refunds: 1, cents: 20_000 });
    }
  });

  it('three processes released together: the naive version over-refunds, each pgcoord strategy refunds once', async () => {
    const rounds: { round: number; strategy: string; orderId: number }[] = [];
    for (const [i, strategy] of Object.keys(storm.strategies).entries())
      rounds.push({ round: i + 1, strategy, orderId: await storm.openOrder(sql, 20_000) });
    // Every round's gate is held before the instances start; each instance waits on it for a
    // shared lock, and all three get it at the same moment when the gate is released.
    const gates = await Promise.all(rounds.map((r) => acquireSessionLock(db.sql, [BARRIER, r.round])));
    let failed: Error | undefined;
    const instances = storm.REQUESTERS.map((who) =>
      runTs<{ requester: string; results: { round: number; strategy: string; approved: boolean }[] }>(
        fixture('scenario-refund-instance.ts'),
        [who, JSON.stringify(rounds)],
        { env: { DATABASE_URL: db.url }, timeoutMs: 60_000 },
      ).catch((err: Error) => {
        failed = err;
        throw err;
      }),
    );
    for (const p of instances) p.catch(() => {}); // awaited below; handled if a round throws first
    try {
      for (const [i, { round }] of rounds.entries()) {
        // all three instances are waiting at this round's gate (so all are done with the last round)
        for (const end = Date.now() + 45_000; ; await sleep(20)) {
          if (failed) throw failed;
          if (Date.now() > end) throw new Error(`the instances did not all reach round ${round}`);
          const [w] = await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and not granted
            and classid = ${BARRIER} and objid = ${round} and objsubid = 2
            and database = (select oid from pg_database where datname = current_database())`;
          if (w?.n === 3) break;
        }
        await gates[i]?.release();
      }
    } finally {
      await Promise.all(gates.map((g) => g.release()));
    }
    const outs = await Promise.all(instances);
    for (const { round, strategy, orderId } of rounds) {
      const approved = outs.filter((o) => o.results.find((r) => r.round === round)?.approved).length;
      const paid = await storm.paidOut(sql, orderId);
      const [order] = await db.sql`select refunded_cents from storm_orders where id = ${orderId}`;
      if (strategy === 'naive') {
        // the race: at least two instances read "refundable: $200" and paid (all three, in practice)
        expect(approved).toBeGreaterThanOrEqual(2);
        expect(paid).toEqual({ refunds: approved, cents: approved * 20_000 });
      } else {
        expect({ strategy, approved, paid, refunded: order?.refunded_cents }).toEqual({
          strategy,
          approved: 1,
          paid: { refunds: 1, cents: 20_000 },
          refunded: 20_000,
        });
      }
      console.log(`refund storm, 3 processes, ${strategy}: ${approved} of 3 approved, $${paid.cents / 100} paid`);
    }
  });
});

// ------------------------------------------------------------------------------- account creation

const auth = new accounts.FakeAuthProvider();
const saas = new accounts.FakeSaasTool();
const POINTS = ['auth:call', 'auth', 'saas:call', 'saas', 'account'] as const;
type Point = (typeof POINTS)[number];

// Calls each service gets for one email over the crashed attempt and the retry: a crash inside a
// phase (its service answered, the phase did not commit) runs that phase again; after a commit, not.
const expectedCalls: Record<Point, { auth: number; find: number; create: number }> = {
  'auth:call': { auth: 2, find: 1, create: 1 },
  auth: { auth: 1, find: 1, create: 1 },
  'saas:call': { auth: 1, find: 2, create: 1 },
  saas: { auth: 1, find: 1, create: 1 },
  account: { auth: 1, find: 1, create: 1 },
};

/** One user in each system, the row naming both, the calls as expected; a repeat replays. */
async function expectOneAccount(point: Point, email: string, requestId: string, retried: accounts.Account): Promise<void> {
  const authUsers = [...auth.users.values()].filter((u) => u.email === email).map((u) => u.id);
  const saasUsers = saas.users.filter((u) => u.email === email).map((u) => u.id);
  const rows = await db.sql`select id, auth_user_id, saas_user_id from accounts where email = ${email}`;
  const calls = (list: string[], what: string) => list.filter((c) => c === `${what} ${email}`).length;
  expect({ point, authUsers, saasUsers, rows: [...rows] }).toEqual({
    point,
    authUsers: [retried.authUserId],
    saasUsers: [retried.saasUserId],
    rows: [{ id: retried.accountId, auth_user_id: retried.authUserId, saas_user_id: retried.saasUserId }],
  });
  expect({
    point,
    auth: calls(auth.calls, 'createUser'),
    find: calls(saas.calls, 'findUserByEmail'),
    create: calls(saas.calls, 'createUser'),
  }).toEqual({ point, ...expectedCalls[point] });
  const before = auth.calls.length + saas.calls.length;
  expect(await accounts.createAccount(sql, { auth, saas }, { email, requestId })).toEqual({ value: retried, replayed: true });
  expect(auth.calls.length + saas.calls.length).toBe(before); // the replay called nobody
}

describe('examples/account-creation.ts', () => {
  it('the fakes: the SaaS tool has no idempotency (two creates, two users); the auth provider has', async () => {
    const a = new accounts.FakeSaasTool();
    await a.createUser('x@example.com');
    await a.createUser('x@example.com');
    expect(a.users).toHaveLength(2);
    const b = new accounts.FakeAuthProvider();
    const k = { idempotencyKey: 'k' };
    expect(await b.createUser('x@example.com', k)).toEqual(await b.createUser('x@example.com', k));
    expect(b.users.size).toBe(1);
  });

  for (const point of POINTS) {
    it(`a crash (throw) ${point.endsWith(':call') ? `inside the ${point.slice(0, -5)} phase, after the service answered` : `after the ${point} phase committed`}: the retry leaves one account`, async () => {
      const email = `throw-${point}@example.com`;
      const requestId = randomUUID();
      const crash = () => {
        throw new Error(`crash at ${point}`);
      };
      // the services as the crashed attempt sees them: the call goes through, then the crash
      const crashing: accounts.Systems = {
        auth: {
          createUser: async (e, o) => {
            const user = await auth.createUser(e, o);
            return point === 'auth:call' ? crash() : user;
          },
        },
        saas: {
          findUserByEmail: (e) => saas.findUserByEmail(e),
          createUser: async (e) => {
            const user = await saas.createUser(e);
            return point === 'saas:call' ? crash() : user;
          },
        },
      };
      await expect(
        accounts.createAccount(sql, crashing, { email, requestId }, { afterPhase: (p) => (p === point ? crash() : undefined) }),
      ).rejects.toThrow(`crash at ${point}`);
      const retried = await accounts.createAccount(sql, { auth, saas }, { email, requestId });
      expect(retried.replayed).toBe(false);
      await expectOneAccount(point, email, requestId, retried.value);
    });
  }

  it('a process SIGKILLed at each point: the retry waits out its lease and leaves one account', async () => {
    // the services live here, reached over HTTP by the process that dies
    const server: Server = createServer(async (req, res) => {
      let body = '';
      for await (const chunk of req) body += chunk;
      const url = new URL(req.url ?? '/', 'http://x');
      const input = body ? (JSON.parse(body) as { email: string; idempotencyKey: string }) : undefined;
      let out: unknown = {};
      if (req.method === 'POST' && url.pathname === '/auth/users' && input) out = await auth.createUser(input.email, input);
      else if (req.method === 'POST' && url.pathname === '/saas/users' && input) out = await saas.createUser(input.email);
      else if (url.pathname === '/saas/users') out = (await saas.findUserByEmail(url.searchParams.get('email') ?? '')) ?? {};
      res.setHeader('content-type', 'application/json').end(JSON.stringify(out));
    });
    server.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    try {
      const cases = POINTS.map((point) => ({ point, email: `kill-${point}@example.com`, requestId: randomUUID() }));
      await Promise.all(
        cases.map(({ point, email, requestId }) => {
          const child = spawn(process.execPath, ['--import', 'tsx', fixture('scenario-account-crash.ts'), point, email, requestId, url], {
            env: { ...process.env, DATABASE_URL: db.url },
            stdio: ['ignore', 'pipe', 'pipe'],
          });
          let err = '';
          child.stderr.on('data', (d) => (err += d));
          return new Promise<void>((resolve, reject) =>
            child.once('exit', (code, signal) =>
              signal === 'SIGKILL' ? resolve() : reject(new Error(`${point}: exited ${code} instead of dying: ${err}`)),
            ),
          );
        }),
      );
      // the killed attempts still hold their keys (leases of 1 s): each retry waits, then takes over
      const retried = await Promise.all(cases.map((c) => accounts.createAccount(sql, { auth, saas }, c)));
      for (const [i, { point, email, requestId }] of cases.entries()) {
        expect({ point, replayed: retried[i]?.replayed }).toEqual({ point, replayed: false });
        await expectOneAccount(point, email, requestId, retried[i]?.value as accounts.Account);
      }
    } finally {
      await new Promise((r) => server.close(r));
    }
  });

  it('the same signup twice at once: one runs, the other waits and replays its answer', async () => {
    const signup = { email: 'twice@example.com', requestId: randomUUID() };
    const [a, b] = await Promise.all([
      accounts.createAccount(sql, { auth, saas }, signup),
      accounts.createAccount(sql, { auth, saas }, signup),
    ]);
    expect([a?.replayed, b?.replayed].sort()).toEqual([false, true]);
    expect(a?.value).toEqual(b?.value);
    expect(saas.users.filter((u) => u.email === signup.email)).toHaveLength(1);
  });
});
