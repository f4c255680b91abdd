// `npm run bench:queue`: pgcoord's keyed queue beside graphile-worker (a named queue per key) and
// pg-boss (a key_strict_fifo queue), in one run on the same PostgreSQL, each system on a database
// of its own (created here, dropped at the end), each with the same workers: `concurrency` (8)
// handlers in this one process. Adapters: bench/queue-systems.ts; the order checker:
// bench/queue-check.ts.
//
// For each number of keys (1, 100, 10 000) and each system (their order rotating per level):
//   1. backlog: jobs enqueued with no worker running, a layer at a time (every key's job 1, then
//      every key's job 2, …; a layer in transactions of up to 500, so a key's jobs are committed
//      in seq order), then the workers start; jobs/s from the first handler start to the last
//      finish. The handler does no work: it yields to the event loop once (setImmediate), so the
//      figures are the queues' own cost per job.
//   2. steady state, on the same (now idle) workers: `rate` jobs/s for `steadySeconds`, job i to
//      key i mod keys, a key's next enqueue sent once its previous one committed; the latency is
//      from the enqueue's send to the handler's start.
// Every start goes through the same OrderChecker (violations: two jobs of a key at once, or a
// key's jobs out of seq order). Then, for pgcoord alone, what NOTIFY costs an enqueue: 16 clients
// enqueueing to keys that have queued jobs (no NOTIFY), to new keys (new rows and a NOTIFY), and to
// new keys through the same statement with its pg_notify taken out, in alternating rounds.
//
// Run: `npm run bench:queue [-- --quick]` (DATABASE_URL, else an embedded PostgreSQL started for
// the run and stopped at the end). Speed figures are reported, never asserted.
import { writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import postgres from 'postgres';
import { enqueue } from '../src/queue/index.js';
import { enqueueStatement, QUEUE_CHANNEL } from '../src/queue/statements.js';
import { startEmbeddedPostgres } from '../src/testing/embedded.js';
import { createTestDatabase, type TestDatabase } from '../src/testing/index.js';
import { type BenchPayload, benchHandler, type CheckSummary, OrderChecker } from './queue-check.js';
import { openSystem, type PgcoordCounts, type QueueSystem, SYSTEMS, type SystemName } from './queue-systems.js';

/** The knobs of one run. */
export interface QueueBenchOptions {
  quick: boolean;
  keys: number[];
  systems: SystemName[];
  /** Concurrent handlers per system (one process). */
  concurrency: number;
  /** Backlog jobs per level (at least `minPerKey` per key, so more at 10 000 keys). */
  jobs: number;
  /** Backlog jobs at one key (all in one key's line: one commit after another for every system). */
  jobsOneKey: number;
  /** Jobs per key at least, in the backlog. */
  minPerKey: number;
  /** Steady-state enqueue rate, jobs/s, and how long. */
  rate: number;
  steadySeconds: number;
  /** Handler work in ms (0: one setImmediate). */
  workMs: number;
  /** A backlog not drained by then is reported as it stands. */
  backlogTimeoutMs: number;
  /** A steady state not drained this long after its last enqueue is reported as it stands. */
  steadyTimeoutMs: number;
  /** graphile-worker's pollInterval (undefined: its default, 2000 ms). */
  graphilePollMs?: number;
  /** NOTIFY measure: seconds per round (0 skips it), rounds, clients. */
  notifySeconds: number;
  notifyRounds: number;
  notifyClients: number;
  json?: string;
  help: boolean;
}

export const QUEUE_USAGE = `npm run bench:queue -- [options]

  --quick                 a shorter run: smaller backlogs (1 job per key at 10 000 keys), 2 s steady state
  --keys A,B,C            numbers of keys (default 1,100,10000)
  --systems a,b           of pgcoord,graphile-worker,pg-boss (default all)
  --concurrency N         handlers per system, in this one process (default 8)
  --jobs N                backlog jobs per level of more than one key (default 4000; --quick 1000),
                          at least --min-per-key per key (default 2; --quick 1)
  --jobs-one-key N        backlog jobs at one key (default 1000; --quick 300)
  --backlog-timeout S     a backlog not drained by then is reported as it stands (default 20; --quick 10)
  --rate N                steady-state enqueues per second (default 100)
  --steady-seconds S      (default 5; --quick 2)
  --work-ms MS            handler work (default 0: the handler only yields once to the event loop)
  --graphile-poll-ms MS   graphile-worker's pollInterval (default: its own, 2000)
  --notify-seconds S      NOTIFY cost: seconds per round, 0 skips it (default 1.5; --quick 0.5)
  --json FILE             also write every figure as JSON

PostgreSQL: DATABASE_URL if set (a database per system is created on that server and dropped at
the end), else an embedded PostgreSQL started for the run.`;

/** Parse argv (without node and the script). */
export function parseQueueOptions(argv: string[]): QueueBenchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      keys: { type: 'string' },
      systems: { type: 'string' },
      concurrency: { type: 'string' },
      jobs: { type: 'string' },
      'min-per-key': { type: 'string' },
      'jobs-one-key': { type: 'string' },
      'backlog-timeout': { type: 'string' },
      'graphile-poll-ms': { type: 'string' },
      rate: { type: 'string' },
      'steady-seconds': { type: 'string' },
      'work-ms': { type: 'string' },
      'notify-seconds': { type: 'string' },
      json: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const quick = values.quick ?? false;
  const num = (name: string, v: string | undefined, fallback: number, min = 1) => {
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isFinite(n) || n < min) throw new Error(`--${name} must be a number ≥ ${min}, got ${v}`);
    return n;
  };
  const keys = (values.keys ?? '1,100,10000').split(',').map((s) => Math.round(num('keys', s.trim(), 1)));
  const systems = (values.systems ?? SYSTEMS.join(',')).split(',').map((s) => s.trim());
  for (const s of systems)
    if (!(SYSTEMS as readonly string[]).includes(s)) throw new Error(`--systems: unknown system ${s} (known: ${SYSTEMS.join(', ')})`);
  return {
    quick,
    keys: [...new Set(keys)].sort((a, b) => a - b),
    systems: [...new Set(systems)] as SystemName[],
    concurrency: Math.round(num('concurrency', values.concurrency, 8)),
    jobs: Math.round(num('jobs', values.jobs, quick ? 1000 : 4000)),
    jobsOneKey: Math.round(num('jobs-one-key', values['jobs-one-key'], quick ? 300 : 1000)),
    minPerKey: Math.round(num('min-per-key', values['min-per-key'], quick ? 1 : 2)),
    rate: num('rate', values.rate, 100),
    steadySeconds: num('steady-seconds', values['steady-seconds'], quick ? 2 : 5, 0.1),
    workMs: num('work-ms', values['work-ms'], 0, 0),
    backlogTimeoutMs: num('backlog-timeout', values['backlog-timeout'], quick ? 10 : 20) * 1000,
    steadyTimeoutMs: quick ? 10_000 : 20_000,
    graphilePollMs: values['graphile-poll-ms'] === undefined ? undefined : num('graphile-poll-ms', values['graphile-poll-ms'], 10),
    notifySeconds: num('notify-seconds', values['notify-seconds'], quick ? 0.5 : 1.5, 0),
    notifyRounds: quick ? 1 : 3,
    notifyClients: 16,
    json: values.json,
    help: values.help ?? false,
  };
}

