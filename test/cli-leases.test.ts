// `pgcoord leases` through the real CLI, on rows written by hand: held and free leases with their
// holder labels, fences (past 2^53: exact in JSON as decimal strings) and time left on the database
// clock, as JSON and as a table; a clear error before migrateLeases(). And pgcoord.check_fence, the
// function pgcoord's fenced writes call: true for the current term, SQLSTATE PGF01 otherwise, and a
// takeover waits for a transaction that passed it.
import { describe, expect, it } from 'vitest';
import { formatLeases, type LeaseInfo, listLeases } from '../src/cli/api.js';
import { LeasesNotMigratedError, migrateLeases, sqlState } from '../src/index.js';
import { runCli } from './fixtures/cli-run.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(3);
const BIG = 9007199254740993n; // 2^53 + 1: not a float64

interface LeaseJson {
  name: string;
  state: string;
  holder: string | null;
  fence: string;
  expiresInMs: number;
  expiresAt: string;
  acquiredAt: string;
  renewedAt: string;
}

describe('pgcoord leases before migrateLeases()', () => {
  it('says the table is missing: a typed error from code, exit 1 and one line from the command', async () => {
    await expect(listLeases(db.sql)).rejects.toBeInstanceOf(LeasesNotMigratedError);
    await expect(listLeases(db.pool)).rejects.toBeInstanceOf(LeasesNotMigratedError);
    const r = await runCli(['leases', '--url', db.url]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^pgcoord: pgcoord\.leases does not exist: run migrateLeases\(\)/);
  });

  it('an empty table after migrateLeases()', async () => {
    await migrateLeases(db.sql);
    expect(await listLeases(db.sql)).toEqual([]);
    const json = await runCli(['leases', '--url', db.url, '--json']);
    expect(json.code, json.stderr).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual([]);
    const text = await runCli(['leases'], { env: { DATABASE_URL: db.url } });
    expect(text.stdout.trim()).toBe('no leases in pgcoord.leases');
    expect(formatLeases([])).toBe('no leases in pgcoord.leases');
  });
});

