// `npm run bench`: the refund storm, every strategy side by side, in one process and one run.
//
//   server (DATABASE_URL or embedded) → a database of its own → for each contention level, each
//   strategy on fresh tables → pgbench scripts → the fault scenario → the lease micro-benchmark →
//   terminal table, JSON, HTML.
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import cliProgress from 'cli-progress';
import { Redis } from 'ioredis';
import postgres from 'postgres';
import { migrate } from '../src/idempotency/index.js';
import { migrateLeases } from '../src/lease/migrate.js';
import { createTestDatabase, startTestServer } from '../src/testing/index.js';
import { type BenchOptions, parseOptions, USAGE } from './args.js';
import { drive, openPool } from './driver.js';
import { type FaultResult, faultScenario } from './fault.js';
import { LEASE_CHILD, type LeaseBench, leaseBench, leaseChild } from './lease.js';
import { environment } from './machine.js';
import { interleaved, NOISE_CONTROL, OVERHEAD_PAIRS, type Overhead, VERSUS_PAIRS } from './overhead.js';
import { findPgbench, pgbenchScripts, runPgbench } from './pgbench.js';
import { OVERHEAD_TARGET, ratios } from './ratios.js';
import { htmlReport } from './report-html.js';
import { terminalReport } from './report-terminal.js';
import type { StrategyResult } from './result.js';
import { type Strategy, strategies } from './strategies/index.js';
import { createSchema, makeWorkload, resetTables, type Scenario } from './workload.js';

// `npm run bench` runs this file compiled into bench/.build/ (see package.json): the library and the
// hand-written strategies are then measured as an application runs them, compiled, and not through
// tsx, whose keep-names rewrite adds a defineProperty call per named closure created (pgcoord's
// closures, not the twins' inline callbacks). Run directly with tsx, this file lives in bench/.
const here = dirname(fileURLToPath(import.meta.url)).replace(/[\\/]\.build$/, '');

/** Connect to Redis, or explain why not. */
async function connectRedis(): Promise<{ redis?: Redis; note?: string; version?: string }> {
  const url = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
  const redis = new Redis(url, { lazyConnect: true, connectTimeout: 1000, maxRetriesPerRequest: 1, retryStrategy: () => null });
  redis.on('error', () => {});
  try {
    await redis.connect();
    await redis.ping();
    const info = await redis.info('server');
    return { redis, version: /redis_version:(\S+)/.exec(info)?.[1] };
  } catch (err) {
    redis.disconnect();
    return { note: `Redis lock skipped: Redis at ${url} did not answer (${(err as Error).message})` };
  }
}

/** The scenario of one contention level, from the command line's knobs. */
const scenarioOf = (opts: BenchOptions, orders: number, requests: number): Scenario => ({
  orders,
  requests,
  clients: opts.clients,
  gatewayMs: opts.gatewayMs,
  duplicates: opts.duplicates,
  maxSeconds: opts.seconds,
  seed: opts.seed,
});

const wanted = (opts: BenchOptions, id: string) => opts.only.length === 0 || opts.only.some((o) => id.includes(o));

