// The three keyed queues of bench/queue.ts behind one small interface, each on a database of its
// own with its own pools: one of 10 connections for its workers, one of 16 for its producers, and
// one of 8 that fills backlogs with synchronous_commit off (the fill is not what is measured, and
// on a host whose every commit waits ~5 ms for its fsync it would take most of the run; commit
// order and visibility are the same).
//
// - pgcoord: enqueue() / work() (src/queue), postgres.js, the workers' pool counting its round
//   trips (bench/db.ts) and its statements by kind (postgres.js `debug`).
// - graphile-worker: one task, `queueName` = the key (a named queue: one job of a key at a time),
//   `run()` with its defaults but concurrency (no localQueue, no batched completion), jobs added
//   with addJobs / addJob from WorkerUtils.
// - pg-boss: a `key_strict_fifo` queue (`singletonKey` = the key: FIFO per key, a key's next job
//   held back while one is active), work() with `localConcurrency` handlers of one job each,
//   LISTEN/NOTIFY on (`useListenNotify`, the queue's `notify`), the shortest poll it accepts
//   (0.5 s) and `burstWhenReadyExceeds: 1` (the lowest it takes: a worker that got a job fetches
//   again at once while its cached ready count is above 1, refreshed every second here), jobs added with insert / send.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { Logger, makeWorkerUtils, run, runMigrations, type WorkerUtils } from 'graphile-worker';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import postgres from 'postgres';
import { enqueue, migrateQueue, work } from '../src/queue/index.js';
import { countedSocket, type RoundTrips } from './db.js';
import type { BenchPayload } from './queue-check.js';

export const SYSTEMS = ['pgcoord', 'graphile-worker', 'pg-boss'] as const;
export type SystemName = (typeof SYSTEMS)[number];

/** Statements the pgcoord workers sent, by kind, and their round trips (socket writes). */
export interface PgcoordCounts {
  roundTrips: number;
  claim: number;
  complete: number;
  renew: number;
  other: number;
}

/** Workers of one system on one queue. */
export interface Running {
  stop(): Promise<void>;
}

/** One system under test. */
export interface QueueSystem {
  name: SystemName;
  /** Name, version and how it is used, for the report. */
  label: string;
  /** Backlog: add jobs (at most one per key) in one transaction, asynchronous commit. */
  addBatch(queue: string, jobs: readonly BenchPayload[]): Promise<void>;
  /** Steady state: add one job, autocommit. */
  add(queue: string, job: BenchPayload): Promise<void>;
  /** Start `concurrency` handlers on `queue`; resolves once they run. */
  start(queue: string, handler: (p: BenchPayload) => Promise<void>, concurrency: number): Promise<Running>;
  /**
   * Called once a backlog is in, before the workers start (untimed): ANALYZE, as autovacuum would
   * soon after such a fill (without statistics pg-boss's fetch plans a nested loop over the whole
   * backlog and takes seconds), and for pg-boss its stats refreshed.
   */
  beforeDrain(queue: string): Promise<void>;
  /** Remove what a case left behind, then VACUUM ANALYZE: every case starts from the same state. */
  endCase(queue: string): Promise<void>;
  /** pgcoord only: what its workers sent since the last reset. */
  counts?(reset?: boolean): PgcoordCounts;
  close(): Promise<void>;
}

const PRODUCERS = 16;
const WORKER_POOL = 10;
const FILLERS = 8;
const ASYNC_COMMIT = '-c synchronous_commit=off';
const quiet = () => {};

/** The version of an installed package. */
export function packageVersion(name: string): string {
  const require = createRequire(import.meta.url);
  let dir = dirname(require.resolve(name));
  for (let i = 0; i < 5; i++) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === name) return pkg.version ?? '?';
    } catch {
      // not here: one folder up
    }
    dir = dirname(dir);
  }
  return '?';
}

async function maintain(url: string, command: 'analyze' | 'vacuum analyze'): Promise<void> {
  const sql = postgres(url, { max: 1, onnotice: quiet });
  try {
    await sql.unsafe(command);
  } finally {
    await sql.end({ timeout: 1 });
  }
}

