// The lease micro-benchmark: what a pgcoord lease costs beside the Redis lock it replaces, and how
// fast leadership moves.
//
//   (a) acquire + release per second, `clients` concurrent loops, each on a lease name of its own
//       and all on one hot name (a try loop: a try that finds the name held counts as a try, not
//       an operation), beside the Redis lock doing the same (SET NX PX, then the Lua
//       compare-and-delete of bench/strategies/redis.ts) in the same run, rounds alternating
//       between the two; the median round's ops/s and pgcoord/Redis of the medians. A release
//       that finds its term or lock gone, and a fence going backwards, are counted (never expected).
//   (b) round trips of each lease operation, one at a time on a one-connection pool whose socket
//       writes are counted (bench/db.ts): acquire, a try on a held name, renew, release (1 each by
//       design) and a withFence transaction of one statement.
//   (c) leader failover: two leader() campaigns on one name, each on its own pool as in two
//       processes. By resign: from the leader's stop() (release + NOTIFY) to the follower's
//       onLead. By expiry: the leader runs in a child process that is SIGKILLed (no release, no
//       renewal, its connections just drop); from the kill to the follower's onLead, with how much
//       of the dead leader's term was left at the kill and how long after its expiry the follower
//       took over (both on the database clock).
//
// Speed figures are reported, never asserted.
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import type { Redis } from 'ioredis';
import postgres from 'postgres';
import { leader } from '../src/lease/leader.js';
import { acquireLease, type Lease, tryAcquireLease, withFence } from '../src/lease/lease.js';
import { countedSql, openConnections } from './db.js';
import { COMPARE_AND_DELETE } from './strategies/redis.js';

/** argv[2] of the process that plays the leader killed in the failover-by-expiry measure (see run.ts). */
export const LEASE_CHILD = '--lease-child';

/** How long a held name is held for in the throughput loops: far longer than one hold. */
const HOLD_TTL_MS = 10_000;

/** One implementation in one throughput case. */
export interface LeaseThroughput {
  case: 'own names' | 'one hot name';
  impl: 'pgcoord' | 'redis';
  label: string;
  clients: number;
  /** Acquire + release pairs per second of each round, in run order. */
  perRound: number[];
  /** Median of `perRound`. */
  opsPerSec: number;
  /** Tries (acquire statements or SET NX) per successful acquire: 1 on own names; more on the hot name. */
  triesPerOp: number;
  /** Postgres round trips (counted socket writes) or Redis commands per acquire + release, tries included. */
  roundTripsPerOp: number;
  /** pgcoord only: a fence not greater than the one seen before on that name (must be 0). */
  fenceRegressions?: number;
  /** Releases that found the term or lock no longer ours (release() false, compare-and-delete 0): must be 0. */
  lostAtRelease: number;
  errors: Record<string, number>;
}

/** Round trips of each lease operation on its own (a mean over `samples`; 1 by design for the first four). */
export interface LeaseRoundTrips {
  samples: number;
  acquire: number;
  /** A try on a name someone else holds (tryAcquireLease resolving undefined). */
  busyTry: number;
  renew: number;
  release: number;
  /** withFence with one statement inside (the check pipelined with BEGIN, the statement, COMMIT). */
  fencedOneStatement: number;
}

/** One failover measure. */
export interface FailoverSample {
  /** From stop() (resign) or SIGKILL (expiry) to the follower's onLead, local monotonic clock. */
  ms: number;
  /** Resign: how long the leader's stop() took to resolve. */
  stopMs?: number;
  /** Expiry: how much of the dead leader's term was left at the kill (database clock). */
  termLeftMs?: number;
  /** Expiry: the follower's new term started this long after the dead leader's term ended (database clock). */
  afterExpiryMs?: number;
}

/** A failover kind's samples and their summary. */
export interface Failover {
  ttlMs: number;
  samples: FailoverSample[];
  medianMs: number;
  minMs: number;
  maxMs: number;
  errors: string[];
}

