// Profiling aid, not a test and not part of `npm run bench`: one strategy, run for WARM then
// REQUESTS requests against bench/profile/stub-server.mjs, meant to be run under
// `valgrind --tool=callgrind`, whose instruction count is repeatable where a timer is not (see
// bench/profile/icount.sh, which runs it at two request counts and prints the difference per request).
import postgres from 'postgres';
import { strategies } from '../strategies/index.js';
import type { StrategyContext } from '../strategies/types.js';
import { Gateway } from '../workload.js';

const env = (name: string, fallback: number) => Number(process.env[name] ?? fallback);
const id = process.argv[2];
const s = strategies.find((x) => x.id === id);
if (!s) throw new Error(`usage: icount <strategy id>; ids: ${strategies.map((x) => x.id).join(' ')}`);
const clients = env('CLIENTS', 16);
const sql = postgres(process.env.DATABASE_URL ?? 'postgres://stub@127.0.0.1:55432/stub', { max: clients, onnotice: () => {} });
const ctx: StrategyContext = { sql, gateway: new Gateway(0), maxAttempts: 100, retry: () => {}, redisTrip: () => {} };
let seq = 0;
async function run(requests: number) {
  let left = requests;
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (left-- > 0) {
        const n = seq++;
        await s?.refund(ctx, { requestId: `ic-${n}`, orderId: 1 + ((n * 7919) % 10000), amount: 1, duplicate: false });
      }
    }),
  );
}
await run(env('WARM', 2000));
const requests = env('REQUESTS', 1000);
const heap0 = process.memoryUsage().heapUsed;
await run(requests);
// with a young generation too large to fill (--min/max-semi-space-size), no GC runs in this
// window and the heap's growth is what the requests allocated
console.log(`allocated ${Math.round((process.memoryUsage().heapUsed - heap0) / Math.max(1, requests))} bytes/request`);
await sql.end({ timeout: 1 });