// ------------------------------------------------------------------ pgcoord

async function pgcoordSystem(url: string): Promise<QueueSystem> {
  const trips: RoundTrips = { count: 0 };
  const counts: PgcoordCounts = { roundTrips: 0, claim: 0, complete: 0, renew: 0, other: 0 };
  const debug = (_conn: number, query: string) => {
    if (query.includes('queue_claim(')) counts.claim++;
    else if (query.includes('queue_complete(')) counts.complete++;
    else if (query.startsWith('update pgcoord.queue_keys kk set ready_at')) counts.renew++;
    else counts.other++;
  };
  const workers = postgres(url, {
    max: WORKER_POOL,
    onnotice: quiet,
    idle_timeout: 0,
    debug,
    socket: countedSocket(url, trips),
  } as postgres.Options<Record<string, postgres.PostgresType>>);
  const producers = postgres(url, { max: PRODUCERS, onnotice: quiet });
  const fillers = postgres(url, { max: FILLERS, onnotice: quiet, connection: { synchronous_commit: 'off' } });
  await migrateQueue(producers);
  return {
    name: 'pgcoord',
    label: 'pgcoord enqueue()/work() (postgres.js)',
    async addBatch(queue, jobs) {
      await fillers.begin((tx) => Promise.all(jobs.map((j) => enqueue(tx, queue, j.k, j))));
    },
    async add(queue, job) {
      await enqueue(producers, queue, job.k, job);
    },
    beforeDrain: () => maintain(url, 'analyze'),
    async start(queue, handler, concurrency) {
      const worker = work<BenchPayload>(workers, queue, (job) => handler(job.payload), {
        concurrency,
        onError: (err) => console.error(`pgcoord worker: ${(err as Error).message}`),
      });
      return { stop: () => worker.stop() };
    },
    async endCase() {
      await producers.unsafe('truncate pgcoord.queue_jobs, pgcoord.queue_keys, pgcoord.queue_order');
      await maintain(url, 'vacuum analyze');
    },
    counts(reset = false) {
      const out = { ...counts, roundTrips: trips.count };
      if (reset) {
        trips.count = 0;
        counts.claim = counts.complete = counts.renew = counts.other = 0;
      }
      return out;
    },
    async close() {
      await Promise.all([workers.end({ timeout: 1 }), producers.end({ timeout: 1 }), fillers.end({ timeout: 1 })]);
    },
  };
}

// ------------------------------------------------------------------ graphile-worker

const TASK = 'bench';

async function graphileSystem(url: string, pollMs: number | undefined): Promise<QueueSystem> {
  const logger = new Logger(() => (level, message) => {
    if (level === 'error') console.error(`graphile-worker: ${message}`);
  });
  const workerPool = new pg.Pool({ connectionString: url, max: WORKER_POOL });
  const producerPool = new pg.Pool({ connectionString: url, max: PRODUCERS });
  const fillPool = new pg.Pool({ connectionString: url, max: FILLERS, options: ASYNC_COMMIT });
  for (const pool of [workerPool, producerPool, fillPool]) {
    pool.on('error', quiet);
    pool.on('connect', (client) => client.on('error', quiet));
  }
  await runMigrations({ pgPool: producerPool, logger });
  const utils: WorkerUtils = await makeWorkerUtils({ pgPool: producerPool, logger });
  const fillUtils: WorkerUtils = await makeWorkerUtils({ pgPool: fillPool, logger });
  return {
    name: 'graphile-worker',
    label: `graphile-worker ${packageVersion('graphile-worker')} (named queue per key, pg${pollMs ? `, pollInterval ${pollMs} ms` : ''})`,
    async addBatch(_queue, jobs) {
      await fillUtils.addJobs(jobs.map((j) => ({ identifier: TASK, payload: j, queueName: j.k })));
    },
    async add(_queue, job) {
      await utils.addJob(TASK, job, { queueName: job.k });
    },
    beforeDrain: () => maintain(url, 'analyze'),
    async start(_queue, handler, concurrency) {
      const runner = await run({
        pgPool: workerPool,
        concurrency,
        noHandleSignals: true,
        logger,
        ...(pollMs ? { pollInterval: pollMs } : {}),
        taskList: { [TASK]: (payload) => handler(payload as BenchPayload) },
        crontab: '',
      });
      return { stop: () => runner.stop() };
    },
    async endCase() {
      await producerPool.query('truncate graphile_worker._private_jobs, graphile_worker._private_job_queues');
      await maintain(url, 'vacuum analyze');
    },
    async close() {
      await Promise.all([utils.release(), fillUtils.release()]);
      await Promise.all([workerPool.end(), producerPool.end(), fillPool.end()]);
    },
  };
}