/** Everything the lease micro-benchmark measured. */
export interface LeaseBench {
  /** How long the whole micro-benchmark took. */
  seconds: number;
  clients: number;
  rounds: number;
  secondsPerRound: number;
  throughput: LeaseThroughput[];
  /** pgcoord / Redis of the median ops/s, per case (only when Redis answered). */
  ratios: { case: LeaseThroughput['case']; value: number }[];
  roundTrips: LeaseRoundTrips;
  failover: { resign: Failover; expiry: Failover };
  notes: string[];
}

/** The knobs of one run of the lease micro-benchmark. */
export interface LeaseBenchOptions {
  /** The run's database (lease tables migrated). */
  url: string;
  /** A connection to it, for the failover measure's look at the lease row. */
  admin: postgres.Sql;
  redis?: Redis;
  clients: number;
  rounds: number;
  secondsPerRound: number;
  /** TTL of the failover campaigns. */
  failoverTtlMs: number;
  resignSamples: number;
  expirySamples: number;
  /** Called as each part starts, for the progress bar. */
  onStep?: (task: string) => void;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const noop = () => {};

function median(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function errorKey(err: unknown): string {
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'string' && code) return code;
  return err instanceof Error ? err.constructor.name : 'unknown';
}

/** Reject with `what` when `p` has not settled within `ms`: a hang is reported, not waited out. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------- (a) throughput

interface Tally {
  ops: number;
  tries: number;
  fenceRegressions: number;
  lostAtRelease: number;
  errors: Record<string, number>;
}

const tally = (): Tally => ({ ops: 0, tries: 0, fenceRegressions: 0, lostAtRelease: 0, errors: {} });

/** One try: true when it acquired and released. */
type Try = (client: number, t: Tally) => Promise<boolean>;

/** `clients` loops of `attempt` until `ms` have passed. */
async function loops(clients: number, ms: number, attempt: Try, t: Tally): Promise<number> {
  const t0 = performance.now();
  const deadline = t0 + ms;
  await Promise.all(
    Array.from({ length: clients }, async (_, i) => {
      while (performance.now() < deadline) {
        t.tries++;
        try {
          if (await attempt(i, t)) t.ops++;
        } catch (err) {
          const k = errorKey(err);
          t.errors[k] = (t.errors[k] ?? 0) + 1;
          await sleep(1); // an error that repeats at once must not spin
        }
      }
    }),
  );
  return (performance.now() - t0) / 1000;
}

function pgcoordTry(sql: postgres.Sql, nameOf: (client: number) => string, fences: Map<string, bigint>): Try {
  return async (client, t) => {
    const name = nameOf(client);
    const lease = await tryAcquireLease(sql, name, { ttlMs: HOLD_TTL_MS });
    if (!lease) return false;
    // a holder's release is sent only after its acquire was seen here, and the next acquire of the
    // name commits only after that release: the fences seen here must grow
    if (lease.fence <= (fences.get(name) ?? 0n)) t.fenceRegressions++;
    fences.set(name, lease.fence);
    if (!(await lease.release())) t.lostAtRelease++;
    return true;
  };
}

function redisTry(redis: Redis, nameOf: (client: number) => string): Try {
  return async (client, t) => {
    const key = `pgcoord-bench:${nameOf(client)}`;
    const token = randomUUID();
    if ((await redis.set(key, token, 'PX', HOLD_TTL_MS, 'NX')) !== 'OK') return false;
    if ((await redis.eval(COMPARE_AND_DELETE, 1, key, token)) !== 1) t.lostAtRelease++;
    return true;
  };
}

async function throughput(opts: LeaseBenchOptions): Promise<{ rows: LeaseThroughput[]; notes: string[] }> {
  const { clients, redis } = opts;
  const ms = opts.secondsPerRound * 1000;
  const pool = countedSql(opts.url, clients);
  const notes: string[] = [];
  try {
    await openConnections(pool.sql, clients);
    const cases = [
      { case: 'own names' as const, nameOf: (i: number) => `bench:lease:own:${i}` },
      { case: 'one hot name' as const, nameOf: () => 'bench:lease:hot' },
    ];
    const rows: LeaseThroughput[] = [];
    for (const c of cases) {
      const impls = [
        {
          impl: 'pgcoord' as const,
          label: 'pgcoord tryAcquireLease + release',
          make: (fences: Map<string, bigint>) => pgcoordTry(pool.sql, c.nameOf, fences),
        },
        ...(redis
          ? [
              {
                impl: 'redis' as const,
                label: 'Redis SET NX PX + compare-and-delete',
                make: () => redisTry(redis, c.nameOf),
              },
            ]
          : []),
      ];
      const runs = impls.map((i) => ({ ...i, fences: new Map<string, bigint>(), t: tally(), perRound: [] as number[], trips: 0 }));
      // warm-up: prepared statements, code paths, the Lua script cached by Redis
      for (const r of runs) await loops(clients, Math.min(200, ms), r.make(r.fences), tally());
      for (let round = 0; round < opts.rounds; round++) {
        // alternate which goes first, so a drift of the machine does not favour one side
        const order = round % 2 ? [...runs].reverse() : runs;
        for (const r of order) {
          opts.onStep?.(`leases: ${c.case}, ${r.impl}, round ${round + 1}/${opts.rounds}`);
          const before = { ops: r.t.ops, trips: pool.trips.count };
          const s = await loops(clients, ms, r.make(r.fences), r.t);
          r.trips += pool.trips.count - before.trips;
          r.perRound.push((r.t.ops - before.ops) / s);
        }
      }
      for (const r of runs) {
        const ops = Math.max(1, r.t.ops);
        rows.push({
          case: c.case,
          impl: r.impl,
          label: r.label,
          clients,
          perRound: r.perRound,
          opsPerSec: median(r.perRound),
          triesPerOp: r.t.tries / ops,
          // Redis: one SET NX per try and one EVAL per release
          roundTripsPerOp: r.impl === 'pgcoord' ? r.trips / ops : (r.t.tries + r.t.ops) / ops,
          ...(r.impl === 'pgcoord' ? { fenceRegressions: r.t.fenceRegressions } : {}),
          lostAtRelease: r.t.lostAtRelease,
          errors: r.t.errors,
        });
      }
    }
    if (!redis) notes.push('lease throughput: Redis did not answer, pgcoord only (no ratio)');
    else
      notes.push(
        `lease throughput: pgcoord on a pool of ${clients} connections, Redis on one ioredis connection (commands multiplexed), as each is used`,
      );
    return { rows, notes };
  } finally {
    await pool.sql.end({ timeout: 1 });
  }
}

// ---------------------------------------------------------------- (b) round trips

async function roundTrips(url: string, samples: number): Promise<LeaseRoundTrips> {
  const { sql, trips } = countedSql(url, 1);
  const other = postgres(url, { max: 1, onnotice: noop });
  const name = 'bench:lease:rt';
  const busy = 'bench:lease:rt:busy';
  const opts = { ttlMs: HOLD_TTL_MS, renewEveryMs: false as const };
  const sum = { acquire: 0, busyTry: 0, renew: 0, release: 0, fencedOneStatement: 0 };
  try {
    await openConnections(sql, 1);
    const held = await acquireLease(other, busy, opts);
    try {
      const count = async (what: keyof typeof sum | undefined, f: () => Promise<unknown>) => {
        trips.count = 0;
        const r = await f();
        if (what) sum[what] += trips.count;
        return r;
      };
      // two unrecorded passes first: prepared statements, and the connection's first use by pgcoord
      for (let i = -2; i < samples; i++) {
        const k = (w: keyof typeof sum) => (i < 0 ? undefined : w);
        const lease = (await count(k('acquire'), () => acquireLease(sql, name, opts))) as Lease;
        await count(k('busyTry'), () => tryAcquireLease(sql, busy, opts));
        await count(k('renew'), () => lease.renew());
        await count(k('fencedOneStatement'), () => withFence(sql, lease, (tx: postgres.TransactionSql) => tx.unsafe('select 1')));
        await count(k('release'), () => lease.release());
      }
    } finally {
      await held.release().catch(noop);
    }
  } finally {
    await sql.end({ timeout: 1 });
    await other.end({ timeout: 1 });
  }
  const n = Math.max(1, samples);
  return {
    samples,
    acquire: sum.acquire / n,
    busyTry: sum.busyTry / n,
    renew: sum.renew / n,
    release: sum.release / n,
    fencedOneStatement: sum.fencedOneStatement / n,
  };
}

// ---------------------------------------------------------------- (c) failover

const FOLLOWER = 'pgcoord-bench-follower';

/**
 * Wait until the follower waits: its LISTEN connection is up, then a moment for its look after
 * listening (a release before that look is seen by it; one during it may not be woken for).
 */
async function followerWaiting(admin: postgres.Sql): Promise<void> {
  const until = performance.now() + 10_000;
  for (;;) {
    const [r] = await admin.unsafe<{ n: number }[]>(
      "select count(*)::int as n from pg_stat_activity where application_name = $1 and query ilike 'listen%'",
      [FOLLOWER],
    );
    if ((r?.n ?? 0) > 0) break;
    if (performance.now() > until) throw new Error('the follower never started listening');
    await sleep(10);
  }
  await sleep(200);
}

/** A follower campaign on its own pool; `led` resolves with the time of its first onLead. */
function follower(url: string, name: string, ttlMs: number) {
  const sql = postgres(url, { max: 2, onnotice: noop, connection: { application_name: FOLLOWER } });
  let resolve: (t: number) => void = noop;
  const led = new Promise<number>((r) => {
    resolve = r;
  });
  const campaign = leader(sql, name, { ttlMs, holder: 'bench follower' }, () => resolve(performance.now()));
  return {
    led,
    async stop() {
      await campaign.stop().catch(noop);
      await sql.end({ timeout: 1 });
    },
  };
}

async function resignSample(opts: LeaseBenchOptions, name: string): Promise<FailoverSample> {
  const ttlMs = opts.failoverTtlMs;
  const sql = postgres(opts.url, { max: 2, onnotice: noop });
  let leading: () => void = noop;
  const leads = new Promise<void>((r) => {
    leading = r;
  });
  const first = leader(sql, name, { ttlMs, holder: 'bench leader' }, () => leading());
  let second: ReturnType<typeof follower> | undefined;
  try {
    await within(leads, 10_000, 'the first leader');
    second = follower(opts.url, name, ttlMs);
    await followerWaiting(opts.admin);
    const t0 = performance.now();
    await first.stop();
    const stopMs = performance.now() - t0;
    const t1 = await within(second.led, 3 * ttlMs + 10_000, 'the follower after the resign');
    return { ms: t1 - t0, stopMs };
  } finally {
    await first.stop().catch(noop);
    await second?.stop();
    await sql.end({ timeout: 1 });
  }
}

/** The child: campaign for `name` and say when leading; live until killed or the parent goes. */
export async function leaseChild(config: string): Promise<number> {
  const { url, name, ttlMs } = JSON.parse(config) as { url: string; name: string; ttlMs: number };
  process.stdin.on('end', () => process.exit(0)); // the parent went away
  process.stdin.resume();
  const sql = postgres(url, { max: 2, onnotice: noop });
  leader(sql, name, { ttlMs, holder: `bench doomed leader ${process.pid}` }, (lease) => {
    process.stdout.write(`${JSON.stringify({ ev: 'lead', fence: String(lease.fence) })}\n`);
  });
  return new Promise<number>(() => {});
}

async function expirySample(opts: LeaseBenchOptions, name: string): Promise<FailoverSample> {
  const ttlMs = opts.failoverTtlMs;
  // this very script again (compiled bundle or tsx), as the child
  const child: ChildProcess = spawn(
    process.execPath,
    [...process.execArgv, process.argv[1]!, LEASE_CHILD, JSON.stringify({ url: opts.url, name, ttlMs })],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let second: ReturnType<typeof follower> | undefined;
  try {
    // the fence of the child's current term (it says so at each term it starts)
    let fence = '';
    await within(
      new Promise<void>((resolve, reject) => {
        child.once('exit', (code, signal) => reject(new Error(`the leader process exited (${code ?? signal}) before leading`)));
        createInterface({ input: child.stdout! }).on('line', (line) => {
          try {
            const ev = JSON.parse(line) as { ev?: string; fence?: string };
            if (ev.ev === 'lead' && ev.fence) {
              fence = ev.fence;
              resolve();
            }
          } catch {
            // not ours
          }
        });
      }),
      30_000,
      'the leader process',
    );
    second = follower(opts.url, name, ttlMs);
    await followerWaiting(opts.admin);
    const t0 = performance.now();
    child.kill('SIGKILL');
    // a renewal the child sent just before it died may still commit: look at the row a moment later
    await sleep(50);
    const [old] = await opts.admin.unsafe<{ fence: string; expires: string; left: number }[]>(
      `select fence::text as fence, expires_at::text as expires,
              (extract(epoch from expires_at - clock_timestamp()) * 1000)::float8 + 50 as left
         from pgcoord.leases where name = $1`,
      [name],
    );
    const t1 = await within(second.led, 3 * ttlMs + 10_000, 'the follower after the kill');
    const sample: FailoverSample = { ms: t1 - t0 };
    if (old && old.fence === fence) {
      const [now] = await opts.admin.unsafe<{ late: number }[]>(
        'select (extract(epoch from acquired_at - $2::timestamptz) * 1000)::float8 as late from pgcoord.leases where name = $1',
        [name, old.expires],
      );
      sample.termLeftMs = old.left;
      if (now) sample.afterExpiryMs = now.late;
    }
    return sample;
  } finally {
    child.kill('SIGKILL');
    await exited;
    await second?.stop();
  }
}

async function failover(
  opts: LeaseBenchOptions,
  kind: 'resign' | 'expiry',
  samples: number,
  one: (o: LeaseBenchOptions, name: string) => Promise<FailoverSample>,
): Promise<Failover> {
  const got: FailoverSample[] = [];
  const errors: string[] = [];
  for (let i = 0; i < samples; i++) {
    opts.onStep?.(`leases: failover by ${kind} ${i + 1}/${samples}`);
    try {
      got.push(await one(opts, `bench:leader:${kind}:${i}`));
    } catch (err) {
      errors.push(err instanceof Error ? err.message : String(err));
    }
  }
  const ms = got.map((s) => s.ms);
  return {
    ttlMs: opts.failoverTtlMs,
    samples: got,
    medianMs: median(ms),
    minMs: ms.length ? Math.min(...ms) : Number.NaN,
    maxMs: ms.length ? Math.max(...ms) : Number.NaN,
    errors,
  };
}

/** Run the lease micro-benchmark. The lease tables must exist (migrateLeases). */
export async function leaseBench(opts: LeaseBenchOptions): Promise<LeaseBench> {
  const started = performance.now();
  opts.onStep?.('leases: throughput');
  const { rows, notes } = await throughput(opts);
  opts.onStep?.('leases: round trips');
  const trips = await roundTrips(opts.url, 10);
  const resign = await failover(opts, 'resign', opts.resignSamples, resignSample);
  const expiry = await failover(opts, 'expiry', opts.expirySamples, expirySample);
  const ratios: LeaseBench['ratios'] = [];
  for (const c of ['own names', 'one hot name'] as const) {
    const p = rows.find((r) => r.case === c && r.impl === 'pgcoord');
    const r = rows.find((x) => x.case === c && x.impl === 'redis');
    if (p && r && r.opsPerSec > 0) ratios.push({ case: c, value: p.opsPerSec / r.opsPerSec });
  }
  for (const [k, f] of [
    ['resign', resign],
    ['expiry', expiry],
  ] as const)
    if (f.errors.length) notes.push(`failover by ${k}: ${f.errors.length} sample(s) failed: ${f.errors.join('; ')}`);
  return {
    seconds: (performance.now() - started) / 1000,
    clients: opts.clients,
    rounds: opts.rounds,
    secondsPerRound: opts.secondsPerRound,
    throughput: rows,
    ratios,
    roundTrips: trips,
    failover: { resign, expiry },
    notes,
  };
}

// ---------------------------------------------------------------- reports

const fmt = (n: number | undefined, d = 0) => (n !== undefined && Number.isFinite(n) ? n.toFixed(d) : '-');

/** A titled table of the report, as the terminal and the HTML report render it. */
export interface LeaseTable {
  title: string;
  header: string[];
  rows: string[][];
}

/** The lease micro-benchmark's tables, for the terminal and HTML reports. */
export function leaseTables(l: LeaseBench): LeaseTable[] {
  const ratio = (c: LeaseThroughput['case'], impl: LeaseThroughput['impl']) => {
    const r = l.ratios.find((x) => x.case === c);
    return impl === 'pgcoord' && r ? `${fmt(r.value, 2)}×` : '';
  };
  const errors = (e: Record<string, number>) =>
    Object.entries(e)
      .map(([k, v]) => `${k}:${v}`)
      .join(' ') || '-';
  const t = l.roundTrips;
  const summary = (f: Failover) => (f.samples.length ? `${fmt(f.medianMs, 1)} (${fmt(f.minMs, 1)}–${fmt(f.maxMs, 1)})` : '-');
  const mean = (xs: (number | undefined)[]) => {
    const v = xs.filter((x): x is number => x !== undefined && Number.isFinite(x));
    return v.length ? v.reduce((a, b) => a + b, 0) / v.length : Number.NaN;
  };
  const { resign, expiry } = l.failover;
  return [
    {
      title: `lease acquire + release, ${l.clients} clients, median of ${l.rounds} round(s) of ${l.secondsPerRound} s, pgcoord and Redis alternating in the same run`,
      header: [
        'case',
        'lock',
        'acquire+release/s',
        'pgcoord / Redis',
        'tries/op',
        'RT/op',
        'lost at release',
        'fence regressions',
        'errors',
      ],
      rows: l.throughput.map((r) => [
        r.case,
        r.label,
        fmt(r.opsPerSec),
        ratio(r.case, r.impl),
        fmt(r.triesPerOp, 2),
        `${fmt(r.roundTripsPerOp, 2)}${r.impl === 'redis' ? 'R' : ''}`,
        String(r.lostAtRelease),
        r.fenceRegressions === undefined ? 'n/a' : String(r.fenceRegressions),
        errors(r.errors),
      ]),
    },
    {
      title: `lease round trips per operation, one at a time (mean of ${t.samples})`,
      header: ['acquire', 'try on a held name', 'renew', 'release', 'withFence, one statement'],
      rows: [[fmt(t.acquire, 2), fmt(t.busyTry, 2), fmt(t.renew, 2), fmt(t.release, 2), fmt(t.fencedOneStatement, 2)]],
    },
    {
      title: 'leader failover: two leader() campaigns on one name, each on its own pool',
      header: [
        'how the leader goes',
        'TTL ms',
        'samples',
        'ms to follower onLead: median (min–max)',
        'term left at kill ms',
        'taken over after expiry ms',
      ],
      rows: [
        ['resign: stop() (release + NOTIFY)', String(resign.ttlMs), String(resign.samples.length), summary(resign), '', ''],
        [
          'death: process SIGKILLed, no release (expiry)',
          String(expiry.ttlMs),
          String(expiry.samples.length),
          summary(expiry),
          fmt(mean(expiry.samples.map((s) => s.termLeftMs))),
          fmt(mean(expiry.samples.map((s) => s.afterExpiryMs)), 1),
        ],
      ],
    },
  ];
}
