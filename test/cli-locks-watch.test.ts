// `pgcoord locks --watch` through the real CLI, piped: successive refreshes show a lock appear, a
// waiter blocked by its holder (the blocking chain), then nothing; NDJSON with --json; Ctrl-C and
// SIGTERM end it with 0 and its connection closed; a bad interval is bad usage (2); its connection
// terminated by the server ends it with 1 and one line saying so.
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { hashKey } from '../src/index.js';
import { ROOT, runCli } from './fixtures/cli-run.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(2);
const holderPool = db.newSql({ max: 1, connection: { application_name: 'holder-app' } });
const waiterPool = db.newSql({ max: 1, connection: { application_name: 'waiter-app' } });
const key = hashKey('order:42', 'refunds');
const [{ database }] = (await db.sql`select current_database() as database`) as unknown as [{ database: string }];

/** The test database's URL with an application_name of its own, to find the CLI's connection by. */
function urlAs(application: string): string {
  const url = new URL(db.url);
  url.searchParams.set('application_name', application);
  return url.href;
}

interface Watch {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit code (or the signal's name). */
  exited: Promise<number | string>;
  /** Wait until `test` holds for the output so far. */
  until(test: (out: string) => boolean, what: string, ms?: number): Promise<string>;
}

const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

function watch(args: string[]): Watch {
  const tsx = pathToFileURL(join(ROOT, 'node_modules', 'tsx', 'dist', 'loader.mjs')).href;
  const child = spawn(process.execPath, ['--import', tsx, join(ROOT, 'src', 'cli', 'index.ts'), 'locks', ...args], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout?.on('data', (d) => {
    out += d;
  });
  child.stderr?.on('data', (d) => {
    err += d;
  });
  const exited = new Promise<number | string>((done) => child.on('exit', (code, signal) => done(code ?? signal ?? -1)));
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exited,
    async until(test, what, ms = 20_000) {
      const deadline = Date.now() + ms;
      while (!test(out)) {
        if (child.exitCode !== null) throw new Error(`the watch exited (${child.exitCode}) before ${what}: ${err}\n${out}`);
        if (Date.now() > deadline) throw new Error(`no refresh showed ${what} in ${ms}ms:\n${out}\n${err}`);
        await sleep(20);
      }
      return out;
    },
  };
}

/** The text refreshes printed so far (each starts with the header line). */
const refreshes = (out: string) => out.split(/^(?=pgcoord locks: database )/m).filter((r) => r.startsWith('pgcoord locks:'));
const last = (out: string) => refreshes(out).at(-1) ?? '';

async function pidOf(sql: typeof holderPool | Awaited<ReturnType<typeof holderPool.reserve>>): Promise<number> {
  const [{ pid }] = (await sql`select pg_backend_pid()::int as pid`) as unknown as [{ pid: number }];
  return pid;
}

async function cliConnections(application: string): Promise<number> {
  const [{ n }] = (await db.sql`select count(*)::int as n from pg_stat_activity where application_name = ${application}`) as unknown as [
    { n: number },
  ];
  return n;
}

describe('pgcoord locks --watch', () => {
  it('refreshes show the lock appear, the waiter blocked by its holder, then nothing; SIGINT exits 0 promptly', async () => {
    const application = `watch-${randomUUID().slice(0, 8)}`;
    const w = watch(['--watch', '0.2', '--url', urlAs(application), '--names', 'order:42', '--namespace', 'refunds']);
    await w.until((o) => refreshes(o).length >= 1, 'a first refresh');
    expect(last(w.stdout())).toMatch(/no advisory locks held or awaited/);

    const holder = await holderPool.reserve();
    const waiter = await waiterPool.reserve();
    const holderPid = await pidOf(holder);
    const waiterPid = await pidOf(waiter);
    await holder`select pg_advisory_lock(${String(key)}::int8)`;
    await w.until((o) => / 1 held, 0 waiting/.test(last(o)), 'the held lock');
    const held = last(w.stdout());
    expect(held).toMatch(new RegExp(`^"refunds":"order:42"\\s+exclusive\\s+held\\s+${holderPid}\\s+holder-app\\s`, 'm'));
    expect(held).toMatch(/no blocking chains: nobody waits/);

    const waiting = waiter`select pg_advisory_lock(${String(key)}::int8)`.execute();
    await w.until((o) => / 1 held, 1 waiting/.test(last(o)), 'the waiter');
    const blocked = last(w.stdout());
    expect(blocked).toMatch(
      new RegExp(
        `^"refunds":"order:42"\\s+exclusive\\s+waiting\\s+${waiterPid}\\s+waiter-app\\s+\\S+\\s+${holderPid}\\s+select pg_advisory_lock`,
        'm',
      ),
    );
    expect(blocked).toMatch(/^blocking chains \(waiter ← holder\):$/m);
    expect(blocked).toMatch(
      new RegExp(
        `^ {2}${waiterPid} \\(waiter-app\\) ← ${holderPid} \\(holder-app\\) {3}${waiterPid} waits \\S+ for "refunds":"order:42"$`,
        'm',
      ),
    );

    await holder`select pg_advisory_unlock_all()`;
    await waiting;
    await w.until((o) => new RegExp(`held\\s+${waiterPid}\\s+waiter-app`).test(last(o)), 'the waiter holding the lock');
    await waiter`select pg_advisory_unlock_all()`;
    holder.release();
    waiter.release();
    await w.until((o) => /no advisory locks held or awaited/.test(last(o)) && / 0 held, 0 waiting/.test(last(o)), 'the lock gone');

    const sent = Date.now();
    w.child.kill('SIGINT');
    expect(await w.exited).toBe(0);
    expect(Date.now() - sent).toBeLessThan(3000);
    expect(w.stderr()).toBe('');
    expect(await cliConnections(application)).toBe(0);

    // Piped: no escape codes, refreshes apart by one blank line, each with the database and its clock.
    const out = w.stdout();
    expect(out).not.toContain('\x1b');
    const all = refreshes(out);
    expect(all.length).toBeGreaterThanOrEqual(5);
    for (const r of all.slice(0, -1)) expect(r).toMatch(/\n\n$/);
    for (const r of all)
      expect(r.split('\n')[0]).toMatch(
        new RegExp(
          `^pgcoord locks: database ${database} at \\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z \\(database clock\\), every 0.2s: \\d+ held, \\d+ waiting$`,
        ),
      );
    const times = all.map((r) => Date.parse(/ at (\S+) /.exec(r)?.[1] ?? ''));
    for (let i = 1; i < times.length; i++) expect(times[i]).toBeGreaterThan(times[i - 1] as number);
  });

  it('--json: one JSON document per line per refresh; --count ends it with 0', async () => {
    const holder = await holderPool.reserve();
    const waiter = await waiterPool.reserve();
    const holderPid = await pidOf(holder);
    const waiterPid = await pidOf(waiter);
    await holder`select pg_advisory_lock(${String(key)}::int8)`;
    const waiting = waiter`select pg_advisory_lock(${String(key)}::int8)`.execute();
    try {
      for (let i = 0; i < 100; i++) {
        const [row] = await db.sql`select count(*)::int as n from pg_locks where locktype = 'advisory' and not granted`;
        if (row?.n) break;
        await sleep(20);
      }
      const r = await runCli([
        'locks',
        '--watch',
        '0.1',
        '--count',
        '3',
        '--json',
        '--names',
        'order:42',
        '--namespace',
        'refunds',
        '--url',
        db.url,
      ]);
      expect(r.code, r.stderr).toBe(0);
      const lines = r.stdout.trim().split('\n');
      expect(lines).toHaveLength(3);
      for (const line of lines) {
        const doc = JSON.parse(line);
        expect(doc).toMatchObject({ database, intervalMs: 100, held: 1, waiting: 1, chains: [{ pids: [waiterPid, holderPid] }] });
        expect(Date.parse(doc.at)).not.toBeNaN();
        expect(doc.chains[0].waits).toMatchObject([{ pid: waiterPid, label: '"refunds":"order:42"' }]);
        expect(doc.locks).toMatchObject([
          { label: '"refunds":"order:42"', status: 'held', pid: holderPid, key: { space: 'int8', id: String(key), name: 'order:42' } },
          { label: '"refunds":"order:42"', status: 'waiting', pid: waiterPid, blockedBy: [holderPid] },
        ]);
      }
    } finally {
      await holder`select pg_advisory_unlock_all()`;
      await waiting;
      await waiter`select pg_advisory_unlock_all()`;
      holder.release();
      waiter.release();
    }
  });

  it('SIGTERM ends it with 0 and its connection closed', async () => {
    const application = `watch-${randomUUID().slice(0, 8)}`;
    const w = watch(['--watch', '--url', urlAs(application)]);
    await w.until((o) => refreshes(o).length >= 1, 'a first refresh');
    expect(last(w.stdout())).toMatch(/ every 2s: /);
    expect(await cliConnections(application)).toBe(1);
    w.child.kill('SIGTERM');
    expect(await w.exited).toBe(0);
    expect(refreshes(w.stdout())).toHaveLength(1); // the 2 s pause was cut short, not slept out
    expect(await cliConnections(application)).toBe(0);
  });

  it.each([['0'], ['0.05'], ['3601'], ['abc'], ['-1']])('--watch %s is bad usage: exit 2 with a message', async (value) => {
    const r = await runCli(['locks', '--watch', value, '--url', db.url]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/--watch.*is invalid\. expected a number of seconds from 0\.1 to 3600/);
  });

  it('--count without --watch, or not a positive integer, is bad usage', async () => {
    const alone = await runCli(['locks', '--count', '3', '--url', db.url]);
    expect(alone.code).toBe(2);
    expect(alone.stderr.trim()).toBe('pgcoord: --count is the number of --watch refreshes: pgcoord locks --watch --count <n>');
    expect((await runCli(['locks', '--watch', '--count', '0', '--url', db.url])).code).toBe(2);
  });

  it('its connection terminated by the server: exit 1, one line saying so, no stack', async () => {
    const application = `watch-${randomUUID().slice(0, 8)}`;
    const w = watch(['--watch', '0.2', '--url', urlAs(application)]);
    await w.until((o) => refreshes(o).length >= 2, 'two refreshes');
    const [{ n }] =
      (await db.sql`select count(pg_terminate_backend(pid))::int as n from pg_stat_activity where application_name = ${application}`) as unknown as [
        { n: number },
      ];
    expect(n).toBe(1); // one connection for the whole watch
    const code = await Promise.race([w.exited, sleep(10_000).then(() => 'still running')]);
    expect(code).toBe(1);
    const stderr = w.stderr().trim();
    expect(stderr.split('\n')).toHaveLength(1);
    expect(stderr).toMatch(/^pgcoord: lost the database connection\b.*; the watch ended$/);
    expect(stderr).not.toMatch(/\bat .*\.ts:\d+/);
    expect(await cliConnections(application)).toBe(0);
  });
});