describe('pgcoord leases', () => {
  it('rows by hand: held and free, --json and the table', async () => {
    await db.sql`insert into pgcoord.leases (name, fence, holder, holder_label, acquired_at, renewed_at, expires_at) values
      ('report:daily', ${String(BIG)}::bigint, gen_random_uuid(), 'worker-1', clock_timestamp() - interval '5 minutes',
        clock_timestamp() - interval '1 second', clock_timestamp() + interval '60 seconds'),
      ('cleanup', 7, null, 'worker-2', clock_timestamp() - interval '1 hour', clock_timestamp() - interval '10 minutes',
        clock_timestamp() - interval '90 seconds'),
      ('unlabelled', 8, gen_random_uuid(), null, clock_timestamp() - interval '2 minutes', clock_timestamp() - interval '2 minutes',
        clock_timestamp() - interval '1 minute')`;

    const r = await runCli(['leases', '--url', db.url, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const list = JSON.parse(r.stdout) as LeaseJson[];
    expect(list.map((l) => l.name)).toEqual(['cleanup', 'report:daily', 'unlabelled']);
    const [cleanup, report, unlabelled] = list;
    expect(report).toMatchObject({ name: 'report:daily', state: 'held', holder: 'worker-1', fence: '9007199254740993' });
    expect(r.stdout).toContain('"fence": "9007199254740993"');
    expect(report?.expiresInMs).toBeGreaterThan(20_000);
    expect(report?.expiresInMs).toBeLessThanOrEqual(60_000);
    expect(Date.parse(report?.expiresAt ?? '') - Date.parse(report?.renewedAt ?? '')).toBeGreaterThan(60_000);
    expect(Date.parse(report?.renewedAt ?? '') - Date.parse(report?.acquiredAt ?? '')).toBeGreaterThan(4 * 60_000);
    expect(cleanup).toMatchObject({ state: 'free', holder: 'worker-2', fence: '7' });
    expect(cleanup?.expiresInMs).toBeLessThanOrEqual(-90_000);
    expect(cleanup?.expiresInMs).toBeGreaterThan(-130_000);
    expect(unlabelled).toMatchObject({ state: 'free', holder: null, fence: '8' });

    const t = await runCli(['leases'], { env: { DATABASE_URL: db.url } });
    expect(t.code, t.stderr).toBe(0);
    const lines = t.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^NAME\s+STATE\s+HOLDER\s+FENCE\s+EXPIRES IN$/);
    expect(lines[1]).toMatch(/^cleanup\s+free\s+worker-2\s+7\s+ended 1m\d+s ago$/);
    expect(lines[2]).toMatch(/^report:daily\s+held\s+worker-1\s+9007199254740993\s+[2-5]\d\.\ds$/);
    expect(lines[3]).toMatch(/^unlabelled\s+free\s+-\s+8\s+ended 1m\d+s ago$/);
  });

  it('listLeases() from code, through every runner kind: fences are bigints', async () => {
    for (const kind of db.runners) {
      const list = await kind.use((runner) => listLeases(runner as never));
      expect(
        list.map((l) => [l.name, l.state, l.fence]),
        kind.name,
      ).toEqual([
        ['cleanup', 'free', 7n],
        ['report:daily', 'held', BIG],
        ['unlabelled', 'free', 8n],
      ]);
      const report = list[1] as LeaseInfo;
      expect(typeof report.fence).toBe('bigint');
      expect(report.expiresInMs, kind.name).toBeGreaterThan(0);
      expect(new Date(report.expiresAt).getTime()).toBeGreaterThan(Date.now() - 5_000);
    }
  });

  it('names and labels with line breaks are quoted in the table', () => {
    const line = formatLeases([
      {
        name: 'a\nb',
        state: 'held',
        holder: 'x\ty',
        fence: 1n,
        expiresInMs: 1500,
        expiresAt: '',
        acquiredAt: '',
        renewedAt: '',
      },
    ]).split('\n');
    expect(line).toHaveLength(2);
    expect(line[1]).toMatch(/^"a\\nb"\s+held\s+"x\\ty"\s+1\s+1\.5s$/);
  });
});

describe('pgcoord.check_fence', () => {
  const check = (name: string, fence: bigint | number) => db.sql`select pgcoord.check_fence(${name}, ${String(fence)}::bigint) as ok`;
  const refused = async (name: string, fence: bigint | number) => {
    const err = await check(name, fence).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(sqlState(err), `${name} ${fence}`).toBe('PGF01');
    expect((err as Error).message).toBe(`pgcoord: lease ${name} fence ${fence} is not the current term`);
  };

  it('true for the current term; PGF01 for a stale fence, an expired lease and a missing name', async () => {
    expect((await check('report:daily', BIG))[0]?.ok).toBe(true);
    await refused('report:daily', BIG - 1n); // an earlier term
    await refused('report:daily', BIG + 1n); // not handed out
    await refused('cleanup', 7); // its fence, but the term ended
    await refused('unlabelled', 8);
    await refused('missing', 1);
    // Through node-postgres too (the SQLSTATE is what drivers report).
    const err = await db.pool.query('select pgcoord.check_fence($1, $2::bigint)', ['cleanup', '7']).catch((e: unknown) => e);
    expect(sqlState(err)).toBe('PGF01');
  });

  it('FOR SHARE: a takeover waits for a transaction that passed the check; after it, the old fence is refused', async () => {
    const other = db.newSql({ max: 1 });
    const takeover = () =>
      other.begin(async (tx) => {
        await tx`set local lock_timeout = '300ms'`;
        return tx`update pgcoord.leases set fence = ${String(BIG + 1n)}::bigint where name = 'report:daily' returning fence`;
      });
    await db.sql.begin(async (tx) => {
      expect((await tx`select pgcoord.check_fence('report:daily', ${String(BIG)}::bigint) as ok`)[0]?.ok).toBe(true);
      const blocked = await takeover().catch((e: unknown) => e);
      expect(sqlState(blocked)).toBe('55P03'); // lock_not_available: the fenced transaction holds the row
    });
    expect(await takeover()).toHaveLength(1);
    await refused('report:daily', BIG);
    expect((await check('report:daily', BIG + 1n))[0]?.ok).toBe(true);
  });
});