// ------------------------------------------------------------------ pg-boss

async function pgBossSystem(url: string): Promise<QueueSystem> {
  const common = { connectionString: url, schedule: false, openTelemetry: { enabled: false } };
  // the producers: no maintenance, no workers
  const producer = new PgBoss({ ...common, max: PRODUCERS, supervise: false });
  const filler = new PgBoss({ ...common, max: FILLERS, supervise: false, options: ASYNC_COMMIT });
  // the workers: LISTEN/NOTIFY, queue stats refreshed every second (burst mode reads them)
  const boss = new PgBoss({
    ...common,
    max: WORKER_POOL,
    useListenNotify: true,
    supervise: true,
    superviseIntervalSeconds: 1,
    monitorIntervalSeconds: 1,
    queueCacheIntervalSeconds: 1,
  });
  for (const b of [producer, filler, boss]) b.on('error', (err: Error) => console.error(`pg-boss: ${err.message}`));
  await boss.start();
  await producer.start();
  await filler.start();
  const created = new Set<string>();
  const ensure = async (queue: string) => {
    if (created.has(queue)) return;
    await boss.createQueue(queue, { policy: 'key_strict_fifo', notify: true });
    created.add(queue);
  };
  return {
    name: 'pg-boss',
    label: `pg-boss ${packageVersion('pg-boss')} (key_strict_fifo, singletonKey = key, pg)`,
    async addBatch(queue, jobs) {
      await ensure(queue);
      await filler.insert(
        queue,
        jobs.map((j) => ({ data: { ...j }, singletonKey: j.k })),
      );
    },
    async add(queue, job) {
      await ensure(queue);
      await producer.send(queue, { ...job }, { singletonKey: job.k });
    },
    async beforeDrain(queue) {
      await maintain(url, 'analyze');
      // burst mode (fetch again at once after a job) reads the ready count from the workers' cache:
      // compute the stats now and let the cache (refreshed every second) pick them up
      await boss.supervise(queue);
      await new Promise((r) => setTimeout(r, 1200));
    },
    async start(queue, handler, concurrency) {
      await ensure(queue);
      await boss.work<BenchPayload>(
        queue,
        {
          localConcurrency: concurrency,
          batchSize: 1,
          pollingIntervalSeconds: 0.5,
          notifyPollingIntervalSeconds: 0.5,
          burstWhenReadyExceeds: 1,
        },
        async (jobs) => {
          for (const job of jobs) await handler(job.data);
        },
      );
      return { stop: () => boss.offWork(queue, { wait: true }) };
    },
    async endCase(queue) {
      if (created.delete(queue)) await boss.deleteQueue(queue);
      await maintain(url, 'vacuum analyze');
    },
    async close() {
      await producer.stop({ graceful: false });
      await filler.stop({ graceful: false });
      await boss.stop({ graceful: false });
    },
  };
}

/** Open `name` on the (empty) database at `url`: its tables migrated, its pools open. */
export function openSystem(name: SystemName, url: string, opts: { graphilePollMs?: number } = {}): Promise<QueueSystem> {
  switch (name) {
    case 'pgcoord':
      return pgcoordSystem(url);
    case 'graphile-worker':
      return graphileSystem(url, opts.graphilePollMs);
    case 'pg-boss':
      return pgBossSystem(url);
  }
}
