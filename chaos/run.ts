// `npm run chaos`: the refund workload through every pgcoord strategy on every runner, in several
// worker processes (./worker.ts) for a bounded time, under faults (./faults.ts): backends
// terminated, connections cut and stalled through a proxy (test/fixtures/cut-proxy.ts), workers
// paused past the lock and lease timeouts and killed, and one immediate restart of PostgreSQL.
// Every attempt is in a history file; the checker (./check.ts) judges it against the database.
//   tsx chaos/run.ts [--seconds 60] [--processes 4] [--lanes 6] [--seed N] [--url postgres://...] [--json]
// Without --url it starts a PostgreSQL of its own (src/testing/embedded.ts), which it may restart;
// with --url the restart is skipped, and the run's tables live in a schema of their own, dropped
// at the end. Exit 0: no anomaly; 1: anomalies (listed); 2: the run itself failed.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { rng } from '../bench/workload.js';
import { type EmbeddedServer, startEmbeddedPostgres } from '../src/testing/embedded.js';
import { type CutProxy, startCutProxy } from '../test/fixtures/cut-proxy.js';
import { type Anomaly, check, formatTable, type OrderRow, type RefundRow } from './check.js';
import { injectFaults } from './faults.js';
import { readHistory } from './history.js';
import type { WorkerConfig } from './worker.js';
import { createTables, RUNNERS, STRATEGIES } from './workload.js';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '60' },
    processes: { type: 'string', default: '4' },
    lanes: { type: 'string', default: '6' },
    seed: { type: 'string' },
    url: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
});
const SECONDS = Number(args.seconds);
const PROCESSES = Number(args.processes);
const LANES = Number(args.lanes);
const SEED = args.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(args.seed);
for (const [name, v] of [
  ['--seconds', SECONDS],
  ['--processes', PROCESSES],
  ['--lanes', LANES],
  ['--seed', SEED],
] as const)
  if (!Number.isSafeInteger(v) || v < (name === '--seed' ? 0 : 1)) {
    process.stderr.write(`chaos: ${name} must be a positive integer\n`);
    process.exit(2);
  }

const LOCK_TIMEOUT_MS = 2000;
const LEASE_TTL_MS = 1500;
/** A pause lasts 1 to 1.5 times this: longer than the lock timeout and the lease's term. */
const PAUSE_MS = 3000;
const STUCK_MS = 20_000;
const WINDOW_MS = 3000;
const HOT = 2;
const ORDERS = (Math.ceil((SECONDS * 1000) / WINDOW_MS) + 20) * HOT;

const root = fileURLToPath(new URL('..', import.meta.url));
const say = (line: string) => process.stderr.write(`chaos: ${line}\n`);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const began = Date.now();
const random = rng(SEED);

interface Slot {
  id: number;
  gen: number;
  child: ChildProcess;
  ready: boolean;
  exited: boolean;
  /** Killed or stopped by the run: its exit code says nothing. */
  ours: boolean;
  stderr: string;
  exit: Promise<void>;
}
const slots: Slot[] = [];
const everyChild = new Set<ChildProcess>();
const killAll = () => {
  for (const child of everyChild) {
    child.kill('SIGCONT');
    child.kill('SIGKILL');
  }
};
const deaths: Anomaly[] = [];

let server: EmbeddedServer | undefined;
let admin: pg.Pool | undefined;
let proxy: CutProxy | undefined;
const historyDir = mkdtempSync(join(tmpdir(), 'pgcoord-chaos-'));
const schema = args.url ? `chaos_${randomBytes(4).toString('hex')}` : 'chaos';
const scope = `chaos:${randomBytes(6).toString('hex')}`;

/** Leave nothing behind: workers, proxy, the run's rows in a caller's database, the server, the history. Once. */
let cleaning: Promise<void> | undefined;
const cleanUp = () =>
  (cleaning ??= (async () => {
    killAll();
    await Promise.all(slots.map((s) => s.exit));
    await proxy?.close().catch(() => {});
    if (admin && args.url) {
      await admin.query(`drop schema if exists ${schema} cascade`).catch(() => {});
      await admin.query('delete from pgcoord.idempotency_keys where scope = $1', [scope]).catch(() => {});
      await admin.query('delete from pgcoord.leases where name like $1', [`chaos:${schema}:%`]).catch(() => {});
    }
    await admin?.end().catch(() => {});
    await server?.stop().catch(() => {});
    rmSync(historyDir, { recursive: true, force: true });
  })());