/** Run the whole benchmark; returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  let opts: BenchOptions;
  try {
    opts = parseOptions(argv);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const notes: string[] = [];
  const started = Date.now();
  const server = await startTestServer();
  const database = await createTestDatabase(server.url, 'pgcoord_bench');
  const admin = postgres(database.url, { max: 1, onnotice: () => {} });
  const { redis, note: redisNote, version: redisVersion } = opts.redis ? await connectRedis() : { note: 'Redis lock skipped (--no-redis)' };
  if (redisNote) notes.push(redisNote);
  const pgbench = opts.pgbench ? findPgbench() : undefined;
  if (!opts.pgbench) notes.push(opts.quick ? 'pgbench skipped in --quick (add --pgbench to run it)' : 'pgbench skipped (--no-pgbench)');
  else if (!pgbench) notes.push('pgbench skipped: no pgbench on this machine (set PGBENCH to its path)');
  try {
    await createSchema(admin);
    await migrate(admin); // pgcoord's idempotency table
    if (opts.fault || opts.lease) await migrateLeases(admin); // pgcoord's lease table
    const env = await environment(admin, server.source);
    if (redisVersion) env.redis = redisVersion;
    if (pgbench) env.pgbench = pgbench.version;
    const chosen = strategies.filter((s) => wanted(opts, s.id) && (!s.needsRedis || redis));
    const scripts = pgbench ? pgbenchScripts.filter((s) => wanted(opts, s.id)) : [];
    const versus = new Set(VERSUS_PAIRS.map(([a, b]) => `${a} ${b}`));
    const pairs = opts.overheadPairs
      ? [...OVERHEAD_PAIRS, ...VERSUS_PAIRS, [NOISE_CONTROL, NOISE_CONTROL] as const]
          .map(([a, b]) => [chosen.find((s) => s.id === a), chosen.find((s) => s.id === b)] as const)
          .filter((p): p is readonly [Strategy, Strategy] => p[0] !== undefined && p[1] !== undefined)
      : [];
    const total = opts.orders.length * (chosen.length + scripts.length) + pairs.length + (opts.fault ? 1 : 0) + (opts.lease ? 1 : 0);
    const bar = new cliProgress.SingleBar(
      { stream: process.stderr, format: ' {bar} {value}/{total} | {eta_formatted} left | {task}', hideCursor: true, clearOnComplete: true },
      cliProgress.Presets.shades_classic,
    );
    bar.start(total, 0, { task: 'starting' });
    const results: StrategyResult[] = [];
    for (const orders of opts.orders) {
      const work = makeWorkload(scenarioOf(opts, orders, opts.requests));
      await resetTables(admin, work.totals, true);
      const pool = await openPool(database.url, opts.clients);
      try {
        for (const s of chosen) {
          bar.update({ task: `${orders} orders: ${s.label}` });
          results.push(await drive(s, work, { pool, redis, maxAttempts: opts.maxAttempts }));
          bar.increment();
        }
      } finally {
        await pool.sql.end({ timeout: 1 });
      }
      for (const script of scripts) {
        bar.update({ task: `${orders} orders: ${script.label}` });
        const r = await runPgbench(pgbench!.path, script, work, database.url, admin, env.machine.cores);
        if (r.note) notes.push(`${r.label} at ${orders} orders: ${r.note}`);
        results.push(r);
        bar.increment();
      }
    }
    // pgcoord's overhead: interleaved pairs at the most spread level, where client CPU shows most
    const overheads: Overhead[] = [];
    if (pairs.length) {
      const orders = Math.max(...opts.orders);
      const work = makeWorkload(scenarioOf(opts, orders, Math.max(opts.requests, opts.overheadRequests)));
      await resetTables(admin, work.totals, true);
      const pool = await openPool(database.url, opts.clients);
      try {
        for (const [p, t] of pairs) {
          bar.update({ task: `overhead: ${p.label} vs ${t.label}` });
          const o = await interleaved(p, t, work, {
            pool,
            redis,
            maxAttempts: opts.maxAttempts,
            pairs: opts.overheadPairs,
            requests: opts.overheadRequests,
          });
          overheads.push(versus.has(`${p.id} ${t.id}`) ? { ...o, versus: true } : o);
          bar.increment();
        }
      } finally {
        await pool.sql.end({ timeout: 1 });
      }
      const control = overheads.find((o) => o.control);
      if (control && Math.abs(control.median - 1) > 1 - OVERHEAD_TARGET)
        notes.push(
          `noise control: ${control.twin} came out ${control.median.toFixed(2)}× against itself, so the overhead ratios in this run are only good to about ±${Math.round(Math.abs(control.median - 1) * 100)} %`,
        );
    }
    let fault: FaultResult | undefined;
    if (opts.fault) {
      bar.update({ task: 'fault scenario' });
      const { countedSql } = await import('./db.js');
      const { sql } = countedSql(database.url, 4);
      try {
        fault = await faultScenario(sql, redis);
      } finally {
        await sql.end({ timeout: 1 });
      }
      if (fault.note) notes.push(fault.note);
      bar.increment();
    }
    let lease: LeaseBench | undefined;
    if (opts.lease) {
      lease = await leaseBench({
        url: database.url,
        admin,
        redis,
        clients: opts.clients,
        rounds: opts.quick ? 1 : 3,
        secondsPerRound: opts.quick ? 0.3 : 1.5,
        failoverTtlMs: opts.quick ? 1000 : 2000,
        resignSamples: opts.quick ? 2 : 5,
        expirySamples: opts.quick ? 1 : 3,
        onStep: (task) => bar.update({ task }),
      });
      notes.push(...lease.notes);
      bar.increment();
    }
    bar.stop();
    const rs = ratios(results, opts.orders, overheads);
    const seconds = (Date.now() - started) / 1000;
    notes.push(`run took ${seconds.toFixed(1)} s`);
    process.stdout.write(`${terminalReport(env, opts.orders, results, rs, fault, notes, overheads, lease)}\n`);
    const stamp = env.date.replace(/[:.]/g, '-');
    const jsonPath = resolve(opts.json ?? join(here, 'results', `bench-${stamp}.json`));
    const htmlPath = resolve(opts.html ?? `${jsonPath.replace(/\.json$/, '')}.html`);
    const { json: _j, html: _h, ...shownOptions } = opts;
    await mkdir(dirname(jsonPath), { recursive: true });
    await mkdir(dirname(htmlPath), { recursive: true });
    await writeFile(
      jsonPath,
      JSON.stringify({ environment: env, options: shownOptions, seconds, results, overheads, ratios: rs, fault, lease, notes }, null, 2),
    );
    await writeFile(htmlPath, htmlReport(env, opts.orders, results, rs, fault, notes, shownOptions, lease));
    process.stdout.write(`\nJSON: ${jsonPath}\nHTML: ${htmlPath}\n`);
    return 0;
  } finally {
    redis?.disconnect();
    await admin.end({ timeout: 1 });
    await database.drop().catch(() => {});
    await server.stop();
  }
}

// `LEASE_CHILD` as the first argument: this process is the leader the lease benchmark kills (lease.ts)
const argv = process.argv.slice(2);
(argv[0] === LEASE_CHILD ? leaseChild(argv[1] ?? '{}') : main(argv)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = 1;
  },
);
