// The C-client reference: the same SQL as pgbench scripts, run by the machine's pgbench as a child
// process against the same server and database, on the same fresh table state.
//
// pgbench cannot run client logic inside a pipeline (\gset is refused in pipeline mode), so every
// script checks the total in the UPDATE's WHERE clause (the guarded write) instead of in the
// client; the statements and round trips are the same as the postgres.js versions. The simulated
// gateway is `\sleep`, placed where the postgres.js strategies call the gateway.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type postgres from 'postgres';
import { type StrategyResult, verdictOf } from './result.js';
import { histogram, latency } from './stats.js';
import type { Family } from './strategies/types.js';
import { audit, resetTables, type Workload } from './workload.js';

/** One pgbench script. */
export interface PgbenchScript {
  id: string;
  family: Family;
  pipelined: boolean;
  label: string;
  /** Round trips per transaction (per attempt), counted from the script. */
  roundTrips: number;
  /** Retry serialization failures (`--max-tries`). */
  retries?: boolean;
  /** The script, with `\sleep` for the gateway when `gatewayUs` > 0. */
  text(gatewayUs: number): string;
}

const HEAD = '\\set id random(1, :orders)\n\\set amount random(1, 100)\n';
const GUARDED =
  'with u as (update orders set refunded = refunded + :amount where id = :id and refunded + :amount <= total returning id) ' +
  "insert into refunds (request_id, order_id, amount) select 'pgbench', id, :amount from u;\n";
const sleep = (us: number) => (us > 0 ? `\\sleep ${us} us\n` : '');

function locked(lock: string, select: string, pipelined: boolean, us: number): string {
  if (!pipelined) return `${HEAD}begin;\n${lock}${select}${sleep(us)}${GUARDED}commit;\n`;
  return `${HEAD}\\startpipeline\nbegin;\n${lock}${select}\\endpipeline\n${sleep(us)}\\startpipeline\n${GUARDED}commit;\n\\endpipeline\n`;
}

/** The scripts, in table order. */
export const pgbenchScripts: readonly PgbenchScript[] = [
  {
    id: 'pgbench/guarded',
    family: 'guarded',
    pipelined: false,
    label: 'pgbench guarded UPDATE',
    roundTrips: 1,
    text: (us) => `${HEAD}${GUARDED}${sleep(us)}`,
  },
  {
    id: 'pgbench/for-update',
    family: 'for-update',
    pipelined: false,
    label: 'pgbench FOR UPDATE',
    roundTrips: 4,
    text: (us) => locked('', 'select total, refunded from orders where id = :id for update;\n', false, us),
  },
  {
    id: 'pgbench/for-update-pipelined',
    family: 'for-update',
    pipelined: true,
    label: 'pgbench FOR UPDATE, pipelined',
    roundTrips: 2,
    text: (us) => locked('', 'select total, refunded from orders where id = :id for update;\n', true, us),
  },
  {
    id: 'pgbench/advisory',
    family: 'advisory',
    pipelined: false,
    label: 'pgbench advisory',
    roundTrips: 5,
    text: (us) => locked('select pg_advisory_xact_lock(:id);\n', 'select total, refunded from orders where id = :id;\n', false, us),
  },
  {
    id: 'pgbench/advisory-pipelined',
    family: 'advisory',
    pipelined: true,
    label: 'pgbench advisory, pipelined',
    roundTrips: 2,
    text: (us) => locked('select pg_advisory_xact_lock(:id);\n', 'select total, refunded from orders where id = :id;\n', true, us),
  },
  {
    id: 'pgbench/serializable',
    family: 'serializable',
    pipelined: false,
    label: 'pgbench SERIALIZABLE --max-tries',
    roundTrips: 4,
    retries: true,
    // the gateway is paid after COMMIT, as in the postgres.js versions
    text: (us) =>
      `${HEAD}begin isolation level serializable;\nselect total, refunded from orders where id = :id;\n${GUARDED}commit;\n${sleep(us)}`,
  },
];

