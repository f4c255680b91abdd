// The keyed queue across OS processes under faults: every committed job's effect applied exactly
// once, per key in enqueue order, nothing acknowledged lost, no key stuck. 8 workers (2 work() of
// concurrency 2 in each of 4 processes, ./fixtures/queue-worker.ts; two on postgres.js, two on
// node-postgres) run 500 keys while 2 producers (./fixtures/queue-producer.ts, one per driver)
// enqueue, each key's jobs by one producer, seq 1, 2, 3... in commit order. The test injects the
// faults: pg_terminate_backend of workers' connections, SIGKILL (and a respawn), SIGSTOP past the
// claim TTL (then SIGCONT), traps (a worker stops itself between a job's effect and its completion
// and is resumed once another worker took the key over: its completion must be refused), deliberate
// handler failures (before and after the effect), rolled-back enqueues, and one crash-restart of
// PostgreSQL: the test runs its own embedded server, so the restart disturbs no other test file.
//
// Handlers write their effect with withJobFence, idempotently (keyed by job id) and placed in the
// key's effect sequence under a per-key counter row (commit order). The checker then reads the
// database: the outbox of committed enqueues (`enqueued`), the effects, and the queue's tables.
//
// Size: DEFAULT_JOBS jobs (500 keys) by default, so the file takes a few minutes at most on a
// loaded 2-core host; PGCOORD_QUEUE_CHAOS_JOBS=<n> sets it, and PGCOORD_CHAOS_SECONDS (the soak
// switch of the other chaos tests) runs the full FULL_JOBS. PGCOORD_QUEUE_CHAOS_LOG=<file> appends a
// progress line (applied, queued, held keys, faults, processes) about twice a second while faults run.
import { type ChildProcess, spawn } from 'node:child_process';
import { appendFileSync } from 'node:fs';
import pg from 'pg';
import { afterAll, describe, expect, it } from 'vitest';
import { listQueueKeys, migrateQueue, queueStats } from '../src/index.js';
import { type EmbeddedServer, startEmbeddedPostgres } from '../src/testing/embedded.js';
import { bundleFixtures } from './fixtures/bundle.js';
import { sleep } from './helpers.js';

const KEYS = 500;
const FULL_JOBS = 50_000;
/** Jobs by default: what a loaded 2-core host runs, with every fault, in a few minutes. */
const DEFAULT_JOBS = 5_000;
const JOBS = Number(process.env.PGCOORD_QUEUE_CHAOS_JOBS ?? (process.env.PGCOORD_CHAOS_SECONDS ? FULL_JOBS : DEFAULT_JOBS));
const PER_KEY = Math.max(1, Math.round(JOBS / KEYS));
const TOTAL = PER_KEY * KEYS;
const QUEUE = 'chaos';
const WORKER_PROCS = 4;
const WORKER = { works: 2, concurrency: 2, claimTtlMs: 1500, maxAttempts: 50, retryMs: 100, workMs: 4 };
const PRODUCERS = 2;
/** Enqueues a second at most, all producers together (the backlog bound below is what paces them). */
const RATE = 1000;
/**
 * Producers wait while this many jobs are queued: the queue stays shallow (keys empty and fill
 * again), and a key whose claim ran out is taken over within seconds (oldest ready first).
 */
const MAX_BACKLOG = 150;
const DRIVERS = ['pgjs', 'pg'] as const;

type Ev = { ev: string; pid: number; id: number; t: number } & Record<string, unknown>;

interface Proc {
  kind: 'worker' | 'producer';
  child: ChildProcess;
  pid: number;
  id: number;
  events: Ev[];
  stderr: string;
  exited: boolean;
  paused: boolean;
  /** A trap was set (SIGUSR2) and has not played out yet. */
  armed: boolean;
  killed: boolean;
  exit: Promise<number | null>;
  status?: string;
}

// The fixtures bundled once (test/fixtures/bundle.ts), on postgres.js 3.4 with pgcoord's patch.
const bundle = await bundleFixtures('queue-chaos', ['queue-worker', 'queue-producer'], { patchedPgjs3: true });
afterAll(() => bundle.remove());

