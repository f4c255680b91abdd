// Profiling aid, not a test and not part of `npm run bench`: one strategy, run for WARM then
// REQUESTS requests against bench/profile/stub-server.mjs, meant to be run under
// `valgrind --tool=callgrind`, whose instruction count is repeatable where a timer is not. See
// bench/profile/icount.sh, which counts only the REQUESTS (WAIT_FOR_SIGNAL: after the warm-up it
// prints "ready" and waits for SIGUSR2 while counting is switched on).
import { PerformanceObserver } from 'node:perf_hooks';
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
if (process.env.WAIT_FOR_SIGNAL) {
  // icount.sh switches callgrind's counting on now (callgrind_control -i on), then signals
  console.error('ready');
  await new Promise<void>((resolve) => {
    const alive = setInterval(() => {}, 1000);
    process.once('SIGUSR2', () => {
      clearInterval(alive);
      resolve();
    });
  });
}
const requests = env('REQUESTS', 1000);
let collections = 0;
const gcs = new PerformanceObserver((list) => {
  collections += list.getEntries().length;
});
gcs.observe({ entryTypes: ['gc'] });
const heap0 = process.memoryUsage().heapUsed;
const cpu0 = process.cpuUsage();
await run(requests);
const cpu = process.cpuUsage(cpu0);
// (natively, not under valgrind: the process's CPU per request, V8's background threads included)
console.log(
  `cpu ${((cpu.user + cpu.system) / requests).toFixed(1)} µs/request (user ${(cpu.user / requests).toFixed(1)}, system ${(cpu.system / requests).toFixed(1)})`,
);
const heap1 = process.memoryUsage().heapUsed;
await new Promise((resolve) => setImmediate(resolve)); // (gc entries are delivered asynchronously)
gcs.disconnect();
// With a young generation too large to fill (--min/max-semi-space-size) no GC runs in this window,
// and the heap's growth is what the requests allocated; when one ran anyway, there is no figure.
console.log(
  collections ? 'allocated ? bytes/request (a GC ran)' : `allocated ${Math.round((heap1 - heap0) / Math.max(1, requests))} bytes/request`,
);
await sql.end({ timeout: 1 });