/** One system at one number of keys. */
export interface CaseResult {
  system: SystemName;
  keys: number;
  backlog: {
    jobs: number;
    perKey: number;
    /** Time to enqueue the backlog (layers of transactions of up to 500, asynchronous commit). */
    fillSeconds: number;
    /** First handler start to last handler finish. */
    seconds: number;
    jobsPerSec: number;
    /** False when the backlog was not drained within the time limit (figures are for what ran). */
    drained: boolean;
    check: CheckSummary;
    /** pgcoord: what its workers sent per job. */
    perJob?: PgcoordCounts;
  };
  steady: {
    rate: number;
    jobs: number;
    drained: boolean;
    check: CheckSummary;
  };
}

/** The NOTIFY measure: enqueues per second of each variant (median of the rounds). */
export interface NotifyCost {
  clients: number;
  seconds: number;
  rounds: number;
  /** To a key with queued jobs: no new row in queue_keys, no NOTIFY. */
  existingKey: number;
  /** To a new key through pgcoord's statement without its pg_notify (hand-written twin). */
  newKeyNoNotify: number;
  /** To a new key through enqueue(): new rows and a NOTIFY. */
  newKeyNotify: number;
  /** Notifications the listener received in the NOTIFY variant, per enqueue (1 expected). */
  notifiesPerEnqueue: number;
}