// A server of this file's own: the crash-restart must not reach other files' databases.
const server: EmbeddedServer = await startEmbeddedPostgres();
const pool = new pg.Pool({ connectionString: server.url, max: 3, application_name: 'queue-chaos-test' });
pool.on('error', () => {}); // the restart
afterAll(async () => {
  await pool.end();
  await server.stop();
});
await migrateQueue(pool);
await pool.query(`create table enqueued (job_id bigint primary key, key text not null, seq int not null, unique (key, seq));
  create table effect_pos (key text primary key, n int not null);
  create table effects (job_id bigint primary key, key text not null, seq int not null, pos int not null, fence bigint not null,
    attempt int not null, worker text not null, ghost boolean not null, at timestamptz not null default clock_timestamp(),
    unique (key, pos))`);

// A query that may meet the restart: tried again until it answers.
async function ask<T extends pg.QueryResultRow>(text: string, params: unknown[] = []): Promise<T[]> {
  for (let tries = 0; ; tries++) {
    try {
      return (await pool.query<T>(text, params)).rows;
    } catch (err) {
      if (tries > 100) throw err;
      await sleep(200);
    }
  }
}

// Every child ever started: killed (after a SIGCONT) when the file ends, also after a failure.
const live = new Set<ChildProcess>();
const killAll = () => {
  for (const child of live) {
    child.kill('SIGCONT');
    child.kill('SIGKILL');
  }
};
process.once('exit', killAll);
afterAll(async () => {
  const exits = [...live].map((c) => new Promise((r) => c.once('exit', r)));
  killAll();
  await Promise.all(exits);
});

function start(kind: Proc['kind'], id: number, config: object): Proc {
  const script = kind === 'worker' ? 'queue-worker' : 'queue-producer';
  const child = spawn(process.execPath, [bundle.script(script), JSON.stringify({ ...config, id })], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  const proc: Proc = {
    kind,
    child,
    pid: child.pid as number,
    id,
    events: [],
    stderr: '',
    exited: false,
    paused: false,
    armed: false,
    killed: false,
    exit: Promise.resolve(null),
  };
  let buf = '';
  child.stdout!.on('data', (d) => {
    buf += d;
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.startsWith('{')) proc.events.push(JSON.parse(line) as Ev);
    }
  });
  child.stderr!.on('data', (d) => {
    proc.stderr += d;
  });
  proc.exit = new Promise((resolve) =>
    child.once('exit', (code, signal) => {
      live.delete(child);
      proc.exited = true;
      proc.status = String(code ?? signal);
      resolve(code);
    }),
  );
  return proc;
}

const until = async (check: () => boolean | Promise<boolean>, ms: number, what: string) => {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
    await sleep(50);
  }
};
const ready = (p: Proc) =>
  until(
    () => {
      if (p.exited) throw new Error(`${p.kind} ${p.id} exited (${p.status}) before it was ready: ${p.stderr}`);
      return p.events.some((e) => e.ev === 'ready');
    },
    60_000,
    `${p.kind} ${p.id} ready (${p.stderr})`,
  );
const rand = (n: number) => Math.floor(Math.random() * n);
const count = async (table: string) => Number((await ask<{ n: string }>(`select count(*) as n from ${table}`))[0]!.n);

