// The rate limiter beside its anchor, in one run on the same PostgreSQL and the same pg Pool:
// pgcoord's limit() (GCRA, one statement, database clock) and rate-limiter-flexible's
// RateLimiterPostgres (a fixed window from the client's Date.now(), one upsert).
//
// 1. Decisions per second, 16 clients, at one hot key and over 10 000 keys (a quota nobody
//    reaches: every decision is an allow, so both do the same work per request).
// 2. Over-quota under client clock skew: two instances (one with its clock 1.5 s ahead) hammer one
//    key with a quota of 20 per 2 s for 6 s; every allowed call is stamped on arrival, and a call is
//    over quota when more than 20 were allowed in the 2 s before it (a sliding window).
//
// Run alone: `npx tsx bench/limits.ts` (DATABASE_URL, else the local PostgreSQL 15).

import { pathToFileURL } from 'node:url';
import pg from 'pg';
import { RateLimiterPostgres } from 'rate-limiter-flexible';
import { limit, migrateLimits } from '../src/index.js';

export interface LimitBench {
  clients: number;
  decisionsPerSecond: { hotKey: { pgcoord: number; rlf: number }; keys10k: { pgcoord: number; rlf: number } };
  skew: { quota: number; windowMs: number; pgcoord: { allowed: number; overQuota: number }; rlf: { allowed: number; overQuota: number } };
}

type Decide = (key: string) => Promise<boolean>;

async function throughput(decide: Decide, keys: number, clients: number, ms: number): Promise<number> {
  let done = 0;
  const until = performance.now() + ms;
  await Promise.all(
    Array.from({ length: clients }, async (_, c) => {
      for (let i = c; performance.now() < until; i += clients) {
        await decide(`k${i % keys}`);
        done++;
      }
    }),
  );
  return Math.round((done * 1000) / ms);
}

// Calls allowed while more than `quota` were allowed in the `windowMs` before them.
function overQuota(times: number[], quota: number, windowMs: number): number {
  times.sort((a, b) => a - b);
  let over = 0;
  for (let i = 0, j = 0; i < times.length; i++) {
    while ((times[i] as number) - (times[j] as number) >= windowMs) j++;
    if (i - j + 1 > quota) over++;
  }
  return over;
}

async function skewed(decide: (key: string, instance: number) => Promise<boolean>, ms: number): Promise<number[]> {
  const allowed: number[] = [];
  const until = performance.now() + ms;
  await Promise.all(
    [0, 1].map(async (instance) => {
      while (performance.now() < until) {
        if (await decide('skewed', instance)) allowed.push(performance.now());
        else await new Promise((r) => setTimeout(r, 5));
      }
    }),
  );
  return allowed;
}

export async function runLimitBench(url: string, opts: { seconds?: number; clients?: number } = {}): Promise<LimitBench> {
  const clients = opts.clients ?? 16;
  const ms = (opts.seconds ?? 2) * 1000;
  const pool = new pg.Pool({ connectionString: url, max: clients });
  try {
    await migrateLimits(pool);
    await pool.query('drop table if exists rlf_bench; truncate pgcoord.rate_limits');
    const rlfOf = (points: number, duration: number, table: string) =>
      new Promise<RateLimiterPostgres>((resolve, reject) => {
        const rl: RateLimiterPostgres = new RateLimiterPostgres(
          { storeClient: pool, points, duration, tableName: table, clearExpiredByTimeout: false },
          (err?: unknown) => (err ? reject(err) : resolve(rl)),
        );
      });
    const big = { rate: 1_000_000, per: 1000, burst: 1_000_000 };
    const rlfBig = await rlfOf(1_000_000_000, 60, 'rlf_bench');
    const pgcoordDecide: Decide = async (key) => (await limit(pool, key, big)).allowed;
    const rlfDecide: Decide = (key) =>
      rlfBig.consume(key).then(
        () => true,
        () => false,
      );
    // warm both (prepared statements, the first rows)
    await throughput(pgcoordDecide, 10_000, clients, 300);
    await throughput(rlfDecide, 10_000, clients, 300);
    const hotKey = { pgcoord: await throughput(pgcoordDecide, 1, clients, ms), rlf: await throughput(rlfDecide, 1, clients, ms) };
    const keys10k = {
      pgcoord: await throughput(pgcoordDecide, 10_000, clients, ms),
      rlf: await throughput(rlfDecide, 10_000, clients, ms),
    };

    // Skew: instance 1's clock runs 1.5 s ahead. rate-limiter-flexible reads Date.now() per call;
    // pgcoord reads no client clock at all.
    const quota = 20;
    const windowMs = 2000;
    const rlfSkew = await rlfOf(quota, windowMs / 1000, 'rlf_bench_skew');
    const realNow = Date.now;
    const rlfTimes = await skewed(async (key, instance) => {
      Date.now = instance === 1 ? () => realNow() + 1500 : realNow;
      try {
        const p = rlfSkew.consume(key);
        Date.now = realNow;
        await p;
        return true;
      } catch {
        return false;
      } finally {
        Date.now = realNow;
      }
    }, 6000);
    const pgTimes = await skewed(async (key) => (await limit(pool, key, { rate: quota, per: windowMs })).allowed, 6000);
    return {
      clients,
      decisionsPerSecond: { hotKey, keys10k },
      skew: {
        quota,
        windowMs,
        pgcoord: { allowed: pgTimes.length, overQuota: overQuota(pgTimes, quota, windowMs) },
        rlf: { allowed: rlfTimes.length, overQuota: overQuota(rlfTimes, quota, windowMs) },
      },
    };
  } finally {
    await pool.query('drop table if exists rlf_bench; drop table if exists rlf_bench_skew').catch(() => {});
    await pool.end();
  }
}

/** Lines for the terminal. */
export function formatLimitBench(r: LimitBench): string {
  const ratio = (a: number, b: number) => (b > 0 ? `${(a / b).toFixed(2)}×` : 'n/a');
  const { hotKey, keys10k } = r.decisionsPerSecond;
  return [
    `rate limiter, ${r.clients} clients (decisions/s): pgcoord limit() vs rate-limiter-flexible RateLimiterPostgres`,
    `  1 hot key     ${hotKey.pgcoord} vs ${hotKey.rlf}  (${ratio(hotKey.pgcoord, hotKey.rlf)})`,
    `  10 000 keys   ${keys10k.pgcoord} vs ${keys10k.rlf}  (${ratio(keys10k.pgcoord, keys10k.rlf)})`,
    `  client clock 1.5 s ahead on one of two instances, quota ${r.skew.quota} per ${r.skew.windowMs} ms, 6 s:`,
    `    pgcoord: ${r.skew.pgcoord.allowed} allowed, ${r.skew.pgcoord.overQuota} over quota; rate-limiter-flexible: ${r.skew.rlf.allowed} allowed, ${r.skew.rlf.overQuota} over quota`,
  ].join('\n');
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const r = await runLimitBench(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test');
  console.log(formatLimitBench(r));
}
