// Profiling aid, not a test and not part of `npm run bench`: two strategies of the benchmark run
// alternately in one process (long runs, many pairs, after warm-up runs of each), printing the
// median of the per-pair throughput ratios and of the client-CPU differences per request. Against
// bench/profile/stub-server.mjs only the client's CPU counts, which is what pgcoord adds. Within
// one invocation an A/A run (a strategy against itself) reads 1.00 within a few percent, but on a
// shared 2-core VM the same comparison swings by tens of µs per request between invocations:
// repeat it and compare medians. Run it compiled, as the benchmark is:
//   node bench/profile/stub-server.mjs &
//   npx esbuild bench/profile/ab.ts --bundle --platform=node --format=esm --packages=external --outfile=bench/.build/ab.mjs
//   node bench/.build/ab.mjs advisory/best advisory/pgcoord
// DATABASE_URL (default: the stub), CLIENTS (16), REQUESTS per run (6000), PAIRS (10), WARM (2),
// GATEWAY_MS (0).
import postgres from 'postgres';
import { strategies } from '../strategies/index.js';
import type { Strategy, StrategyContext } from '../strategies/types.js';
import { Gateway } from '../workload.js';

const env = (name: string, fallback: number) => Number(process.env[name] ?? fallback);
const [aId, bId] = process.argv.slice(2);
const pick = (id: string | undefined): Strategy => {
  const s = strategies.find((x) => x.id === id);
  if (!s) throw new Error(`usage: ab <strategy id> <strategy id>; ids: ${strategies.map((x) => x.id).join(' ')}`);
  return s;
};
const a = pick(aId);
const b = pick(bId);
const clients = env('CLIENTS', 16);
const requests = env('REQUESTS', 6000);
const sql = postgres(process.env.DATABASE_URL ?? 'postgres://stub@127.0.0.1:55432/stub', { max: clients, onnotice: () => {} });
const ctx: StrategyContext = {
  sql,
  gateway: new Gateway(env('GATEWAY_MS', 0)),
  maxAttempts: 100,
  retry: () => {},
  redisTrip: () => {},
};
let seq = 0;

async function run(s: Strategy): Promise<{ perSec: number; cpuUs: number }> {
  let left = requests;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (left-- > 0) {
        const n = seq++;
        await s.refund(ctx, { requestId: `ab-${n}`, orderId: 1 + ((n * 7919) % 10000), amount: 1, duplicate: false });
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  ctx.gateway.reset();
  return { perSec: requests / seconds, cpuUs: (cpu.user + cpu.system) / requests };
}

const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)] ?? Number.NaN;
for (let i = 0; i < env('WARM', 2); i++) {
  await run(a);
  await run(b);
}
const ratios: number[] = [];
const extra: number[] = [];
const base: number[] = [];
for (let i = 0; i < env('PAIRS', 10); i++) {
  const [first, second] = i % 2 ? [b, a] : [a, b];
  const x = await run(first);
  const y = await run(second);
  const [ra, rb] = first === a ? [x, y] : [y, x];
  ratios.push(rb.perSec / ra.perSec);
  extra.push(rb.cpuUs - ra.cpuUs);
  base.push(ra.cpuUs);
}
console.log(
  `${b.id} / ${a.id}: throughput ratio ${median(ratios).toFixed(3)}, client CPU ${median(base).toFixed(0)} µs/request + ${median(extra).toFixed(1)}`,
);
await sql.end({ timeout: 1 });