/** The pgbench binary and its version, or undefined when it is not on the machine. */
export function findPgbench(): { path: string; version: string } | undefined {
  for (const path of [process.env.PGBENCH, 'pgbench', '/usr/bin/pgbench', '/usr/lib/postgresql/15/bin/pgbench'].filter(
    Boolean,
  ) as string[]) {
    const r = spawnSync(path, ['--version'], { encoding: 'utf8' });
    if (r.status === 0) return { path, version: r.stdout.trim() };
  }
  return undefined;
}

function run(cmd: string, args: string[], timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGTERM'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const num = (text: string, re: RegExp) => Number(re.exec(text)?.[1] ?? Number.NaN);

/**
 * Run one script over the workload's scenario: fresh tables with the same totals, the same
 * number of clients, `ceil(requests / clients)` transactions each, `-M prepared`, 2 threads.
 * Latencies come from pgbench's per-transaction log.
 */
export async function runPgbench(
  bin: string,
  script: PgbenchScript,
  work: Workload,
  url: string,
  admin: postgres.Sql,
  threads: number,
): Promise<StrategyResult> {
  const { scenario } = work;
  const dir = await mkdtemp(join(tmpdir(), 'pgcoord-pgbench-'));
  try {
    const file = join(dir, 'script.sql');
    await writeFile(file, script.text(Math.round(scenario.gatewayMs * 1000)));
    await resetTables(admin, work.totals);
    const perClient = Math.max(1, Math.ceil(work.requests.length / scenario.clients));
    const args = [
      '-n',
      '-M',
      'prepared',
      '-f',
      file,
      '-c',
      String(scenario.clients),
      '-j',
      String(Math.min(threads, scenario.clients)),
      '-t',
      String(perClient),
      '-D',
      `orders=${scenario.orders}`,
      '-l',
      `--log-prefix=${join(dir, 'log')}`,
      ...(script.retries ? ['--max-tries=100'] : []),
      url,
    ];
    const out = await run(bin, args, (scenario.maxSeconds * 4 + 30) * 1000);
    const text = `${out.stdout}\n${out.stderr}`;
    const processed = num(text, /actually processed: (\d+)/);
    const tps = num(text, /tps = ([\d.]+) \(without initial connection time\)/);
    const failed = num(text, /number of failed transactions: (\d+)/) || 0;
    const retries = num(text, /total number of retries: (\d+)/) || 0;
    const h = histogram();
    for (const name of (await readdir(dir)).filter((n) => n.startsWith('log'))) {
      for (const line of (await readFile(join(dir, name), 'utf8')).split('\n')) {
        const us = Number(line.split(' ')[2]);
        if (Number.isFinite(us) && us > 0) h.recordValue(Math.round(us));
      }
    }
    const checked = await audit(admin, work.totals, undefined, new Set());
    const seconds = processed > 0 && tps > 0 ? processed / tps : 0;
    const ok = out.code === 0 && Number.isFinite(processed) && seconds > 0;
    return {
      id: script.id,
      family: script.family,
      impl: script.pipelined ? 'pgbench-pipelined' : 'pgbench',
      label: script.label,
      orders: scenario.orders,
      verdict: ok ? verdictOf(checked) : 'SKIPPED',
      ...(ok ? {} : { note: `pgbench failed (exit ${out.code}): ${text.trim().split('\n').slice(-3).join(' / ')}` }),
      expectCorrect: true,
      dedupes: false,
      completed: ok ? processed : 0,
      refunds: checked.refundRows,
      rejected: ok ? processed - checked.refundRows : 0,
      replays: 0,
      failed,
      seconds,
      refundsPerSec: seconds > 0 ? checked.refundRows / seconds : 0,
      latency: latency(h),
      attemptsPerSuccess: processed > 0 ? (processed + retries) / processed : 0,
      roundTripsPerRequest: processed > 0 ? (script.roundTrips * (processed + retries)) / processed : script.roundTrips,
      errors: failed ? { 'pgbench-failed': failed } : {},
      audit: checked,
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