/** Everything one run measured. */
export interface QueueBench {
  server: string;
  cpus: number;
  /** The host's 1-minute load average at the start and at the end (other work skews every figure). */
  load: { start: number; end: number };
  systems: { name: SystemName; label: string }[];
  options: Omit<QueueBenchOptions, 'help' | 'json'>;
  cases: CaseResult[];
  notify?: NotifyCost;
  seconds: number;
  notes: string[];
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

/** Run `fn` over `items`, at most `n` at once. */
async function inParallel<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, items.length) }, async () => {
      while (next < items.length) await fn(items[next++] as T);
    }),
  );
}

const keyName = (prefix: string, i: number) => `${prefix}:${i}`;

/** The backlog: layer s holds job s of every key, committed before layer s + 1 starts. */
async function fill(sys: QueueSystem, queue: string, prefix: string, keys: number, perKey: number): Promise<void> {
  const BATCH = 500;
  for (let s = 1; s <= perKey; s++) {
    const layer: BenchPayload[] = Array.from({ length: keys }, (_, i) => ({ k: keyName(prefix, i), s, t: performance.now() }));
    const batches: BenchPayload[][] = [];
    for (let i = 0; i < layer.length; i += BATCH) batches.push(layer.slice(i, i + BATCH));
    await inParallel(batches, 4, (b) => sys.addBatch(queue, b));
  }
}

/** `rate` jobs/s for `seconds`, job i to key i mod keys, each key's enqueues one after another. */
async function produce(sys: QueueSystem, queue: string, prefix: string, keys: number, rate: number, seconds: number): Promise<number> {
  const total = Math.max(1, Math.round(rate * seconds));
  const chains = new Map<string, Promise<void>>();
  const seqs = new Map<string, number>();
  const sent: Promise<void>[] = [];
  const t0 = performance.now();
  let issued = 0;
  while (issued < total) {
    const due = Math.min(total, Math.floor(((performance.now() - t0) * rate) / 1000) + 1);
    for (; issued < due; issued++) {
      const k = keyName(prefix, issued % keys);
      const s = (seqs.get(k) ?? 0) + 1;
      seqs.set(k, s);
      const next = (chains.get(k) ?? Promise.resolve()).then(() => sys.add(queue, { k, s, t: performance.now() }));
      chains.set(k, next);
      sent.push(next);
    }
    await sleep(2);
  }
  await Promise.all(sent);
  return total;
}

async function runCase(sys: QueueSystem, keys: number, o: QueueBenchOptions, step: (s: string) => void): Promise<CaseResult> {
  const queue = `bench_${keys}`;
  const perKey = keys === 1 ? o.jobsOneKey : Math.max(o.minPerKey, Math.ceil(o.jobs / keys));
  const total = perKey * keys;
  step(`${sys.name}, ${keys} keys: enqueueing a backlog of ${total} jobs`);
  const f0 = performance.now();
  await fill(sys, queue, 'b', keys, perKey);
  const fillSeconds = (performance.now() - f0) / 1000;
  await sys.beforeDrain(queue);
  let checker = new OrderChecker(false);
  const handler = benchHandler(() => checker, o.workMs);
  sys.counts?.(true);
  step(`${sys.name}, ${keys} keys: draining the backlog`);
  let running = await sys.start(queue, handler, o.concurrency);
  const drained = await checker.waitFor(total, o.backlogTimeoutMs);
  const counts = sys.counts?.(true);
  const check = checker.summary();
  const seconds = (checker.lastFinish - checker.firstStart) / 1000;
  const backlog: CaseResult['backlog'] = {
    jobs: total,
    perKey,
    fillSeconds,
    seconds,
    jobsPerSec: check.distinct > 1 && seconds > 0 ? (check.distinct - 1) / seconds : 0,
    drained,
    check,
  };
  if (counts) {
    const n = Math.max(1, check.finished);
    backlog.perJob = {
      roundTrips: counts.roundTrips / n,
      claim: counts.claim / n,
      complete: counts.complete / n,
      renew: counts.renew / n,
      other: counts.other / n,
    };
  }
  if (!drained) {
    // what is left of the backlog must not run into the steady state
    await running.stop();
    await sys.endCase(queue);
    running = await sys.start(queue, handler, o.concurrency);
  }
  await sleep(300); // the workers go idle (and wait on LISTEN)
  step(`${sys.name}, ${keys} keys: steady state, ${o.rate} jobs/s`);
  checker = new OrderChecker(true);
  const sent = await produce(sys, queue, 's', keys, o.rate, o.steadySeconds);
  const steadyDrained = await checker.waitFor(sent, o.steadyTimeoutMs);
  const steady = { rate: o.rate, jobs: sent, drained: steadyDrained, check: checker.summary() };
  await running.stop();
  await sys.endCase(queue);
  return { system: sys.name, keys, backlog, steady };
}

