// `npm run chaos` in short (chaos/run.ts, as a child process, on a PostgreSQL of its own so that its
// restart disturbs no other file): every strategy on every runner in two worker processes under
// backend terminations, connection cuts, holder pauses, a worker kill and one crash restart; the
// run's checker finds no anomaly, and the faults did happen. PGCOORD_CHAOS_SECONDS sets the length.
// First, the checker itself on a made-up history: each broken promise is flagged (it is not blind).
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';
import { type Cell, check } from '../chaos/check.js';
import type { EndLine, Line } from '../chaos/history.js';

const SECONDS = Number(process.env.PGCOORD_CHAOS_SECONDS ?? 20);
const root = fileURLToPath(new URL('..', import.meta.url));

interface Summary {
  seed: number;
  anomalies: number;
  anomalyList: unknown[];
  attempts: number;
  workerProcesses: number;
  faults: Record<string, number>;
  cells: Cell[];
}

function runChaos(): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    // postgres.js 4.x always (PGCOORD_PGJS dropped): unpatched 3.4 crashes a process on a backend
    // killed under a transaction (README, driver section), which test/faults.test.ts covers
    const { PGCOORD_PGJS: _, ...env } = process.env;
    const child = spawn(process.execPath, ['--import', 'tsx', 'chaos/run.ts', '--seconds', String(SECONDS), '--processes', '2', '--json'], {
      cwd: root,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.stderr.on('data', (d) => {
      err += d;
    });
    // SIGINT: the run stops its server and its workers on the way out
    const timer = setTimeout(() => child.kill('SIGINT'), (SECONDS + 120) * 1000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
  });
}

it(
  `chaos run (${SECONDS} s, 2 processes): no over-refund, nothing acknowledged missing, no duplicate effect, typed errors only; faults injected`,
  async () => {
    const { code, out, err } = await runChaos();
    const json = out.split('\n').filter((l) => l.startsWith('{'));
    expect(json.length, `${out}\n${err}`).toBe(1);
    const s = JSON.parse(json[0]!) as Summary;
    const detail = `${out}\n${err}`;
    expect(s.anomalyList, detail).toEqual([]);
    expect(code, detail).toBe(0);
    // every strategy on every runner ran, and the outcomes were mixed
    expect(s.cells.length, detail).toBe(36);
    for (const c of s.cells) expect(c.applied, `${c.strategy} × ${c.runner}`).toBeGreaterThan(0);
    const sum = (f: (c: Cell) => number) => s.cells.reduce((n, c) => n + f(c), 0);
    expect(
      sum((c) => c.refused),
      detail,
    ).toBeGreaterThan(0);
    expect(
      sum((c) => c.replayed),
      detail,
    ).toBeGreaterThan(0);
    expect(
      sum((c) => c.errors.CONNECTION_LOST ?? 0),
      detail,
    ).toBeGreaterThan(0);
    // the faults happened
    const f = s.faults;
    expect(f.terminate ?? 0, detail).toBeGreaterThan(0);
    expect(f.pause ?? 0, detail).toBeGreaterThan(0);
    expect(f.kill ?? 0, detail).toBeGreaterThan(0);
    expect(f.restart, detail).toBe(1);
    const cuts = ['drop-all', 'commit-answer-lost', 'commit-never-sent', 'statement-answer-lost', 'statement-never-sent', 'stall'];
    expect(
      cuts.reduce((n, k) => n + (f[k] ?? 0), 0),
      detail,
    ).toBeGreaterThan(0);
    expect(s.workerProcesses, detail).toBeGreaterThan(2); // a killed worker was respawned
  },
  (SECONDS + 150) * 1000,
);

it('the checker flags every kind of anomaly in a made-up history, and passes an honest one', () => {
  const start = (req: string, att = 1, order = 1, amount = 10): Line => ({
    k: 's',
    req,
    att,
    strategy: 'withLock',
    runner: 'pg',
    order,
    amount,
    pid: 1,
  });
  const end = (req: string, out: 'applied' | 'refused' | 'error', code?: string, att = 1): EndLine => ({
    k: 'e',
    req,
    att,
    out,
    ms: 1,
    ...(code ? { code } : {}),
  });
  const row = (request_id: string, order_id = 1, amount = 10) => ({ request_id, order_id, amount, strategy: 'withLock' });
  const honest: Line[] = [
    start('ok'),
    end('ok', 'applied'),
    start('no'),
    end('no', 'refused'),
    start('lost'),
    end('lost', 'error', 'PGCOORD_CONNECTION_LOST'),
    start('unknown'),
    end('unknown', 'error', 'PGCOORD_COMMIT_UNKNOWN'),
    start('killed'), // in flight at a kill: either way
    start('key'),
    end('key', 'error', 'PGCOORD_COMMIT_UNKNOWN'),
    start('key', 2),
    { ...end('key', 'applied', undefined, 2), rep: true },
  ];
  const fine = check(honest, [row('ok'), row('unknown'), row('killed'), row('key')], [{ id: 1, total: 100, refunded: 40 }]);
  expect(fine.anomalies).toEqual([]);
  expect(fine.cells[0]).toMatchObject({ ops: 7, applied: 2, refused: 1, replayed: 1, open: 1 });

  const broken: Line[] = [
    start('missing'),
    end('missing', 'applied'),
    start('twice'),
    end('twice', 'applied'),
    start('lost'),
    end('lost', 'error', 'PGCOORD_CONNECTION_LOST'),
    start('refused'),
    end('refused', 'refused'),
    start('disagree'),
    end('disagree', 'applied'),
    start('disagree', 2),
    end('disagree', 'refused', undefined, 2),
    start('raw'),
    end('raw', 'error', 'UNTYPED:Error:ECONNRESET'),
    start('hang'),
    end('hang', 'error', 'STUCK'),
    start('moved', 1, 1, 10),
    end('moved', 'applied'),
  ];
  const rows = [row('twice'), row('twice'), row('lost'), row('refused'), row('disagree'), row('moved', 2, 10), row('ghost')];
  const { anomalies } = check(broken, rows, [
    { id: 1, total: 50, refunded: 60 },
    { id: 2, total: 100, refunded: 0 },
  ]);
  expect(new Set(anomalies.map((a) => a.kind))).toEqual(
    new Set([
      'acked missing',
      'duplicate effect',
      'lost but committed',
      'refused but committed',
      'replay disagrees',
      'untyped error',
      'stuck',
      'wrong row',
      'phantom',
      'over-refund',
      'torn order',
    ]),
  );
});
