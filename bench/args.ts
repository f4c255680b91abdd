// Command-line options of `npm run bench`.
import { parseArgs } from 'node:util';

/** Everything a run can be told. */
export interface BenchOptions {
  quick: boolean;
  clients: number;
  /** Contention levels: number of orders the requests spread over (1 = one hot order). */
  orders: number[];
  /** Unique refund requests per strategy and level. */
  requests: number;
  /** Time cap per strategy and level, seconds. */
  seconds: number;
  gatewayMs: number;
  duplicates: number;
  seed: number;
  maxAttempts: number;
  /** Interleaved pairs per pgcoord strategy for the overhead figure (0 = skip). */
  overheadPairs: number;
  /** Requests per run of an interleaved pair. */
  overheadRequests: number;
  /** Only strategies whose id contains one of these. */
  only: string[];
  redis: boolean;
  pgbench: boolean;
  fault: boolean;
  /** The lease micro-benchmark (acquire + release vs Redis, round trips, leader failover). */
  lease: boolean;
  json?: string;
  html?: string;
  help: boolean;
}

export const USAGE = `npm run bench -- [options]

  --quick               a few seconds: 8 clients, 1 and 1000 orders, 100 requests, no pgbench unless --pgbench
                        (the smoke test's run: for correctness, its speed figures mean little)
  --clients N           concurrent clients (default 16)
  --orders A,B,C        contention levels: orders the requests spread over (default 1,100,10000)
  --requests N          unique refund requests per strategy and level (default 500)
  --seconds S           time cap per strategy and level (default 1)
  --gateway-ms MS       simulated payment-gateway latency inside the critical section (default 1; 0 allowed)
  --duplicates F        fraction of requests delivered twice, as a retrying client would (default 0.05)
  --seed N              seed of the request stream (default 42)
  --max-attempts N      retry cap of the optimistic and SERIALIZABLE strategies (default 100)
  --overhead-pairs N    pgcoord vs its hand-written twin (same SQL, same round trips) in N alternating pairs of
                        short runs at the most spread level; the overhead target is judged on their median
                        (default 8; --quick 2; 0 skips)
  --overhead-requests N requests per run of a pair (default 400; --quick 100)
  --only a,b            only strategies whose id contains one of these (e.g. advisory,redis)
  --no-redis            skip the Redis lock     --no-pgbench   skip pgbench     --no-fault   skip the fault scenario
  --no-lease            skip the lease micro-benchmark (acquire + release vs the Redis lock, round trips,
                        leader failover by resign and by expiry; --quick: shorter rounds, fewer samples)
  --json FILE           where to write all figures (default bench/results/bench-<date>.json)
  --html FILE           where to write the HTML report (default next to the JSON)

PostgreSQL: DATABASE_URL if set, else an embedded PostgreSQL started for the run.
Redis: REDIS_URL if set, else redis://127.0.0.1:6379 (skipped with a note when it does not answer).`;

function positive(name: string, v: string | undefined, fallback: number, allowZero = false): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0 || (!allowZero && n === 0))
    throw new Error(`--${name} must be a ${allowZero ? 'non-negative' : 'positive'} number, got ${v}`);
  return n;
}

/** Parse argv (without node and the script). Throws with a readable message on bad input. */
export function parseOptions(argv: string[]): BenchOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      clients: { type: 'string' },
      orders: { type: 'string' },
      requests: { type: 'string' },
      seconds: { type: 'string' },
      'gateway-ms': { type: 'string' },
      duplicates: { type: 'string' },
      seed: { type: 'string' },
      'max-attempts': { type: 'string' },
      'overhead-pairs': { type: 'string' },
      'overhead-requests': { type: 'string' },
      only: { type: 'string' },
      'no-redis': { type: 'boolean', default: false },
      'no-pgbench': { type: 'boolean', default: false },
      pgbench: { type: 'boolean', default: false },
      'no-fault': { type: 'boolean', default: false },
      'no-lease': { type: 'boolean', default: false },
      json: { type: 'string' },
      html: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  const quick = values.quick ?? false;
  const orders = (values.orders ?? (quick ? '1,1000' : '1,100,10000')).split(',').map((s) => positive('orders', s.trim(), 1));
  if (orders.some((o) => !Number.isInteger(o))) throw new Error('--orders must be integers');
  const duplicates = positive('duplicates', values.duplicates, quick ? 0.1 : 0.05, true);
  if (duplicates > 1) throw new Error('--duplicates is a fraction from 0 to 1');
  return {
    quick,
    clients: Math.round(positive('clients', values.clients, quick ? 8 : 16)),
    orders: [...new Set(orders)].sort((a, b) => a - b),
    requests: Math.round(positive('requests', values.requests, quick ? 100 : 500)),
    seconds: positive('seconds', values.seconds, quick ? 1 : 1),
    gatewayMs: positive('gateway-ms', values['gateway-ms'], 1, true),
    duplicates,
    seed: Math.round(positive('seed', values.seed, 42, true)),
    maxAttempts: Math.round(positive('max-attempts', values['max-attempts'], 100)),
    overheadPairs: Math.round(positive('overhead-pairs', values['overhead-pairs'], quick ? 2 : 8, true)),
    overheadRequests: Math.round(positive('overhead-requests', values['overhead-requests'], quick ? 100 : 400)),
    only: values.only
      ? values.only
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean)
      : [],
    redis: !values['no-redis'],
    pgbench: !values['no-pgbench'] && (!quick || (values.pgbench ?? false)),
    fault: !values['no-fault'],
    lease: !values['no-lease'],
    json: values.json,
    html: values.html,
    help: values.help ?? false,
  };
}
