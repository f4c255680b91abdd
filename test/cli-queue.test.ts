// `pgcoord queue` through the real CLI, on jobs made by enqueue() and real workers: a dead key (a
// handler that threw on its only attempt), a running key (a handler still at work, under its
// holder label), a ready key and a delayed one, in two queues; job ids past 2^53 (exact in JSON as
// decimal strings). The per-queue summary, one queue's keys most behind first (--dead, --limit),
// retry and skip of a dead head (and exit 1 with one line when the head is not dead), bad names
// refused with exit 2 before any connection, and the typed error before migrateQueue(). Each CLI
// run is a process of its own (tsx start-up): the cases get minutes, for a loaded host.
import { afterAll, describe, expect, it } from 'vitest';
import { CliUsageError, checkQueueArgument, formatQueueKeys, formatQueueStats } from '../src/cli/api.js';
import { main } from '../src/cli/main.js';
import { enqueue, type Job, listQueueKeys, migrateQueue, QueueNotMigratedError, queueStats, type Worker, work } from '../src/index.js';
import { runCli } from './fixtures/cli-run.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(4);
const workers: Worker[] = [];
afterAll(async () => {
  await Promise.all(workers.map((w) => w.stop()));
});

/** A URL nothing listens on: a command that got as far as connecting would fail another way. */
const NOWHERE = 'postgres://nobody@127.0.0.1:1/nowhere';
const BIG = 9007199254740992n; // 2^53: the job ids drawn after it are not float64s

const until = async (what: string, check: () => boolean | Promise<boolean>, ms = 20_000) => {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
};

const cli = (args: string[]) => runCli(['queue', ...args, '--url', db.url]);

/** The command run in this process (argv can carry neither NUL nor a lone surrogate). */
async function inProcess(args: string[]) {
  const out: string[] = [];
  const err: string[] = [];
  const code = await main(['node', 'pgcoord', 'queue', ...args], { out: (t) => out.push(t), err: (t) => err.push(t) });
  return { code, stdout: out.join('\n'), stderr: err.join('\n') };
}

function oneLine(r: { stdout: string; stderr: string }) {
  expect(r.stdout).toBe('');
  expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
  expect(r.stderr).not.toMatch(/\bat .*\.ts:\d+/);
}

interface KeyJson {
  key: string;
  state: string;
  jobs: number;
  headId: string;
  attempts: number;
  lastError: string | null;
  lagMs: number;
  holder: string | null;
}