// The enqueue statement as pgcoord sends it, with its pg_notify taken out: the same rows written,
// no NOTIFY. Undefined when the statement no longer has the expected shape.
function silentEnqueueText(): string | undefined {
  const { text } = enqueueStatement('q', 'k', '{}', undefined, 0, undefined);
  const notify = `count(pg_notify('${QUEUE_CHANNEL}', $1))`;
  return text.includes(notify) ? text.replace(notify, 'count(*)') : undefined;
}

/**
 * pgcoord alone, no worker: enqueues/s to keys with queued jobs (no NOTIFY), to new keys (new
 * rows and a NOTIFY) and to new keys through the same statement without its pg_notify.
 */
async function notifyCost(url: string, o: QueueBenchOptions, step: (s: string) => void, notes: string[]): Promise<NotifyCost> {
  const clients = o.notifyClients;
  const sql = postgres(url, { max: clients, onnotice: () => {} });
  const listener = postgres(url, { max: 1, onnotice: () => {} });
  let notified = 0;
  const queue = 'notify_cost';
  const silent = silentEnqueueText();
  if (!silent) notes.push('NOTIFY cost: the enqueue statement has changed shape; the variant without pg_notify was skipped');
  try {
    await listener.listen(QUEUE_CHANNEL, (payload) => {
      if (payload === queue) notified++;
    });
    const ms = o.notifySeconds * 1000;
    // the existing keys: one per client (clients never wait on each other's key)
    await Promise.all(Array.from({ length: clients }, (_, c) => enqueue(sql, queue, `existing:${c}`, { c })));
    const loop = async (one: (c: number, i: number) => Promise<unknown>) => {
      let n = 0;
      const until = performance.now() + ms;
      const t0 = performance.now();
      await Promise.all(
        Array.from({ length: clients }, async (_, c) => {
          for (let i = 0; performance.now() < until; i++) {
            await one(c, i);
            n++;
          }
        }),
      );
      return { ops: n, perSec: (n * 1000) / (performance.now() - t0) };
    };
    const api = (key: string, c: number, i: number) => enqueue(sql, queue, key, { c, i });
    const twin = (key: string, c: number, i: number) =>
      sql.unsafe(silent as string, [queue, key, JSON.stringify({ c, i }), null, 0, null] as never[]);
    const existing: number[] = [];
    const quietNew: number[] = [];
    const notifying: number[] = [];
    let newOps = 0;
    let newNotified = 0;
    await loop((c, i) => api(`warm:${c}:${i}`, c, i)); // warm the connections and plans
    if (silent) await loop((c, i) => twin(`warm-twin:${c}:${i}`, c, i));
    for (let r = 0; r < o.notifyRounds; r++) {
      step(`pgcoord NOTIFY cost, round ${r + 1}/${o.notifyRounds}`);
      existing.push((await loop((c, i) => api(`existing:${c}`, c, i))).perSec);
      if (silent) quietNew.push((await loop((c, i) => twin(`silent:${r}:${c}:${i}`, c, i))).perSec);
      const before = notified;
      const got = await loop((c, i) => api(`new:${r}:${c}:${i}`, c, i));
      notifying.push(got.perSec);
      await sleep(200); // the last notifications arrive
      newOps += got.ops;
      newNotified += notified - before;
    }
    return {
      clients,
      seconds: o.notifySeconds,
      rounds: o.notifyRounds,
      existingKey: median(existing),
      newKeyNoNotify: quietNew.length ? median(quietNew) : Number.NaN,
      newKeyNotify: median(notifying),
      notifiesPerEnqueue: newOps ? newNotified / newOps : 0,
    };
  } finally {
    await sql.unsafe('truncate pgcoord.queue_jobs, pgcoord.queue_keys, pgcoord.queue_order').catch(() => {});
    await Promise.all([sql.end({ timeout: 1 }), listener.end({ timeout: 1 })]);
  }
}

/**
 * Run the benchmark on the server at `serverUrl`: a database per system is created there and
 * dropped at the end.
 */
