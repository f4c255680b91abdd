// `pgcoord locks` through the real CLI: a lock held by another connection, decoded to its string
// key and namespace, and a waiter blocked by it (pg_blocking_pids), as JSON and as a table.
import { type AddressInfo, createServer } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { listLocks } from '../src/cli/api.js';
import { hashKey } from '../src/index.js';
import { runCli } from './fixtures/cli-run.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(2);
const holderPool = db.newSql({ max: 1, connection: { application_name: 'holder-app' } });
const waiterPool = db.newSql({ max: 1, connection: { application_name: 'waiter-app' } });
const key = hashKey('order:42', 'refunds');

const holder = await holderPool.reserve();
const waiter = await waiterPool.reserve();
const [{ pid: holderPid }] = (await holder`select pg_backend_pid()::int as pid`) as unknown as [{ pid: number }];
const [{ pid: waiterPid }] = (await waiter`select pg_backend_pid()::int as pid`) as unknown as [{ pid: number }];
await holder`select pg_advisory_lock(${String(key)}::int8)`;
await holder`select pg_advisory_lock_shared(7::int4, 9::int4)`;
const waiting = waiter`select pg_advisory_lock(${String(key)}::int8)`.execute();
for (let i = 0; i < 100; i++) {
  const [row] = await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and not granted`;
  if (row?.n) break;
  await sleep(20);
}
afterAll(async () => {
  await holder`select pg_advisory_unlock_all()`;
  await waiting;
  await waiter`select pg_advisory_unlock_all()`;
  holder.release();
  waiter.release();
});

interface Lock {
  label: string;
  status: string;
  mode: string;
  pid: number;
  applicationName: string;
  blockedBy: number[];
  forMs: number;
  key: { space: string; id?: string; name?: string; namespace?: string };
}

describe('pgcoord locks', () => {
  it('--json: the holder with its decoded key, and the waiter it blocks', async () => {
    const r = await runCli(['locks', '--url', db.url, '--names', 'order:41', 'order:42', '--namespace', 'refunds', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const locks = JSON.parse(r.stdout) as Lock[];
    const held = locks.find((l) => l.status === 'held' && l.key.space === 'int8');
    const blocked = locks.find((l) => l.status === 'waiting');
    expect(held).toMatchObject({
      label: '"refunds":"order:42"',
      mode: 'exclusive',
      pid: holderPid,
      applicationName: 'holder-app',
      key: { space: 'int8', id: String(key), namespace: 'refunds', name: 'order:42' },
      blockedBy: [],
    });
    expect(held?.forMs).toBeGreaterThanOrEqual(0);
    expect(blocked).toMatchObject({ label: '"refunds":"order:42"', pid: waiterPid, applicationName: 'waiter-app', blockedBy: [holderPid] });
    expect(blocked?.forMs).toBeGreaterThanOrEqual(0);
    expect(locks.find((l) => l.key.space === 'pair')).toMatchObject({ label: '[7,9]', mode: 'shared', status: 'held', pid: holderPid });
  });

  it('a readable table; keys it cannot decode are shown raw', async () => {
    const r = await runCli(['locks'], { env: { DATABASE_URL: db.url } });
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^KEY\s+MODE\s+STATUS\s+PID\s+APPLICATION\s+FOR\s+BLOCKED BY\s+QUERY$/);
    const heldLine = lines.find((l) => l.startsWith(String(key)) && / held /.test(l));
    const waitLine = lines.find((l) => l.startsWith(String(key)) && / waiting /.test(l));
    expect(heldLine).toMatch(new RegExp(`exclusive\\s+held\\s+${holderPid}\\s+holder-app\\s+\\S+\\s+-`));
    expect(waitLine).toMatch(
      new RegExp(`exclusive\\s+waiting\\s+${waiterPid}\\s+waiter-app\\s+\\S+\\s+${holderPid}\\s+select pg_advisory_lock`),
    );
  });

  it('listLocks() from code decodes keys this process hashed', async () => {
    const locks = await listLocks(db.sql);
    expect(locks.filter((l) => l.label === '"refunds":"order:42"').map((l) => l.status)).toEqual(['held', 'waiting']);
  });

  it('a refused connection names the host, port and cause; connect_timeout in the URL is honoured (not a fixed 10 s)', async () => {
    const refused = await runCli(['locks', '--url', 'postgres://postgres@127.0.0.1:1/none']);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/could not get a database connection \(.*ECONNREFUSED 127\.0\.0\.1:1.*\)/);
    // a server that accepts and never answers: the URL's 1 s, not the default 10 s
    const silent = createServer(() => {}).listen(0, '127.0.0.1');
    await new Promise((r) => silent.once('listening', r));
    try {
      const port = (silent.address() as AddressInfo).port;
      const t0 = performance.now();
      const slow = await runCli(['locks', '--url', `postgres://postgres@127.0.0.1:${port}/none?connect_timeout=1`]);
      const took = performance.now() - t0;
      expect(slow.code).toBe(1);
      expect(slow.stderr).toMatch(/could not get a database connection/);
      expect(took).toBeLessThan(9_000); // tsx start-up included; the default would wait 10 s
    } finally {
      silent.close();
    }
  });
});