describe('pgcoord queue: bad usage is refused before connecting (exit 2, one line)', { timeout: 180_000 }, () => {
  it.each([
    [['', '--url', NOWHERE], 'pgcoord: invalid queue name: it is empty'],
    [['refunds', 'retry', '', '--url', NOWHERE], 'pgcoord: invalid key name: it is empty'],
    [['r'.repeat(256), '--url', NOWHERE], `pgcoord: invalid queue name "${'r'.repeat(38)}…: 256 characters, at most 255 allowed`],
    [
      ['refunds', 'skip', 'k'.repeat(300), '--url', NOWHERE],
      `pgcoord: invalid key name "${'k'.repeat(38)}…: 300 characters, at most 255 allowed`,
    ],
    [['refunds', 'retry', '--url', NOWHERE], 'pgcoord: pgcoord queue refunds retry needs the key: pgcoord queue <name> retry <key>'],
    [['--dead', '--url', NOWHERE], "pgcoord: --dead lists one queue's keys: pgcoord queue <name> --dead"],
    [['--limit', '5', '--url', NOWHERE], "pgcoord: --limit lists one queue's keys: pgcoord queue <name> --limit <n>"],
    [['refunds', 'skip', 'k', '--json', '--url', NOWHERE], 'pgcoord: --dead, --limit and --json are for the listings, not for skip'],
  ])('queue %j', async (args, message) => {
    const r = await runCli(['queue', ...args], { env: { DATABASE_URL: undefined } });
    expect(r.code, r.stderr).toBe(2);
    oneLine(r);
    expect(r.stderr.trim()).toBe(message);
  });

  it('a bad name is reported rather than a missing database URL', async () => {
    const r = await runCli(['queue', ''], { env: { DATABASE_URL: undefined } });
    expect(r.code).toBe(2);
    expect(r.stderr.trim()).toBe('pgcoord: invalid queue name: it is empty');
  });

  it('NUL and lone surrogates (in process: argv cannot carry them)', async () => {
    const cases: [string[], string][] = [
      [['a\0b'], 'pgcoord: invalid queue name "a\\u0000b": it contains NUL (U+0000)'],
      [['q\uD800'], 'pgcoord: invalid queue name "q\\ud800": it is not well-formed UTF-16 (it holds a lone surrogate)'],
      [['refunds', 'retry', 'k\0'], 'pgcoord: invalid key name "k\\u0000": it contains NUL (U+0000)'],
      [['refunds', 'skip', '\uDC00k'], 'pgcoord: invalid key name "\\udc00k": it is not well-formed UTF-16 (it holds a lone surrogate)'],
    ];
    for (const [args, message] of cases) {
      const r = await inProcess([...args, '--url', NOWHERE]);
      expect(r.code, message).toBe(2);
      oneLine(r);
      expect(r.stderr).toBe(message);
    }
    expect(() => checkQueueArgument('ok', 'queue')).not.toThrow();
    expect(() => checkQueueArgument(42, 'key')).toThrow(CliUsageError);
  });

  it('commander refuses an unknown action, a limit out of range and extra arguments', async () => {
    const cases = [
      ['refunds', 'delete', 'k'],
      ['refunds', '--limit', '0'],
      ['refunds', '--limit', '100001'],
      ['refunds', '--limit', 'x'],
      ['refunds', 'retry', 'k', 'extra'],
    ];
    const runs = await Promise.all(cases.map((args) => runCli(['queue', ...args, '--url', NOWHERE])));
    for (const [i, r] of runs.entries()) {
      expect(r.code, `${cases[i]?.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/^error: /);
    }
  });
});

describe('pgcoord queue before migrateQueue()', { timeout: 180_000 }, () => {
  it('the typed error from code; exit 1 and its one line from every form of the command', async () => {
    await expect(queueStats(db.sql)).rejects.toBeInstanceOf(QueueNotMigratedError);
    await expect(listQueueKeys(db.pool, 'refunds')).rejects.toBeInstanceOf(QueueNotMigratedError);
    const message = new QueueNotMigratedError().message;
    const cases = [[], ['refunds'], ['refunds', '--dead', '--json'], ['refunds', 'retry', 'k'], ['refunds', 'skip', 'k']];
    const runs = await Promise.all(cases.map((args) => cli(args)));
    for (const [i, r] of runs.entries()) {
      expect(r.code, `${cases[i]?.join(' ')}: ${r.stderr}`).toBe(1);
      oneLine(r);
      expect(r.stderr.trim()).toBe(`pgcoord: ${message}`);
    }
  });

  it('after migrateQueue(), with nothing queued', async () => {
    await migrateQueue(db.sql);
    const json = await cli(['--json']);
    expect(json.code, json.stderr).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual([]);
    const text = await cli([]);
    expect(text.stdout.trim()).toBe('no queued jobs in pgcoord.queue_jobs');
    const keys = await cli(['refunds']);
    expect(keys.code, keys.stderr).toBe(0);
    expect(keys.stdout.trim()).toBe('no queued jobs in queue "refunds"');
    expect(formatQueueStats([])).toBe('no queued jobs in pgcoord.queue_jobs');
  });
});

describe('pgcoord queue on real jobs', { timeout: 180_000 }, () => {
  const ids: Record<string, bigint[]> = {};
  const add = async (queue: string, key: string, payload: unknown, options?: { delayMs?: number }) => {
    const r = await enqueue(db.sql, queue, key, payload, options);
    expect(r.enqueued).toBe(true);
    ids[key] = [...(ids[key] ?? []), r.id as bigint];
  };
  let release: () => void = () => {};
  const ran: { key: string; id: bigint; attempt: number }[] = [];

  it('dead, running, ready and waiting keys in two queues', async () => {
    await db.sql`select setval('pgcoord.queue_job_id', ${String(BIG)}::bigint)`;
    const pool = db.newSql({ max: 4 });

    // Two keys whose first job fails on its only attempt: dead, with a later job behind it.
    await add('refunds', 'order:skip', { n: 1 });
    await add('refunds', 'order:skip', { n: 2 });
    await add('refunds', 'order:retry', { n: 1 });
    const failing = work(
      pool,
      'refunds',
      (job: Job<{ n: number }>) => {
        if (job.payload.n === 1) throw new Error(`card declined\n${'x'.repeat(200)}`);
      },
      { maxAttempts: 1, holder: 'failing-worker' },
    );
    workers.push(failing);
    await until('two dead keys', async () => (await listQueueKeys(db.sql, 'refunds', { dead: true })).length === 2);
    await failing.stop();

    // A key whose job is running: the worker holds it (concurrency 1, so it takes nothing else).
    await add('refunds', 'order:run', { n: 3 });
    let started = false;
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    const busy = work(
      pool,
      'refunds',
      async (job: Job) => {
        started = true;
        if (job.key === 'order:run') await gate;
        else ran.push({ key: job.key, id: job.id, attempt: job.attempt }); // once released, it may take other keys
      },
      { holder: 'cli-worker-1', concurrency: 1 },
    );
    workers.push(busy);
    await until('the running job', () => started);
    // A ready key (three jobs), a delayed one, and another queue.
    for (let i = 0; i < 3; i++) await add('refunds', 'order:ready', { i });
    await add('refunds', 'order:later', { n: 9 }, { delayMs: 600_000 });
    await add('emails', 'user:1', { to: 'a@example.com' });
    for (const id of Object.values(ids).flat()) expect(id > BIG).toBe(true);

    // Every queue at a glance.
    const all = await cli(['--json']);
    expect(all.code, all.stderr).toBe(0);
    const stats = JSON.parse(all.stdout);
    expect(stats).toEqual([
      { queue: 'emails', jobs: 1, keys: 1, running: 0, dead: 0, oldestMs: expect.any(Number) },
      { queue: 'refunds', jobs: 8, keys: 5, running: 1, dead: 2, oldestMs: expect.any(Number) },
    ]);
    expect(stats[1].oldestMs).toBeGreaterThan(stats[0].oldestMs);
    const table = await cli([]);
    expect(table.code, table.stderr).toBe(0);
    const lines = table.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^QUEUE\s+JOBS\s+KEYS\s+RUNNING\s+DEAD\s+OLDEST$/);
    expect(lines[1]).toMatch(/^emails\s+1\s+1\s+0\s+0\s+(\d+ms|\d+\.\ds)$/);
    expect(lines[2]).toMatch(/^refunds\s+8\s+5\s+1\s+2\s+(\d+ms|\d+\.\ds|\dm\d+s)$/);
    expect(lines).toHaveLength(3);
  });

  it('one queue: its keys most behind first, as JSON (ids exact) and as a table', async () => {
    const r = await cli(['refunds', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const keys = JSON.parse(r.stdout) as KeyJson[];
    expect(keys.map((k) => [k.key, k.state, k.jobs, k.headId, k.attempts, k.holder])).toEqual([
      ['order:skip', 'dead', 2, String(ids['order:skip']?.[0]), 1, null],
      ['order:retry', 'dead', 1, String(ids['order:retry']?.[0]), 1, null],
      ['order:run', 'running', 1, String(ids['order:run']?.[0]), 1, 'cli-worker-1'],
      ['order:ready', 'ready', 3, String(ids['order:ready']?.[0]), 0, null],
      ['order:later', 'waiting', 1, String(ids['order:later']?.[0]), 0, null],
    ]);
    expect(r.stdout).toContain(`"headId": "${ids['order:skip']?.[0]}"`); // past 2^53, not rounded
    expect(keys[0]?.lastError).toBe(`Error: card declined\n${'x'.repeat(200)}`);
    expect(keys[3]?.lastError).toBe(null);
    for (let i = 1; i < keys.length; i++) expect(keys[i - 1]?.lagMs).toBeGreaterThanOrEqual(keys[i]?.lagMs ?? 0);

    const t = await cli(['refunds']);
    expect(t.code, t.stderr).toBe(0);
    const lines = t.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^queue "refunds": 8 jobs on 5 keys, 1 running, 2 dead, oldest \S+$/);
    expect(lines[1]).toBe('');
    expect(lines[2]).toMatch(/^KEY\s+STATE\s+JOBS\s+HEAD\s+ATTEMPTS\s+LAG\s+HOLDER\s+LAST ERROR$/);
    // The error on one line, cut to 60 characters.
    const error = `Error: card declined ${'x'.repeat(38)}…`;
    expect(lines[3]).toMatch(new RegExp(`^order:skip\\s+dead\\s+2\\s+${ids['order:skip']?.[0]}\\s+1\\s+\\S+\\s+-\\s+${error}$`));
    expect(lines[4]).toMatch(new RegExp(`^order:retry\\s+dead\\s+1\\s+${ids['order:retry']?.[0]}\\s+1\\s+\\S+\\s+-\\s+${error}$`));
    expect(lines[5]).toMatch(new RegExp(`^order:run\\s+running\\s+1\\s+${ids['order:run']?.[0]}\\s+1\\s+\\S+\\s+cli-worker-1\\s+-$`));
    expect(lines[6]).toMatch(new RegExp(`^order:ready\\s+ready\\s+3\\s+${ids['order:ready']?.[0]}\\s+0\\s+\\S+\\s+-\\s+-$`));
    expect(lines[7]).toMatch(new RegExp(`^order:later\\s+waiting\\s+1\\s+${ids['order:later']?.[0]}\\s+0\\s+\\S+\\s+-\\s+-$`));
    expect(lines).toHaveLength(8);
  });

  it('--dead and --limit', async () => {
    const [dead, deadOne, two, all, none, empty] = await Promise.all([
      cli(['refunds', '--dead', '--json']),
      cli(['refunds', '--dead', '--limit', '1']),
      cli(['refunds', '--limit', '2', '--json']),
      cli(['refunds', '--limit', '5']),
      cli(['emails', '--dead']),
      cli(['nosuch', '--json']),
    ]);
    expect(dead.code, dead.stderr).toBe(0);
    expect((JSON.parse(dead.stdout) as KeyJson[]).map((k) => k.key)).toEqual(['order:skip', 'order:retry']);
    expect(deadOne.code, deadOne.stderr).toBe(0);
    const deadLines = deadOne.stdout.trim().split('\n');
    expect(deadLines.slice(4)).toEqual(['(the 1 most behind of 2 dead keys: --limit to see more)']);
    expect(deadLines[3]).toMatch(/^order:skip\s+dead/);
    expect((JSON.parse(two.stdout) as KeyJson[]).map((k) => k.key)).toEqual(['order:skip', 'order:retry']);
    expect(all.stdout.trim().split('\n')).toHaveLength(8); // summary, blank, header, five keys
    expect(all.stdout).not.toContain('--limit to see more'); // five keys, five shown
    expect(none.stdout.trim().split('\n').at(-1)).toBe('no dead keys in queue "emails"');
    expect(JSON.parse(empty.stdout)).toEqual([]);
  });

  it('retry or skip of a head that is not dead: exit 1, one line saying what the head is', async () => {
    const cases: [string[], string][] = [
      [
        ['refunds', 'retry', 'order:ready'],
        `pgcoord: queue "refunds" key "order:ready" has job ${ids['order:ready']?.[0]} at its head and it is not dead: nothing to retry (\`pgcoord queue refunds --dead\` lists the dead keys)`,
      ],
      [
        ['refunds', 'skip', 'order:run'],
        `pgcoord: queue "refunds" key "order:run" has job ${ids['order:run']?.[0]} at its head and it is not dead: nothing to skip (\`pgcoord queue refunds --dead\` lists the dead keys)`,
      ],
      [
        ['refunds', 'skip', 'order:none'],
        'pgcoord: queue "refunds" key "order:none" has no queued jobs: nothing to skip (`pgcoord queue refunds --dead` lists the dead keys)',
      ],
      [
        ['emails', 'retry', 'order:skip'],
        'pgcoord: queue "emails" key "order:skip" has no queued jobs: nothing to retry (`pgcoord queue emails --dead` lists the dead keys)',
      ],
    ];
    const runs = await Promise.all(cases.map(([args]) => cli(args)));
    for (const [i, r] of runs.entries()) {
      const message = cases[i]?.[1];
      expect(r.code, r.stderr).toBe(1);
      oneLine(r);
      expect(r.stderr.trim()).toBe(message);
    }
    // Nothing changed.
    expect((await listQueueKeys(db.sql, 'refunds')).map((k) => [k.key, k.state])).toEqual([
      ['order:skip', 'dead'],
      ['order:retry', 'dead'],
      ['order:run', 'running'],
      ['order:ready', 'ready'],
      ['order:later', 'waiting'],
    ]);
  });

  it('skip drops the dead head and the key goes on; retry runs it again from attempt 1; both once', async () => {
    const skipped = await cli(['refunds', 'skip', 'order:skip']);
    expect(skipped.code, skipped.stderr).toBe(0);
    expect(skipped.stdout.trim()).toBe(
      `queue "refunds" key "order:skip": skipped dead job ${ids['order:skip']?.[0]}; the key goes on with its next job`,
    );
    const retried = await cli(['refunds', 'retry', 'order:retry']);
    expect(retried.code, retried.stderr).toBe(0);
    expect(retried.stdout.trim()).toBe(
      `queue "refunds" key "order:retry": dead job ${ids['order:retry']?.[0]} will run again (from attempt 1, before the key's later jobs)`,
    );
    const keys = await listQueueKeys(db.sql, 'refunds', { limit: 10 });
    expect(keys.find((k) => k.key === 'order:skip')).toMatchObject({
      state: 'ready',
      jobs: 1,
      headId: ids['order:skip']?.[1],
      attempts: 0,
    });
    expect(keys.find((k) => k.key === 'order:retry')).toMatchObject({
      state: 'ready',
      jobs: 1,
      headId: ids['order:retry']?.[0],
      attempts: 0,
    });
    expect((await queueStats(db.sql, 'refunds'))[0]).toMatchObject({ jobs: 7, dead: 0 });
    // A second time there is nothing dead left to act on.
    for (const action of ['skip', 'retry']) {
      const again = await cli(['refunds', action, action === 'skip' ? 'order:skip' : 'order:retry']);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/at its head and it is not dead: nothing to (skip|retry)/);
    }

    // Workers run what is left: the skipped job never, the retried one as attempt 1.
    release();
    const pool = db.newSql({ max: 4 });
    const finisher = work(
      pool,
      'refunds',
      (job: Job) => {
        ran.push({ key: job.key, id: job.id, attempt: job.attempt });
      },
      { concurrency: 4 },
    );
    workers.push(finisher);
    await until('the ready jobs to run', async () => (await queueStats(db.sql, 'refunds'))[0]?.jobs === 1);
    expect(ran.filter((j) => j.key === 'order:retry')).toEqual([{ key: 'order:retry', id: ids['order:retry']?.[0], attempt: 1 }]);
    expect(ran.filter((j) => j.key === 'order:skip')).toEqual([{ key: 'order:skip', id: ids['order:skip']?.[1], attempt: 1 }]);
    expect(ran.map((j) => j.id)).not.toContain(ids['order:skip']?.[0]);
    const left = await cli(['refunds', '--json']);
    expect((JSON.parse(left.stdout) as KeyJson[]).map((k) => [k.key, k.state])).toEqual([['order:later', 'waiting']]);
  });

  it('the table quotes keys and holders with control characters', () => {
    const lines = formatQueueKeys([
      { key: 'a\nb', state: 'running', jobs: 1, headId: 7n, attempts: 2, lastError: 'boom\n\tat x', lagMs: 1500, holder: 'h\tx' },
    ]).split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[1]).toMatch(/^"a\\nb"\s+running\s+1\s+7\s+2\s+1\.5s\s+"h\\tx"\s+boom at x$/);
  });
});
