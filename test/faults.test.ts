// Connection faults on every runner, each suite in a child process: a driver crash shows up as
// that process dying, never as an exception swallowed in here. postgres.js is the driver under test
// (./pgjs.ts): 4.x, stock, or 3.4.x with PGCOORD_PGJS=3, stock and with pgcoord's patch.
import { execFileSync, spawn } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { useTestDb } from './helpers.js';
import { PGJS_MAJOR, PGJS_PACKAGE } from './pgjs.js';

const db = await useTestDb(2);
const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));
const pkgDir = fileURLToPath(new URL(`../${PGJS_PACKAGE}`, import.meta.url));
const version = (JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8')) as { version: string }).version;
const installed = join(pkgDir, 'src/index.js');

// On 3.x, a copy of the installed postgres.js laid out as node_modules/postgres (where the patch's
// paths point) with pgcoord's patch for its version applied (what patch-package would do).
let patched = '';
if (PGJS_MAJOR === 3) {
  const patchedDir = mkdtempSync(join(tmpdir(), 'pgcoord-patched-'));
  afterAll(() => rmSync(patchedDir, { recursive: true, force: true }));
  cpSync(pkgDir, join(patchedDir, 'node_modules/postgres'), { recursive: true });
  execFileSync('git', ['apply', fileURLToPath(new URL(`../patches/postgres+${version}.patch`, import.meta.url))], { cwd: patchedDir });
  patched = join(patchedDir, 'node_modules/postgres/src/index.js');
}

function run(
  script: string,
  args: string[],
  timeoutMs = 60_000,
): Promise<{ code: number | null; lines: Record<string, unknown>[]; stderr: string }> {
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
        .map((l) => JSON.parse(l) as Record<string, unknown>);
      resolve({ code, lines, stderr });
    });
  });
}

const expectSafe = (lines: Record<string, unknown>[]) => {
  const by = Object.fromEntries(lines.map((l) => [l.scenario, l]));
  expect(Object.keys(by)).toEqual([
    'kill-while-waiting',
    'kill-mid-query',
    'kill-while-idle',
    'kill-session-lock',
    'idle-in-transaction-timeout',
    'plan-kill-while-waiting',
    'plan-kill-while-deciding',
    'row-plan-kill-while-deciding',
    'done',
  ]);
  for (const name of [
    'kill-while-waiting',
    'kill-mid-query',
    'kill-while-idle',
    'idle-in-transaction-timeout',
    'plan-kill-while-waiting',
    'plan-kill-while-deciding',
    'row-plan-kill-while-deciding',
  ]) {
    expect(by[name], name).toMatchObject({ error: 'PGCOORD_CONNECTION_LOST', rows: [], next: true });
  }
  expect(by['kill-while-idle']!.later).not.toBe('ran'); // the callback's next statement ran nowhere
  expect(by['kill-session-lock']).toMatchObject({ error: 'PGCOORD_LOCK_LOST', next: true });
  expect(by['kill-session-lock']!.abortedAfterMs as number).toBeLessThan(3000);
};

describe(`connection faults through pgcoord (installed drivers, postgres.js ${version} unpatched)`, () => {
  for (const runner of ['postgres.js', 'drizzle-postgres-js', 'pg', 'drizzle-pg']) {
    it(`${runner}: the process lives, the typed error is raised, nothing of the failed transaction is written, the pool serves on`, async () => {
      const { code, lines, stderr } = await run('fault-suite.ts', [runner, db.url]);
      expect(code, stderr).toBe(0);
      expectSafe(lines);
    });
  }

  it('a crash-restart of PostgreSQL during concurrent locked refunds: nothing acknowledged is lost, no over-refund, every pool serves on', async () => {
    const { code, lines, stderr } = await run('restart-suite.ts', [], 90_000);
    expect(code, stderr).toBe(0);
    const [r] = lines;
    expect(r).toMatchObject({ ackedMissing: 0, overRefunded: 0, mismatched: 0 });
    expect(r!.acked as number, JSON.stringify(r)).toBeGreaterThan(0);
    expect(r!.next).toEqual({ 'postgres.js': true, 'drizzle postgres-js': true, pg: true, 'drizzle pg': true });
    // every failure was typed: lost before commit, or commit outcome unknown; nothing hung (a
    // postgres.js reservation lost in the restart is bounded by the pool's connect_timeout)
    for (const code of Object.keys(r!.errors as object)) expect(['PGCOORD_CONNECTION_LOST', 'PGCOORD_COMMIT_UNKNOWN']).toContain(code);
    expect(r!.stuck).toEqual({});
  });
});