export async function runQueueBench(
  serverUrl: string,
  options: Partial<QueueBenchOptions> = {},
  onStep: (s: string) => void = () => {},
): Promise<QueueBench> {
  const o: QueueBenchOptions = { ...parseQueueOptions([]), ...options };
  const started = performance.now();
  const loadStart = loadavg()[0] as number;
  const notes: string[] = [];
  const dbs: TestDatabase[] = [];
  const systems: QueueSystem[] = [];
  const cases: CaseResult[] = [];
  let notify: NotifyCost | undefined;
  let server = '?';
  try {
    const admin = postgres(serverUrl, { max: 1, onnotice: () => {} });
    try {
      const [v] = await admin.unsafe<{ v: string }[]>("select current_setting('server_version') as v");
      server = `PostgreSQL ${v?.v}`;
    } finally {
      await admin.end({ timeout: 1 });
    }
    for (const name of o.systems) {
      onStep(`${name}: a database of its own, migrations`);
      const db = await createTestDatabase(serverUrl, 'pgcoord_qbench');
      dbs.push(db);
      systems.push(await openSystem(name, db.url, { graphilePollMs: o.graphilePollMs }));
    }
    for (const [level, keys] of o.keys.entries()) {
      // the systems' order rotates with the level: none is always first or last
      const order = systems.map((_, i) => systems[(i + level) % systems.length] as QueueSystem);
      for (const sys of order) cases.push(await runCase(sys, keys, o, onStep));
    }
    const p = o.systems.indexOf('pgcoord');
    if (p >= 0 && o.notifySeconds > 0) notify = await notifyCost((dbs[p] as TestDatabase).url, o, onStep, notes);
  } finally {
    for (const sys of systems) await sys.close().catch((err: unknown) => notes.push(`${sys.name} close: ${(err as Error).message}`));
    for (const db of dbs) await db.drop().catch((err: unknown) => notes.push(`drop ${db.name}: ${(err as Error).message}`));
  }
  const { help: _h, json: _j, ...kept } = o;
  return {
    server,
    cpus: availableParallelism(),
    load: { start: loadStart, end: loadavg()[0] as number },
    systems: systems.map((s) => ({ name: s.name, label: s.label })),
    options: kept,
    cases,
    notify,
    seconds: (performance.now() - started) / 1000,
    notes,
  };
}

// ------------------------------------------------------------------ report