describe('keyed queue under real concurrency: 4 worker processes, 2 producers, kills, pauses, terminated backends, a restart', () => {
  it(
    `${TOTAL} jobs on ${KEYS} keys: each effect once, in enqueue order per key; nothing acknowledged lost; the queue drains`,
    async () => {
      const began = Date.now();
      const procs: Proc[] = [];
      const workers = new Map<number, Proc>(); // id -> current process
      const spawnWorker = (id: number) => {
        const p = start('worker', id, { url: server.url, driver: DRIVERS[id % 2], queue: QUEUE, ...WORKER });
        procs.push(p);
        workers.set(id, p);
        return p;
      };
      const producers = Array.from({ length: PRODUCERS }, (_, id) =>
        start('producer', id, {
          url: server.url,
          driver: DRIVERS[id % 2],
          producers: PRODUCERS,
          queue: QUEUE,
          keys: KEYS,
          perKey: PER_KEY,
          lanes: 6,
          rate: RATE / PRODUCERS,
          ghostRate: 0.02,
          failRate: 0.01,
          failAfterRate: 0.005,
          holdRate: 0.05,
          maxBacklog: MAX_BACKLOG,
        }),
      );
      procs.push(...producers);
      const faults = { terminated: 0, killed: 0, paused: 0, trapsSet: 0, restartMs: 0, restartAtApplied: 0 };
      const traps: { pid: number; key: string; fence: string; job: string; takenOver: boolean; waitedMs: number; after: Ev[] }[] = [];
      const timing = { startupMs: 0, produceMs: 0, chaosMs: 0, drainMs: 0, stopMs: 0 };
      const background: Promise<void>[] = [];
      try {
        await Promise.all([...Array.from({ length: WORKER_PROCS }, (_, id) => ready(spawnWorker(id))), ...producers.map(ready)]);
        timing.startupMs = Date.now() - began;
        const started = Date.now();
        const producersDone = Promise.all(producers.map((p) => p.exit)).then(() => {
          timing.produceMs = Date.now() - started;
        });
        let produced = false;
        void producersDone.then(() => {
          produced = true;
        });

        // A trap: the worker stops itself right after a job's effect committed; it is resumed once
        // another worker took the key over (or after 20 s: then nothing is expected of it). Its
        // connections are spared terminations and the restart waits until it played out, so that
        // its late completion reaches the server and is answered there: refused.
        const setTrap = (p: Proc) => {
          p.armed = true;
          faults.trapsSet++;
          const from = p.events.length;
          p.child.kill('SIGUSR2');
          return (async () => {
            let trapped: Ev | undefined;
            await until(
              () => {
                trapped = p.events.slice(from).find((e) => e.ev === 'trapped');
                return trapped !== undefined || p.exited;
              },
              60_000,
              `worker ${p.id} trapped`,
            );
            if (!trapped || p.exited) return;
            p.paused = true;
            const stoppedAt = Date.now();
            let takenOver = false;
            while (!takenOver && Date.now() - stoppedAt < 20_000) {
              await sleep(100);
              const rows = await ask<{ fence: string }>(
                'select fence::text as fence from pgcoord.queue_keys where queue = $1 and key = $2',
                [QUEUE, trapped.key],
              );
              takenOver = rows[0]?.fence !== String(trapped.fence);
            }
            const waitedMs = Date.now() - stoppedAt;
            const resumedAt = p.events.length;
            p.child.kill('SIGCONT');
            p.paused = false;
            const key = String(trapped.key);
            const fence = String(trapped.fence);
            const answer = (e: Ev) => e.ev === 'refused' && e.key === key && e.fence === fence;
            // taken over: its completion is answered (refused) within seconds; else it goes on
            if (takenOver) await until(() => p.exited || p.events.slice(resumedAt).some(answer), 20_000, 'an answer').catch(() => {});
            else await sleep(1000);
            traps.push({
              pid: p.pid,
              key,
              fence,
              job: String(trapped.job),
              takenOver,
              waitedMs,
              after: p.events.slice(resumedAt, resumedAt + 12),
            });
          })().finally(() => {
            p.armed = false;
          });
        };

        // Faults until the producers are done and 90% of the jobs are applied; then none while the
        // queue drains. Terminations all along; a kill every 4 to 6 s; one worker at a time stopped,
        // paused and trapped in turn, with 2 to 4 s between; the restart once 35% are applied.
        let applied = 0;
        let restarted = false;
        let nextKill = started + 4000;
        let nextStop = started + 2500;
        let stopped: Promise<void> | undefined;
        const candidates = () =>
          [...workers.values()].filter((p) => !p.paused && !p.armed && !p.exited && p.events.some((e) => e.ev === 'ready'));
        while (!(produced && applied >= 0.9 * TOTAL)) {
          await sleep(300 + rand(300));
          applied = await count('effects');
          if (process.env.PGCOORD_QUEUE_CHAOS_LOG)
            appendFileSync(
              process.env.PGCOORD_QUEUE_CHAOS_LOG,
              `${JSON.stringify({
                s: Math.round((Date.now() - started) / 1000),
                applied,
                committed: await count('enqueued'),
                queued: await count('pgcoord.queue_jobs'),
                held: await count('pgcoord.queue_keys where holder is not null'),
                faults,
                procs: procs
                  .filter((p) => !p.exited)
                  .map((p) => `${p.kind[0]}${p.id}${p.paused ? 'P' : ''}${p.armed ? 'A' : ''}`)
                  .join(','),
              })}\n`,
            );
          const rows = await ask<{ ok: boolean }>(
            `select pg_terminate_backend(pid) as ok from pg_stat_activity
             where application_name like 'queue-worker-%' and application_name <> all($2::text[]) order by random() limit $1`,
            [1 + rand(2), [...workers.values()].filter((p) => p.armed).map((p) => `queue-worker-${p.id}`)],
          );
          faults.terminated += rows.filter((r) => r.ok).length;
          const now = Date.now();
          if (!restarted && applied >= 0.35 * TOTAL) {
            if (stopped) continue; // a trap's answer must not meet the restart
            restarted = true;
            faults.restartAtApplied = applied;
            await server.restart('immediate'); // a crash: every backend dies, recovery replays the WAL
            faults.restartMs = Date.now() - now;
            continue;
          }
          if (now >= nextKill) {
            nextKill = now + 4000 + rand(2000);
            const victim = candidates()[rand(candidates().length)];
            if (victim) {
              victim.killed = true;
              victim.child.kill('SIGKILL');
              await victim.exit;
              faults.killed++;
              spawnWorker(victim.id); // not awaited: it joins once it has started
            }
          }
          if (!stopped && now >= nextStop && (restarted || applied < 0.3 * TOTAL)) {
            let stop: Promise<void> | undefined;
            if (faults.paused <= faults.trapsSet) {
              // pause a worker holding keys for longer than its claims last
              const held = await ask<{ label: string }>(
                'select distinct holder_label as label from pgcoord.queue_keys where queue = $1 and holder is not null and ready_at > clock_timestamp()',
                [QUEUE],
              );
              const pids = new Set(held.map((r) => Number(r.label.split(':')[1])));
              const victim = candidates().find((p) => pids.has(p.pid));
              if (victim) {
                victim.paused = true;
                victim.child.kill('SIGSTOP');
                faults.paused++;
                stop = sleep(2 * WORKER.claimTtlMs + rand(WORKER.claimTtlMs)).then(() => {
                  victim.child.kill('SIGCONT');
                  victim.paused = false;
                });
              }
            } else {
              const victim = candidates()[rand(candidates().length)];
              if (victim) stop = setTrap(victim);
            }
            if (stop) {
              const current = stop.finally(() => {
                stopped = undefined;
                nextStop = Date.now() + 2000 + rand(2000);
              });
              stopped = current;
              background.push(current);
            }
          }
        }
        await Promise.all(background);
        timing.chaosMs = Date.now() - started;

        // Drain: every committed job applied and the queue empty; stuck if no progress for 30 s.
        const draining = Date.now();
        await producersDone;
        let last = -1;
        let lastProgress = Date.now();
        for (;;) {
          const [effects, enqueued, jobs] = [await count('effects'), await count('enqueued'), await count('pgcoord.queue_jobs')];
          if (effects >= enqueued && jobs === 0) break;
          if (effects !== last) {
            last = effects;
            lastProgress = Date.now();
          } else if (Date.now() - lastProgress > 30_000) {
            const stuck = await listQueueKeys(pool, QUEUE, { limit: 20 });
            throw new Error(
              `no progress for 30 s: ${effects} of ${enqueued} applied, ${jobs} jobs queued; keys: ${JSON.stringify(stuck, (_k, v) => (typeof v === 'bigint' ? String(v) : v))}`,
            );
          }
          await sleep(250);
        }
        timing.drainMs = Date.now() - draining;

        const stopping = Date.now();
        const running = procs.filter((p) => !p.exited);
        await Promise.all(running.map(ready)); // a worker respawned late: its SIGTERM handler is there once it is ready
        const late: Proc[] = [];
        await Promise.all(
          running.map(async (p) => {
            p.child.kill('SIGCONT');
            p.child.kill('SIGTERM');
            const timer = setTimeout(() => {
              late.push(p);
              p.child.kill('SIGKILL');
            }, 20_000);
            await p.exit;
            clearTimeout(timer);
          }),
        );
        timing.stopMs = Date.now() - stopping;
        // every worker stopped within 20 s of SIGTERM, and none died by itself
        expect(late.map((p) => `${p.kind} ${p.id} (${p.pid}): ${p.stderr} ${JSON.stringify(p.events.slice(-6))}`)).toEqual([]);
        expect(
          procs.filter((p) => !p.killed && p.status !== '0').map((p) => `${p.kind} ${p.id} (${p.pid}) ${p.status}: ${p.stderr}`),
        ).toEqual([]);
      } finally {
        for (const p of procs) {
          p.child.kill('SIGCONT');
          p.child.kill('SIGKILL');
        }
      }

      // --- the history
      const enq = await ask<{ key: string; seq: number; job_id: string }>(
        'select key, seq, job_id::text as job_id from enqueued order by key, seq',
      );
      const eff = await ask<{ key: string; seq: number; job_id: string; pos: number; fence: string; ghost: boolean }>(
        'select key, seq, job_id::text as job_id, pos, fence::text as fence, ghost from effects order by key, pos',
      );
      const byKey = <T extends { key: string }>(rows: T[]) => {
        const m = new Map<string, T[]>();
        for (const r of rows) {
          const list = m.get(r.key) ?? [];
          list.push(r);
          m.set(r.key, list);
        }
        return m;
      };
      const enqByKey = byKey(enq);
      const effByKey = byKey(eff);
      const committedIds = new Set(enq.map((r) => r.job_id));
      const violations: string[] = [];
      const note = (s: string) => {
        if (violations.length < 50) violations.push(s);
      };
      // the producers: every key's seqs 1..PER_KEY committed once, ids in seq order, all acknowledged
      for (const [key, rows] of enqByKey) {
        rows.forEach((r, i) => {
          if (r.seq !== i + 1) note(`enqueued ${key}: seq ${r.seq} at ${i + 1}`);
          if (i > 0 && BigInt(r.job_id) <= BigInt(rows[i - 1]!.job_id))
            note(`enqueued ${key}: job ${r.job_id} after ${rows[i - 1]!.job_id}`);
        });
      }
      const acked = new Map<string, number>();
      for (const p of producers) {
        const done = p.events.find((e) => e.ev === 'done');
        for (const [key, seq] of Object.entries((done?.acked ?? {}) as Record<string, number>)) acked.set(key, seq);
      }
      for (const [key, seq] of acked)
        if ((enqByKey.get(key)?.length ?? 0) < seq) note(`acknowledged ${key} seq ${seq}, committed ${enqByKey.get(key)?.length ?? 0}`);
      // the effects: each committed job's once, in seq (= job id = enqueue) order per key, with a
      // fence that never goes back; none of a rolled-back enqueue
      for (const r of eff) {
        if (r.ghost) note(`effect of a rolled-back enqueue: job ${r.job_id} (${r.key})`);
        else if (!committedIds.has(r.job_id)) note(`effect of a job never committed: ${r.job_id} (${r.key})`);
      }
      for (const [key, rows] of enqByKey) {
        const got = (effByKey.get(key) ?? []).filter((r) => !r.ghost);
        if (got.length !== rows.length) note(`${key}: ${got.length} effects for ${rows.length} jobs`);
        got.forEach((r, i) => {
          const want = rows[i];
          if (!want || r.job_id !== want.job_id || r.seq !== want.seq)
            note(`${key}: effect ${i + 1} is job ${r.job_id} seq ${r.seq}, expected job ${want?.job_id} seq ${want?.seq}`);
          if (i > 0 && BigInt(r.fence) < BigInt(got[i - 1]!.fence)) note(`${key}: fence ${r.fence} after ${got[i - 1]!.fence}`);
        });
      }
      const left = {
        jobs: await count('pgcoord.queue_jobs'),
        keys: await count('pgcoord.queue_keys'),
        order: await count('pgcoord.queue_order'),
        stats: await queueStats(pool, QUEUE),
      };

      // --- what the processes saw
      const workerProcs = procs.filter((p) => p.kind === 'worker');
      const events = workerProcs.flatMap((p) => p.events);
      const lastStats = (p: Proc) =>
        [...p.events].reverse().find((e) => e.ev === 'done' || e.ev === 'stats') as Record<string, number> | undefined;
      const sum = (f: string) => workerProcs.reduce((n, p) => n + Number(lastStats(p)?.[f] ?? 0), 0);
      const refused = events.filter((e) => e.ev === 'refused');
      const countBy = (evs: Ev[], f: (e: Ev) => string) =>
        evs.reduce<Record<string, number>>((by, e) => {
          by[f(e)] = (by[f(e)] ?? 0) + 1;
          return by;
        }, {});
      const producerDone = producers.map((p) => (p.events.find((e) => e.ev === 'done') ?? {}) as Record<string, unknown>);
      const trapRefused = traps.map((t) =>
        t.after.some((e) => e.ev === 'refused' && e.what === 'complete' && e.key === t.key && e.fence === t.fence),
      );
      const summary = {
        jobs: TOTAL,
        keys: KEYS,
        committed: enq.length,
        effects: eff.length,
        runs: sum('runs'),
        reruns: sum('reruns'),
        dupEffects: events.filter((e) => e.ev === 'dup').length,
        injectedFailures: sum('injected'),
        refused: {
          completions: refused.filter((e) => e.what === 'complete').length,
          failReports: refused.filter((e) => e.what === 'fail').length,
          fencedWrites: countBy(
            refused.filter((e) => e.what === 'fence'),
            (e) => String(e.by),
          ),
        },
        faults: { ...faults, workerProcesses: workerProcs.length },
        traps: {
          sprung: traps.length,
          takenOver: traps.filter((t) => t.takenOver).length,
          lateCompletionRefused: trapRefused.filter(Boolean).length,
          takeoverMs: { max: Math.max(0, ...traps.filter((t) => t.takenOver).map((t) => t.waitedMs)) },
        },
        errors: countBy(
          events.filter((e) => e.ev === 'error'),
          (e) => `${e.where}:${e.code}`,
        ),
        producers: producerDone.map((d) => ({
          acked: d.acked ? Object.values(d.acked as object).reduce((a: number, b: number) => a + b, 0) : 0,
          unknown: d.unknown,
          resolvedCommitted: d.resolvedCommitted,
          ghosts: d.ghosts,
          errors: d.errors,
        })),
        left: { jobs: left.jobs, keys: left.keys, order: left.order },
        durationMs: Date.now() - began,
        ...timing,
        jobsPerSecond: Math.round(TOTAL / ((timing.chaosMs + timing.drainMs) / 1000)),
      };
      console.log('queue chaos:', JSON.stringify(summary));

      expect(violations).toEqual([]);
      expect(enq.length).toBe(TOTAL); // every producer got every enqueue committed
      expect([...acked.values()].reduce((a, b) => a + b, 0)).toBe(TOTAL);
      expect(eff.length).toBe(TOTAL);
      // drained: no job, key or order row left; no dead job
      expect(left).toEqual({ jobs: 0, keys: 0, order: 0, stats: [] });
      // the faults happened, and stale holders were refused by the database
      expect(faults.killed).toBeGreaterThan(0);
      expect(faults.paused).toBeGreaterThan(0);
      expect(faults.terminated).toBeGreaterThan(0);
      expect(faults.restartMs).toBeGreaterThan(0);
      expect(summary.injectedFailures).toBeGreaterThan(0);
      // every trap whose key was taken over: the trapped worker's late completion was refused
      expect(traps.filter((t, i) => t.takenOver && !trapRefused[i]).map((t) => JSON.stringify(t))).toEqual([]);
      expect(traps.filter((t) => t.takenOver).length).toBeGreaterThan(0);
      expect(summary.dupEffects).toBeGreaterThan(0);
    },
    Math.max(300_000, TOTAL * 30),
  );
});
