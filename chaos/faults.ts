// The faults of a chaos run, on a seeded schedule: every few hundred ms one of terminate a few of
// the workers' backends, drop every proxied connection, cut one at a protocol moment (COMMIT's
// answer lost, COMMIT never sent, a statement's answer lost), or stall the network for a moment;
// besides, one worker at a time paused (SIGSTOP) while it holds something (a transaction open on
// the server: an advisory or row lock, a fenced write; or a lease) for longer than the lock and
// lease timeouts, a worker killed (SIGKILL) and respawned now and then, and one immediate restart
// of PostgreSQL (crash recovery) midway when the run owns its server. While a worker is paused,
// nothing else releases what it holds: its backends are spared terminations, and neither a drop
// of every connection nor the restart happens.

import type pg from 'pg';
import type { CutProxy, CutRule } from '../test/fixtures/cut-proxy.js';

/** What the injector needs of the workers. */
export interface Workers {
  /** The workers running (not exiting): pid, and the application_name of their connections. */
  live(): { pid: number; app: string }[];
  /** SIGKILL the worker and start another in its slot. */
  killAndRespawn(pid: number): Promise<void>;
}

export interface FaultPlan {
  seconds: number;
  random: () => number;
  proxy: CutProxy;
  admin: pg.Pool;
  workers: Workers;
  /** Present when the run owns its server. */
  restart?: () => Promise<void>;
  /** How long a pause lasts at least (longer than the lock and lease timeouts). */
  pauseMs: number;
  log: (line: string) => void;
}

/** Faults that happened, by kind (a cut is counted when the proxy did cut). */
export type FaultCounts = Record<string, number>;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const COMMIT = /^\s*commit\b/i;
const WRITE = /^\s*(update|insert|with)\b/i;

/** Run the schedule for `seconds`; resolves with the counts once every fault has ended. */
export async function injectFaults(plan: FaultPlan): Promise<FaultCounts> {
  const { random, proxy, admin, workers, log } = plan;
  const counts: FaultCounts = {};
  const count = (kind: string, by = 1) => {
    counts[kind] = (counts[kind] ?? 0) + by;
  };
  const rand = (n: number) => Math.floor(random() * n);
  const ms = plan.seconds * 1000;
  const began = Date.now();
  const elapsed = () => Date.now() - began;

  const paused = new Map<number, string>(); // pid → application_name
  const candidates = () => workers.live().filter((w) => !paused.has(w.pid));

  // A one-shot cut, given up after 500 ms if no message matched.
  const cut = async (kind: string, rule: CutRule) => {
    const hit = await Promise.race([proxy.cutOn(rule).then(() => true), sleep(500).then(() => false)]);
    proxy.disarm();
    if (hit) count(kind);
  };
  const network: [string, () => Promise<unknown>][] = [
    [
      'terminate',
      async () => {
        const { rows } = await admin.query<{ ok: boolean }>(
          `select pg_terminate_backend(pid) as ok from pg_stat_activity
           where application_name like 'chaos-w%' and application_name <> all($2::text[]) order by random() limit $1`,
          [1 + rand(3), [...paused.values()]],
        );
        count('terminate', rows.filter((r) => r.ok).length);
      },
    ],
    ['drop-all', async () => count('drop-all', proxy.dropAll(random() < 0.5 ? 'rst' : 'fin') > 0 ? 1 : 0)],
    ['commit-answer-lost', () => cut('commit-answer-lost', { sql: COMMIT, at: 'after-reply' })],
    ['commit-never-sent', () => cut('commit-never-sent', { sql: COMMIT, at: 'before' })],
    ['statement-answer-lost', () => cut('statement-answer-lost', { sql: WRITE, at: 'after-reply' })],
    ['statement-never-sent', () => cut('statement-never-sent', { sql: WRITE, at: 'before' })],
    [
      'stall',
      async () => {
        proxy.stall();
        await sleep(200 + rand(600));
        proxy.heal();
        count('stall');
      },
    ],
  ];

  // SIGSTOP a worker that holds something, checked once it is stopped (a stopped client changes
  // nothing on the server): a transaction open, or an unexpired lease of its pid. Else SIGCONT.
  const holder = async () => {
    const { rows } = await admin.query<{ app: string }>(
      "select distinct application_name as app from pg_stat_activity where application_name like 'chaos-w%' and state like 'idle in transaction%'",
    );
    const apps = new Set(rows.map((r) => r.app));
    const busy = candidates().filter((w) => apps.has(w.app));
    const victim = busy[rand(busy.length)] ?? candidates()[rand(candidates().length)];
    if (!victim) return undefined;
    process.kill(victim.pid, 'SIGSTOP');
    paused.set(victim.pid, victim.app);
    await sleep(50); // statements already sent finish
    const held = await admin.query<{ n: string }>(
      `select (select count(*) from pg_stat_activity where application_name = $1 and state like 'idle in transaction%')
            + (select count(*) from pgcoord.leases where holder_label like '%:' || $2 and expires_at > clock_timestamp()) as n`,
      [victim.app, String(victim.pid)],
    );
    if (Number(held.rows[0]?.n) > 0) return victim;
    process.kill(victim.pid, 'SIGCONT');
    paused.delete(victim.pid);
    return undefined;
  };
  const background: Promise<void>[] = [];
  let pausing = false;
  let nextPause = 2000 + rand(2000);
  let nextKill = ms / 3 + rand(ms / 6);
  let restarted = !plan.restart;
  const restartAt = ms * (0.4 + random() * 0.2);
  while (elapsed() < ms) {
    await sleep(150 + rand(450));
    const now = elapsed();
    try {
      if (!restarted && now >= restartAt && !pausing) {
        restarted = true;
        const t0 = Date.now();
        await plan.restart!();
        count('restart');
        log(`restart: PostgreSQL back after ${Date.now() - t0} ms`);
        continue;
      }
      if (!pausing && now >= nextPause) {
        const victim = await holder();
        if (victim) {
          pausing = true;
          const pauseMs = plan.pauseMs + rand(plan.pauseMs / 2);
          count('pause');
          background.push(
            sleep(pauseMs).then(() => {
              try {
                process.kill(victim.pid, 'SIGCONT');
              } catch {
                // killed meanwhile
              }
              paused.delete(victim.pid);
              pausing = false;
              nextPause = elapsed() + 2000 + rand(3000);
            }),
          );
        }
      }
      if (now >= nextKill) {
        nextKill = now + ms / 3 + rand(ms / 6);
        const victim = candidates()[rand(candidates().length)];
        if (victim) {
          await workers.killAndRespawn(victim.pid);
          count('kill');
        }
      }
      const [kind, act] = network[rand(network.length)]!;
      if (!(pausing && kind === 'drop-all')) await act();
    } catch (err) {
      // the admin connection met the restart or a terminated backend: the schedule goes on
      log(`fault skipped: ${(err as Error).message}`);
    }
  }
  proxy.disarm();
  proxy.heal();
  await Promise.all(background);
  return counts;
}
