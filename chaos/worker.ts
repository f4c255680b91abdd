// One worker process of `npm run chaos`: lanes of refund requests through every strategy on every
// runner, all connections through the run's cut proxy, each attempt recorded in this process's
// history file (./history.ts) before and after. The run's orchestrator (./run.ts) injects the
// faults from outside; this process only reports. SIGTERM: finish the requests in flight, close
// the pools, exit 0.
//   node --import tsx chaos/worker.ts '<WorkerConfig as JSON>'
// Prints {"ready":true} once its pools answer.

import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { drizzle as drizzlePgjs } from 'drizzle-orm/postgres-js';
import pg from 'pg';
import { rng } from '../bench/workload.js';
import postgres from '../test/pgjs.js';
import { q } from '../test/query.js';
import { type EndLine, HistoryFile } from './history.js';
import { type Call, MAX_AMOUNT, type RunnerName, STRATEGIES, type Strategy } from './workload.js';

/** What the orchestrator tells a worker. */
export interface WorkerConfig {
  /** The worker's slot (a respawned worker keeps its slot and gets the next `gen`). */
  id: number;
  gen: number;
  /** The database through the cut proxy. */
  url: string;
  schema: string;
  scope: string;
  seed: number;
  lanes: number;
  runners: RunnerName[];
  /** The clock the hot orders move on (epoch ms), the same for every worker. */
  epoch: number;
  windowMs: number;
  /** Orders per strategy, and how many of them are hot at a time. */
  orders: number;
  hot: number;
  history: string;
  lockTimeoutMs: number;
  leaseTtlMs: number;
  /** An attempt pending this long is recorded as STUCK (a hang) and abandoned. */
  stuckMs: number;
}

const config = JSON.parse(process.argv[2] ?? '') as WorkerConfig;
const random = rng(config.seed);
const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const appName = `chaos-w${config.id}`;

// One pool per runner, each of its own (drizzle's postgres-js driver rewrites its client's parsers).
const closers: (() => Promise<unknown>)[] = [];
function makeRunner(name: RunnerName): object {
  if (name === 'postgres.js' || name === 'drizzle-pgjs') {
    const sql = postgres(config.url, { max: 4, onnotice: () => {}, connect_timeout: 5, connection: { application_name: appName } });
    closers.push(() => sql.end({ timeout: 1 }));
    return name === 'postgres.js' ? sql : drizzlePgjs(sql);
  }
  const pool = new pg.Pool({ connectionString: config.url, max: 4, connectionTimeoutMillis: 5000, application_name: appName });
  pool.on('error', () => {}); // an idle client's connection killed: the one listener an app must attach
  closers.push(() => pool.end());
  return name === 'pg' ? pool : drizzlePg(pool);
}
const runners = new Map(config.runners.map((name) => [name, makeRunner(name)] as const));

// Ready once every pool answers (a respawned worker may start during the restart or a cut: it asks again).
for (const runner of runners.values())
  for (let tries = 1; ; tries++) {
    try {
      await q(runner, 'select 1');
      break;
    } catch (err) {
      if (tries >= 100) throw err;
      await sleep(200);
    }
  }

const history = new HistoryFile(config.history);
let stopping = false;
process.on('SIGTERM', () => {
  stopping = true;
});

/** The error as the history records it: pgcoord's code, the caller's own read's loss, or untyped. */
function codeOf(err: unknown): { code: string; msg?: string } {
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'string' && (code.startsWith('PGCOORD_') || code === 'APP_READ_LOST' || code === 'STUCK')) return { code };
  const name = (err as Error)?.constructor?.name ?? typeof err;
  return { code: `UNTYPED:${name}:${code ?? ''}`, msg: String((err as Error)?.message ?? err).slice(0, 300) };
}

/** The strategy's call, given up as STUCK after `stuckMs` (its promise is left to settle or not). */
function bounded<T>(p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(Object.assign(new Error('pending too long'), { code: 'STUCK' })), config.stuckMs);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

let attempts = 0;
/** One attempt, recorded before it sends anything and when it settles; resolves with its end line. */
async function attempt(strategy: Strategy, runnerName: RunnerName, c: Call, att: number): Promise<EndLine> {
  history.write({
    k: 's',
    req: c.req,
    att,
    strategy: strategy.name,
    runner: runnerName,
    order: c.order,
    amount: c.amount,
    pid: process.pid,
  });
  attempts++;
  const t0 = performance.now();
  let end: EndLine;
  try {
    const a = await bounded(strategy.refund(c));
    end = { k: 'e', req: c.req, att, out: a.applied ? 'applied' : 'refused', ms: 0 };
    if (a.replayed) end.rep = true;
  } catch (err) {
    end = { k: 'e', req: c.req, att, out: 'error', ms: 0, ...codeOf(err) };
  }
  end.ms = Math.round(performance.now() - t0);
  history.write(end);
  return end;
}

// Errors after which a client with an idempotency key sends the same request again.
const RESEND = new Set(['PGCOORD_COMMIT_UNKNOWN', 'PGCOORD_CONNECTION_LOST', 'PGCOORD_IDEMPOTENCY_IN_FLIGHT', 'STUCK']);

let n = 0;
async function lane(): Promise<void> {
  while (!stopping) {
    const s = Math.floor(random() * STRATEGIES.length);
    const strategy = STRATEGIES[s]!;
    const runnerName = pick(config.runners);
    const hotBase = Math.floor((Date.now() - config.epoch) / config.windowMs) * config.hot;
    const k = (hotBase + Math.floor(random() * config.hot)) % config.orders;
    const c: Call = {
      runner: runners.get(runnerName)!,
      schema: config.schema,
      scope: config.scope,
      req: `w${config.id}.${config.gen}-${++n}`,
      strategyName: strategy.name,
      order: s * config.orders + k + 1,
      amount: 1 + Math.floor(random() * MAX_AMOUNT),
      lockTimeoutMs: config.lockTimeoutMs,
      leaseTtlMs: config.leaseTtlMs,
    };
    if (!strategy.keyed) {
      const end = await attempt(strategy, runnerName, c, 1);
      if (end.out === 'error') await sleep(20);
      continue;
    }
    // With a key, the same request is sent again on purpose: now and then a duplicate delivery at
    // the same time as the first, now and then once more after an answer, and always after an
    // error that leaves the outcome open (up to four attempts), as a client that retries would.
    let att = 0;
    const first = [attempt(strategy, runnerName, c, ++att)];
    if (random() < 0.2) first.push(attempt(strategy, runnerName, c, ++att));
    let ends = await Promise.all(first);
    let again = random() < 0.25;
    while (att < 4 && (again || ends.some((e) => e.out === 'error' && RESEND.has(e.code ?? '')))) {
      again = false;
      await sleep(50 + random() * 150);
      ends = [await attempt(strategy, runnerName, c, ++att)];
    }
  }
}

process.stdout.write(`${JSON.stringify({ ready: true, pid: process.pid })}\n`);
await Promise.all(Array.from({ length: config.lanes }, lane));
await Promise.race([Promise.all(closers.map((close) => close().catch(() => {}))), sleep(3000)]);
history.close();
process.stdout.write(`${JSON.stringify({ done: true, attempts })}\n`);
process.exit(0); // an abandoned (STUCK) call must not keep the process alive
