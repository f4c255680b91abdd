// Network cuts, not backend kills: a TCP proxy (fixtures/cut-proxy.ts) between the drivers and
// PostgreSQL drops connections (RST or FIN), stalls them (a partition), or cuts one at a protocol
// moment: a statement inside the transaction ran but its answer is lost, COMMIT ran but its answer
// is lost, COMMIT never reached the server. Every runner kind, postgres.js being the driver under
// test (./pgjs.ts: 4.x, or 3.4.x with PGCOORD_PGJS=3), each in a child process so a driver crash
// shows up as that process dying. What is judged is the database, read on a direct connection:
//   ConnectionLostError  → nothing of the operation is there (the README: "did not commit")
//   CommitUnknownError   → allowed either way; when the proxy let COMMIT run, it must be there
//   a partition          → an operation given a signal or a timeout settles, typed, before it ends
//   after every fault    → the same runner serves the next operation
// Then a history: refund workers on every runner through one proxy cutting at random.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { migrateIdempotency, migrateLeases, migrateQueue } from '../src/index.js';
import { useTestDb } from './helpers.js';
import { PGJS_MAJOR, PGJS_PACKAGE } from './pgjs.js';

const db = await useTestDb(2);
// the children share pgcoord's tables: create them once here rather than racing four migrations
await migrateIdempotency(db.pool);
await migrateLeases(db.pool);
await migrateQueue(db.pool);

const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));
const pkgDir = fileURLToPath(new URL(`../${PGJS_PACKAGE}`, import.meta.url));
const version = (JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8')) as { version: string }).version;

type Line = Record<string, unknown>;

function run(script: string, args: string[], timeoutMs = 90_000): Promise<{ code: number | null; lines: Line[]; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', fixture(script), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      const lines = out
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Line);
      resolve({ code, lines, stderr });
    });
  });
}

const OPS = ['withLock', 'withLockPlan', 'withRowLock', 'guardedUpdate', 'idempotent', 'withFence', 'enqueue', 'enqueueInTransaction'];
const ONE_STATEMENT = new Set(['guardedUpdate', 'enqueue']); // autocommit: the statement is the commit
const STALLS = [
  'stall-withLock-signal',
  'stall-withLock-timeout',
  'stall-withRowLock-signal',
  'stall-guardedUpdate-signal',
  'stall-connect-signal',
];
const LOST = 'PGCOORD_CONNECTION_LOST';
const UNKNOWN = 'PGCOORD_COMMIT_UNKNOWN';

/** Every way the suite's report breaks pgcoord's promises, one line each (empty: none). */
function problemsOf(runner: string, code: number | null, lines: Line[], stderr: string): string[] {
  const pgjs3 = PGJS_MAJOR === 3 && runner.includes('postgres');
  const problems: string[] = [];
  if (code !== 0) problems.push(`the process exited ${code}: ${stderr.trim().split('\n').slice(0, 12).join(' | ')}`);
  const by = new Map(lines.map((l) => [l.scenario as string, l]));
  const expected = [
    ...OPS.flatMap((op) => [...(ONE_STATEMENT.has(op) ? [] : [`${op}/mid`]), `${op}/commit-answer-lost`, `${op}/commit-never-sent`]),
    'drop-all-rst',
    'drop-all-fin',
    'drop-then-return',
    'drop-idle-withLock',
    'drop-idle-guardedUpdate',
    'drop-idle-enqueue',
    ...STALLS,
    'plan-writes-cut',
  ];
  for (const name of expected) {
    const l = by.get(name);
    if (!l) {
      problems.push(`${name}: not reported (the process ended before it)`);
      continue;
    }
    // postgres.js 3.4 (README, ../shared/repro/pgjs-lost-statement-hang.mjs): an autocommit
    // statement sent between a socket's error and its close never settles. A one-statement
    // operation that hangs there on 3.4 is that upstream bug, not pgcoord's: not counted.
    if (pgjs3 && l.error === 'HUNG' && [...ONE_STATEMENT].some((op) => name === `drop-idle-${op}` || name.startsWith(`${op}/`))) continue;
    const bad = (what: string) => problems.push(`${name}: ${what} (${JSON.stringify(l)})`);
    if (l.next !== true) bad('the runner did not serve the next operation');
    const { error, written } = l;
    if (name.includes('/')) {
      if (l.cut !== true) bad('the proxy did not cut where asked');
      if (name.endsWith('/mid') && (error !== LOST || written !== false))
        bad('a cut inside the transaction must be ConnectionLostError, nothing written');
      if (name.endsWith('/commit-answer-lost') && (error !== UNKNOWN || written !== true))
        bad('COMMIT ran and its answer was lost: CommitUnknownError, and the write is there');
      if (name.endsWith('/commit-never-sent') && (![LOST, UNKNOWN].includes(error as string) || written !== false))
        bad('COMMIT never reached the server: a typed loss, and nothing written');
      // an unknown outcome is settled by calling again with the same key: replayed only if it had
      // committed. (The fixture calls again on ConnectionLostError, "nothing was run", as an app
      // would: postgres.js 3.4 loses a reservation asked for right after a close until
      // connect_timeout, a known 3.4 bug in the README's driver section.)
      if (name.startsWith('idempotent/') && l.retry !== (written ? 'replayed' : 'ran')) bad('the retry with the same key');
    } else if (name.startsWith('drop-all-') || name === 'drop-then-return') {
      // the connection is known to be gone before anything more is sent: not "unknown"
      if (error !== LOST || written !== false) bad('ConnectionLostError, nothing written');
      if (l.later === 'ran') bad("the callback's statement after the drop ran");
    } else if (name.startsWith('drop-idle-')) {
      // the next operation after idle connections were dropped runs on a new one, or fails typed having run nothing
      const ok = (error === 'none' && written === true) || (error === LOST && written === false) || error === UNKNOWN;
      if (!ok) bad('it ran, or failed typed with nothing written');
    } else if (name.startsWith('stall-')) {
      if (typeof l.settledMs !== 'number' || l.settledMs >= (l.partitionMs as number))
        bad(
          `it gave up on the signal or timeout only after the partition ended (settled ${l.settledMs === null ? 'never' : `after ${l.settledMs} ms`}, partition ${l.partitionMs} ms)`,
        );
      else if (typeof error !== 'string' || !error.startsWith('PGCOORD_')) bad('a typed error');
      if ((error === LOST || error === 'PGCOORD_ABORTED' || error === 'PGCOORD_LOCK_TIMEOUT') && written !== false)
        bad('reported as not done, but written');
    } else if (name === 'plan-writes-cut') {
      if (![LOST, UNKNOWN].includes(error as string) || written !== false) bad('a typed loss, nothing written');
    }
  }
  return problems;
}