// A sudden end (an error writing to a closed pipe): at least the processes and the folder go.
process.once('exit', () => {
  killAll();
  rmSync(historyDir, { recursive: true, force: true });
});
// Ctrl-C, SIGTERM: the same clean-up as a normal end (the embedded server's own handler stops it first).
for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.on(signal, () => {
    say(`${signal}: stopping`);
    void Promise.race([cleanUp(), sleep(10_000)]).then(() => process.exit(130));
  });

function spawnWorker(id: number, gen: number, url: string): Slot {
  const config: WorkerConfig = {
    id,
    gen,
    url,
    schema,
    scope,
    seed: (SEED + id * 7919 + gen * 104_729) >>> 0,
    lanes: LANES,
    runners: [...RUNNERS],
    epoch: began,
    windowMs: WINDOW_MS,
    orders: ORDERS,
    hot: HOT,
    history: join(historyDir, `w${id}.${gen}.jsonl`),
    lockTimeoutMs: LOCK_TIMEOUT_MS,
    leaseTtlMs: LEASE_TTL_MS,
    stuckMs: STUCK_MS,
  };
  const child = spawn(process.execPath, ['--import', 'tsx', join(root, 'chaos/worker.ts'), JSON.stringify(config)], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  everyChild.add(child);
  const slot: Slot = { id, gen, child, ready: false, exited: false, ours: false, stderr: '', exit: Promise.resolve() };
  child.stdout!.on('data', (d: Buffer) => {
    if (d.toString().includes('"ready":true')) slot.ready = true;
  });
  child.stderr!.on('data', (d: Buffer) => {
    slot.stderr = (slot.stderr + d.toString()).slice(-4000);
  });
  slot.exit = new Promise((resolve) =>
    child.once('exit', (code, signal) => {
      everyChild.delete(child);
      slot.exited = true;
      if (!slot.ours && code !== 0)
        deaths.push({
          kind: 'worker died',
          detail: `worker ${id}.${gen} (pid ${child.pid}) exited ${code ?? signal}: ${slot.stderr.trim().slice(-1500)}`,
        });
      resolve();
    }),
  );
  slots.push(slot);
  return slot;
}

let exitCode = 2;
try {
  say(`seed ${SEED}; ${SECONDS} s, ${PROCESSES} processes × ${LANES} lanes, ${STRATEGIES.length} strategies × ${RUNNERS.length} runners`);
  if (args.url) say('--url given: the PostgreSQL restart is skipped (only a server the run started itself is restarted)');
  else {
    server = await startEmbeddedPostgres({ settings: { max_connections: '400' } });
    say(`embedded PostgreSQL at ${server.url}`);
  }
  const url = args.url ?? server!.url;
  admin = new pg.Pool({ connectionString: url, max: 3, application_name: 'chaos-run' });
  admin.on('error', () => {}); // the restart and terminations meet idle clients
  await createTables(admin, schema);
  const ids: number[] = [];
  const totals: number[] = [];
  for (let s = 0; s < STRATEGIES.length; s++)
    for (let k = 0; k < ORDERS; k++) {
      ids.push(s * ORDERS + k + 1);
      totals.push(400 + Math.floor(random() * 1600));
    }
  await admin.query(`insert into ${schema}.orders (id, total) select * from unnest($1::int[], $2::int[])`, [ids, totals]);
  proxy = await startCutProxy(url);
  const through = proxy.url(url);

  for (let id = 0; id < PROCESSES; id++) spawnWorker(id, 0, through);
  const readyBy = Date.now() + 90_000;
  while (!slots.every((s) => s.ready)) {
    const dead = slots.find((s) => s.exited);
    if (dead) throw new Error(`worker ${dead.id} exited before it was ready: ${dead.stderr}`);
    if (Date.now() > readyBy) throw new Error('the workers were not ready within 90 s');
    await sleep(100);
  }
  say(`workers ready after ${Date.now() - began} ms; faults for ${SECONDS} s`);

  const current = () => slots.filter((s) => !s.exited && !s.ours);
  const faults = await injectFaults({
    seconds: SECONDS,
    random,
    proxy,
    admin,
    pauseMs: PAUSE_MS,
    log: say,
    ...(server ? { restart: () => server!.restart('immediate') } : {}),
    workers: {
      live: () =>
        current()
          .filter((s) => s.ready)
          .map((s) => ({ pid: s.child.pid!, app: `chaos-w${s.id}` })),
      async killAndRespawn(pid) {
        const slot = current().find((s) => s.child.pid === pid);
        if (!slot) return;
        slot.ours = true;
        slot.child.kill('SIGKILL');
        await slot.exit;
        spawnWorker(slot.id, slot.gen + 1, through);
      },
    },
  });
  say(`faults: ${JSON.stringify(faults)}`);

  // Stop: every worker finishes the requests in flight and exits; SIGKILL after the stuck bound.
  const stopping = current();
  for (const s of stopping) {
    s.ours = true;
    s.child.kill('SIGCONT');
    s.child.kill('SIGTERM');
  }
  await Promise.race([Promise.all(stopping.map((s) => s.exit)), sleep(STUCK_MS + 15_000)]);
  for (const s of stopping.filter((w) => !w.exited)) {
    deaths.push({ kind: 'worker hung', detail: `worker ${s.id}.${s.gen} did not stop within ${STUCK_MS + 15_000} ms of SIGTERM` });
    s.child.kill('SIGKILL');
    await s.exit;
  }
  await proxy.close();
  // A COMMIT sent just before its connection was cut may still be finishing on the server.
  for (let i = 0; i < 100; i++) {
    const { rows } = await admin.query<{ n: number }>(
      "select count(*)::int as n from pg_stat_activity where application_name like 'chaos-w%'",
    );
    if (rows[0]!.n === 0) break;
    await sleep(100);
  }

  const refunds = (await admin.query<RefundRow>(`select request_id, order_id, amount, strategy from ${schema}.refunds`)).rows;
  const orders = (await admin.query<OrderRow>(`select id, total, refunded from ${schema}.orders`)).rows;
  const result = check(readHistory(historyDir), refunds, orders);
  const anomalies = [...deaths, ...result.anomalies];
  const durationMs = Date.now() - began;
  const table = formatTable(
    result.cells,
    STRATEGIES.map((s) => s.name),
    RUNNERS,
  );
  process.stdout.write(`\n${table}\n\n`);
  process.stdout.write(
    `seed ${SEED}; ${result.requests} requests, ${result.attempts} attempts, ${result.refundRows} refund rows; ${slots.length} worker processes (${PROCESSES} at a time); ${Math.round(durationMs / 1000)} s\n`,
  );
  process.stdout.write(
    `faults: ${Object.entries(faults)
      .map(([k, v]) => `${k} ${v}`)
      .join(', ')}${server ? '' : ' (no restart: --url)'}\n`,
  );
  if (anomalies.length === 0) process.stdout.write('anomalies: none\n');
  else {
    process.stdout.write(`anomalies: ${anomalies.length}\n`);
    for (const a of anomalies.slice(0, 50)) process.stdout.write(`  ${a.kind}${a.cell ? ` [${a.cell}]` : ''}: ${a.detail}\n`);
  }
  if (args.json)
    process.stdout.write(
      `${JSON.stringify({
        seed: SEED,
        seconds: SECONDS,
        processes: PROCESSES,
        durationMs,
        requests: result.requests,
        attempts: result.attempts,
        refundRows: result.refundRows,
        workerProcesses: slots.length,
        faults,
        anomalies: anomalies.length,
        anomalyList: anomalies.slice(0, 50),
        cells: result.cells,
      })}\n`,
    );
  exitCode = anomalies.length === 0 ? 0 : 1;
} catch (err) {
  say(`the run failed: ${(err as Error).stack ?? err}`);
  exitCode = 2;
} finally {
  await cleanUp();
}
process.exit(exitCode);