function table(header: string[], rows: string[][], right: boolean[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    `| ${cells.map((c, i) => (right[i] ? c.padStart(widths[i] as number) : c.padEnd(widths[i] as number))).join(' | ')} |`;
  return [
    line(header),
    `|${widths.map((w, i) => (right[i] ? `${'-'.repeat(w + 1)}:` : `-${'-'.repeat(w + 1)}`)).join('|')}|`,
    ...rows.map(line),
  ].join('\n');
}

const int = (n: number) => (Number.isFinite(n) ? Math.round(n).toLocaleString('en-US').replaceAll(',', ' ') : '-');
const ms = (n: number | undefined) => (n === undefined || !Number.isFinite(n) ? '-' : n < 10 ? n.toFixed(2) : n.toFixed(1));

/** The report, for the terminal. */
export function formatQueueBench(r: QueueBench): string {
  const o = r.options;
  const out: string[] = [];
  out.push(
    `keyed queue: ${r.systems.map((s) => s.label).join(' | ')}`,
    `${r.server}, ${r.cpus} CPUs, load average ${r.load.start.toFixed(1)} at the start, ${r.load.end.toFixed(1)} at the end; each system on a database of its own, ${o.concurrency} concurrent handlers in one process, handler = ${o.workMs ? `${o.workMs} ms of sleep` : 'one setImmediate (no work)'}`,
    `backlog: ${int(o.jobs)} jobs per level (at least ${o.minPerKey} per key), enqueued before the workers start; jobs/s from the first start to the last finish.${o.quick ? ' --quick: scaled down, figures are rough.' : ''}`,
    `steady state: ${o.rate} jobs/s for ${o.steadySeconds} s on idle workers; latency from the enqueue's send to the handler's start.`,
    'violations: the same checker for every system (two jobs of a key at once, or a key out of seq order), backlog + steady state.',
    '',
  );
  const byKey = (keys: number, system: SystemName) => r.cases.find((c) => c.keys === keys && c.system === system);
  const rows: string[][] = [];
  for (const keys of o.keys) {
    const gw = byKey(keys, 'graphile-worker');
    for (const name of r.systems.map((s) => s.name)) {
      const c = byKey(keys, name);
      if (!c) continue;
      const b = c.backlog;
      const ratio = gw && gw.backlog.jobsPerSec > 0 ? `${(b.jobsPerSec / gw.backlog.jobsPerSec).toFixed(2)}×` : '-';
      const lat = c.steady.check.latency;
      const gwLat = gw?.steady.check.latency;
      const missing = b.jobs - b.check.distinct + (c.steady.jobs - c.steady.check.distinct);
      rows.push([
        int(keys),
        name,
        `${int(b.jobs)}${b.drained ? '' : ` (${int(b.check.distinct)} done, timeout)`}`,
        ms(b.fillSeconds),
        int(b.jobsPerSec),
        ratio,
        ms(lat?.p50),
        ms(lat?.p99),
        lat && gwLat ? `${(lat.p50 / gwLat.p50).toFixed(2)}×` : '-',
        String(b.check.violations + c.steady.check.violations),
        String(missing),
        b.perJob ? `${b.perJob.roundTrips.toFixed(2)} (claim ${b.perJob.claim.toFixed(2)}, complete ${b.perJob.complete.toFixed(2)})` : '',
      ]);
    }
  }
  out.push(
    table(
      [
        'keys',
        'system',
        'backlog jobs',
        'fill s',
        'jobs/s',
        'vs graphile-worker',
        'latency p50 ms',
        'p99 ms',
        'p50 vs gw',
        'violations',
        'missing',
        'pgcoord RT/job',
      ],
      rows,
      [true, false, true, true, true, true, true, true, true, true, true, false],
    ),
  );
  const slow = r.cases.filter((c) => !c.steady.drained).map((c) => `${c.system} at ${c.keys} keys`);
  if (slow.length) out.push(`steady state not drained within ${o.steadyTimeoutMs / 1000} s: ${slow.join(', ')}`);
  if (r.notify) {
    const n = r.notify;
    out.push(
      '',
      `pgcoord enqueue and NOTIFY: ${n.clients} clients, no worker, ${n.rounds} round(s) of ${n.seconds} s, variants alternating (median enqueues/s)`,
      table(
        ['enqueue to', 'enqueues/s', 'vs existing key'],
        [
          ['a key with queued jobs (no NOTIFY)', int(n.existingKey), '1.00×'],
          [
            'a new key, same statement without pg_notify (twin)',
            int(n.newKeyNoNotify),
            `${(n.newKeyNoNotify / n.existingKey).toFixed(2)}×`,
          ],
          ['a new key: enqueue() (new rows + NOTIFY)', int(n.newKeyNotify), `${(n.newKeyNotify / n.existingKey).toFixed(2)}×`],
        ],
        [false, true, true],
      ),
      `NOTIFY alone: ${(n.newKeyNotify / n.newKeyNoNotify).toFixed(2)}× (enqueue() to a new key vs its twin without pg_notify); notifications received per enqueue: ${n.notifiesPerEnqueue.toFixed(2)}`,
    );
  }
  const gwStalled = r.cases.some((c) => c.system === 'graphile-worker' && !c.backlog.drained);
  if (gwStalled && o.graphilePollMs === undefined)
    out.push(
      'graphile-worker backlog not drained: it completes a job without waiting for the completion, so its next get_job can find the',
      "key's named queue still locked; nothing wakes it when the queue unlocks (NOTIFY comes only with new jobs), so it sleeps its",
      'pollInterval (2 s by default; --graphile-poll-ms to change it). Over many keys, its get_job locks free named queues',
      '(FOR UPDATE SKIP LOCKED in a subquery) to pick one, and slows as they grow (its docs warn against many queue names).',
    );
  for (const note of r.notes) out.push(`note: ${note}`);
  out.push('', `run took ${r.seconds.toFixed(0)} s. This host resolves throughput to ±10 % at best: ratios inside 0.9–1.1× are a tie.`);
  return out.join('\n');
}

async function main(argv: string[]): Promise<number> {
  let o: QueueBenchOptions;
  try {
    o = parseQueueOptions(argv);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n\n${QUEUE_USAGE}\n`);
    return 2;
  }
  if (o.help) {
    process.stdout.write(`${QUEUE_USAGE}\n`);
    return 0;
  }
  let url = process.env.DATABASE_URL;
  const embedded = url ? undefined : await startEmbeddedPostgres();
  url ??= (embedded as NonNullable<typeof embedded>).url;
  try {
    const t0 = performance.now();
    const r = await runQueueBench(url, o, (s) => process.stderr.write(`… ${((performance.now() - t0) / 1000).toFixed(1)} s: ${s}\n`));
    process.stdout.write(`${formatQueueBench(r)}\n`);
    if (o.json) await writeFile(o.json, `${JSON.stringify(r, null, 2)}\n`);
    return 0;
  } finally {
    await embedded?.stop();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  process.exitCode = await main(process.argv.slice(2));
}