describe(`network cuts through a proxy (postgres.js ${version})`, () => {
  for (const runner of ['postgres.js', 'drizzle-postgres-js', 'pg', 'drizzle-pg']) {
    it.concurrent(`${runner}: every cut gives the honest typed outcome, nothing hangs past a signal or timeout, the process lives and the pool serves on`, async () => {
      const { code, lines, stderr } = await run('cut-suite.ts', [runner, db.url]);
      const problems = problemsOf(runner, code, lines, stderr);
      // A known limit of postgres.js 3.4 (README, driver section): under a partition (packets
      // dropped, no reset) its lock waits end only when the network heals: its cancel goes through
      // the same black hole, and pgcoord has no way to drop a 3.4 connection that answers nothing.
      // On 4.x and node-postgres the wait gives up (the cancel, then the connection dropped after
      // GIVE_UP_AFTER_CANCEL_MS; a timeoutMs the server never answered is cancelled at twice it
      // plus a second), typed, before the partition ends.
      const pgjs3 = PGJS_MAJOR === 3 && runner.includes('postgres');
      const known = pgjs3 ? problems.filter((p) => p.startsWith('stall-') && p.includes('only after the partition ended')) : [];
      expect(problems.filter((p) => !known.includes(p))).toEqual([]);
    });
  }

  it.concurrent('random cuts under concurrent refunds on every runner: no over-refund, nothing acknowledged is missing, nothing reported lost committed', async () => {
    const seconds = process.env.PGCOORD_CHAOS_SECONDS ?? '4';
    const { code, lines, stderr } = await run('cut-history.ts', [db.url, seconds], 60_000 + Number(seconds) * 1000);
    expect(code, stderr).toBe(0);
    const [r] = lines;
    const detail = JSON.stringify(r);
    expect(r, detail).toMatchObject({
      ackedMissing: [],
      lostButCommitted: [],
      refusedButCommitted: [],
      overRefunded: [],
      mismatched: [],
      untyped: [],
      stuck: [],
      next: { 'postgres.js': true, 'drizzle postgres-js': true, pg: true, 'drizzle pg': true },
    });
    expect(r!.acked as number, detail).toBeGreaterThan(0);
    // faults were injected and reached operations
    expect(
      Object.values(r!.faults as Record<string, number>).reduce((a, b) => a + b, 0),
      detail,
    ).toBeGreaterThan(3);
    expect((r!.errors as Record<string, number>)[LOST] ?? 0, detail).toBeGreaterThan(0);
    for (const c of Object.keys(r!.errors as object)) expect([LOST, UNKNOWN], detail).toContain(c);
  });
});