describe.runIf(PGJS_MAJOR === 3)(`postgres.js ${version} on its own (sql.begin / sql.reserve, no pgcoord)`, () => {
  // These document the upstream bugs of 3.4.x (porsager/postgres #1066, #1154, #1208, #1216; 3.4.9
  // and 3.4.10 both have them), fixed in 4.x. Should a 3.4 release fix them, these fail: update the
  // README's driver section and doctor's check then.
  it('unpatched: a backend killed inside sql.begin crashes the process', async () => {
    const { code, stderr } = await run('pgjs-begin-faults.ts', [installed, db.url, 'kill-in-begin']);
    expect(code).not.toBe(0);
    expect(stderr).toContain("Cannot read properties of null (reading 'write')");
  });

  it('unpatched: the next query on a reserved connection whose backend died crashes the process', async () => {
    const { code, stderr } = await run('pgjs-begin-faults.ts', [installed, db.url, 'kill-reserved']);
    expect(code).not.toBe(0);
    expect(stderr).toContain("Cannot read properties of null (reading 'write')");
  });

  it('unpatched: idle_in_transaction_session_timeout leaks a write of a failed transaction', async () => {
    const { code, lines } = await run('pgjs-begin-faults.ts', [installed, db.url, 'idle-tx-timeout']);
    expect(code).toBe(0);
    expect(lines[0]).toMatchObject({ results: ['A failed CONNECTION_CLOSED', 'B failed B aborts on purpose'], rows: ['A2'] });
  });

  it('patched: the same three faults are survived, typed and leak nothing', async () => {
    const kill = await run('pgjs-begin-faults.ts', [patched, db.url, 'kill-in-begin']);
    expect(kill.code, kill.stderr).toBe(0);
    expect(kill.lines[0]).toMatchObject({ result: 'CONNECTION_CLOSED', next: 1 });
    const reserved = await run('pgjs-begin-faults.ts', [patched, db.url, 'kill-reserved']);
    expect(reserved.code, reserved.stderr).toBe(0);
    expect(reserved.lines[0]).toMatchObject({ result: 'CONNECTION_CLOSED' });
    const idle = await run('pgjs-begin-faults.ts', [patched, db.url, 'idle-tx-timeout']);
    expect(idle.code, idle.stderr).toBe(0);
    expect(idle.lines[0]).toMatchObject({ rows: [] });
  });

  for (const runner of ['postgres.js', 'drizzle-postgres-js']) {
    it(`patched: pgcoord's fault suite passes through ${runner}`, async () => {
      const { code, lines, stderr } = await run('fault-suite.ts', [runner, db.url, patched]);
      expect(code, stderr).toBe(0);
      expectSafe(lines);
    });
  }
});

describe.runIf(PGJS_MAJOR === 4)(`postgres.js ${version} on its own (sql.begin / sql.reserve, no pgcoord, no patch)`, () => {
  // The three faults that crash or leak on 3.4.x are fixed upstream in 4.x: the stock driver survives them.
  it('a backend killed inside sql.begin rejects the transaction, the pool serves on', async () => {
    const { code, lines, stderr } = await run('pgjs-begin-faults.ts', [installed, db.url, 'kill-in-begin']);
    expect(code, stderr).toBe(0);
    expect(lines[0]).toMatchObject({ next: 1 });
    expect(lines[0]!.result).not.toBe('committed');
  });

  it('the next query on a reserved connection whose backend died is rejected', async () => {
    const { code, lines, stderr } = await run('pgjs-begin-faults.ts', [installed, db.url, 'kill-reserved']);
    expect(code, stderr).toBe(0);
    expect(lines[0]).toMatchObject({ result: 'CONNECTION_CLOSED' });
  });

  it('idle_in_transaction_session_timeout leaks no write of the failed transaction', async () => {
    const { code, lines, stderr } = await run('pgjs-begin-faults.ts', [installed, db.url, 'idle-tx-timeout']);
    expect(code, stderr).toBe(0);
    expect(lines[0]).toMatchObject({ rows: [] });
    expect((lines[0]!.results as string[])[0]).toMatch(/^A failed /);
  });
});
