// `pgcoord doctor` through the real CLI: each hazard is set up for real and detected (unpatched
// postgres.js 3.x, a standby, session locks behind a transaction-mode pooler), a patched 3.x, 4.x and
// a plain server show none; CockroachDB cannot run here, so only its pure detector is unit-tested.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { doctor as doctorApi, isCockroachVersion } from '../src/cli/api.js';
import { InvalidOptionError, migrateIdempotency } from '../src/index.js';
import { type EmbeddedServer, startEmbeddedPostgres } from '../src/testing/index.js';
import { ROOT, runCli } from './fixtures/cli-run.js';
import { PGBOUNCER_MISSING, pgbouncerSuite, startPgBouncer } from './fixtures/pgbouncer.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(2);
await migrateIdempotency(db.sql);

// App folders, each with a postgres.js 3.x in node_modules/postgres (where the patches' paths
// point): the repo's 3.4.9 (node_modules/postgres3) as installed, or with the pgcoord patch
// applied (git apply, as patch-package does). 3.4.10 is faked: the 3.4.9 files with the version
// set to 3.4.10 in package.json (the 3.4.10 patch applies to them as to the real 3.4.10, whose
// differences are elsewhere in connection.js); 3.4.8 likewise, a 3.x pgcoord has no patch for.
const apps = mkdtempSync(join(tmpdir(), 'pgcoord-doctor-'));
afterAll(() => rmSync(apps, { recursive: true, force: true }));
function app(name: string, version: string, patch: boolean): string {
  const dir = join(apps, name);
  mkdirSync(join(dir, 'node_modules'), { recursive: true });
  const pkg = join(dir, 'node_modules', 'postgres');
  cpSync(join(ROOT, 'node_modules', 'postgres3'), pkg, { recursive: true });
  const manifest = JSON.parse(readFileSync(join(pkg, 'package.json'), 'utf8')) as { version: string };
  writeFileSync(join(pkg, 'package.json'), JSON.stringify({ ...manifest, version }, null, 2));
  if (patch) execFileSync('git', ['apply', join(ROOT, 'patches', `postgres+${version}.patch`)], { cwd: dir });
  return dir;
}
const unpatched = app('unpatched-3.4.9', '3.4.9', false);
const patched = app('patched-3.4.9', '3.4.9', true);
const unpatched3410 = app('unpatched-3.4.10', '3.4.10', false);
const patched3410 = app('patched-3.4.10', '3.4.10', true);
const old348 = app('unpatched-3.4.8', '3.4.8', false);
// 4.x: the repo's own install (node_modules/postgres is 4.2.0)
const v4 = join(apps, 'v4');
mkdirSync(join(v4, 'node_modules'), { recursive: true });
cpSync(join(ROOT, 'node_modules', 'postgres'), join(v4, 'node_modules', 'postgres'), { recursive: true });
const v4Version = (JSON.parse(readFileSync(join(v4, 'node_modules', 'postgres', 'package.json'), 'utf8')) as { version: string }).version;

interface Report {
  findings: { id: string; severity: string; message: string; fix?: string }[];
  hazards: number;
}
const doctor = async (args: string[], env: Record<string, string | undefined> = {}) => {
  const r = await runCli(['doctor', '--json', ...args], { env });
  return { ...r, report: JSON.parse(r.stdout || '{"findings":[]}') as Report };
};
const hazards = (r: Report) => r.findings.filter((f) => f.severity === 'hazard').map((f) => f.id);

const noDb = { DATABASE_URL: undefined };

describe('pgcoord doctor', () => {
  it('postgres.js 3.4.9 unpatched is a hazard, with the fix: upgrade to 4.x (recommended) or apply the shipped patch (exit 1)', async () => {
    const r = await runCli(['doctor', '--project', unpatched, '--url', db.url]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stdout).toMatch(/^HAZARD postgres\.js 3\.4\.9 .*fixed in 4\.x.*pgcoord patch is not applied/m);
    expect(r.stdout).toMatch(
      /fix: upgrade to postgres\.js 4\.x \(recommended.*; or copy .*patches\/postgres\+3\.4\.9\.patch .*patch-package/,
    );
    expect(r.stdout).toMatch(/^OK {5}one connection keeps its backend/m);
    expect(r.stdout.trim().split('\n').at(-1)).toBe('1 hazard found');
  });

  it('postgres.js 3.4.10 unpatched is a hazard too (it has the same bugs), pointing at the 3.4.10 patch', async () => {
    const r = await doctor(['--project', unpatched3410], noDb);
    expect(r.code, r.stderr).toBe(1);
    expect(hazards(r.report)).toEqual(['postgres-js-unpatched']);
    const finding = r.report.findings.find((f) => f.id === 'postgres-js-unpatched')!;
    expect(finding.message).toMatch(
      /^postgres\.js 3\.4\.10 .*not applied \(src\/connection\.js, src\/index\.js, cjs\/src\/connection\.js, cjs\/src\/index\.js\)$/,
    );
    expect(finding.fix).toMatch(
      /^upgrade to postgres\.js 4\.x .*; or copy \S*patches\/postgres\+3\.4\.10\.patch into your app's patches\/ folder/,
    );
  });

  it('a 3.x pgcoord ships no patch for is a hazard whose fix is 4.x, or 3.4.10 with its patch', async () => {
    const r = await doctor(['--project', old348], noDb);
    expect(r.code, r.stderr).toBe(1);
    expect(r.report.findings.find((f) => f.id === 'postgres-js-unpatched')?.fix).toMatch(
      /^upgrade to postgres\.js 4\.x .*; or pin postgres\.js 3\.4\.10 and copy \S*patches\/postgres\+3\.4\.10\.patch /,
    );
  });

  it('postgres.js 3.4.9 and 3.4.10 with the pgcoord patch, and 4.x without one, are ok (exit 0)', async () => {
    for (const [dir, message] of [
      [patched, 'postgres.js 3.4.9 with the pgcoord patch'],
      [patched3410, 'postgres.js 3.4.10 with the pgcoord patch'],
      [v4, `postgres.js ${v4Version}: no patch needed (4.x has the fixes)`],
    ] as const) {
      const r = await doctor(['--project', dir], noDb);
      expect(r.code, r.stderr + r.stdout).toBe(0);
      expect(r.report.findings).toContainEqual({ id: 'postgres-js', severity: 'ok', message });
    }
    expect(v4Version).toMatch(/^4\./);
  });

  it("the repo's own install (postgres.js 4.x) needs no patch", async () => {
    const r = await runCli(['doctor', '--url', db.url]);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout).toMatch(/^OK {5}postgres\.js 4\.\d+\.\d+: no patch needed/m);
  });

  it('doctor() given something other than an options object throws InvalidOptionError', async () => {
    await expect(doctorApi(null as never)).rejects.toBeInstanceOf(InvalidOptionError);
    await expect(doctorApi('.' as never)).rejects.toMatchObject({ code: 'PGCOORD_INVALID_OPTION' });
    await expect(doctorApi({ project: 42 as never })).rejects.toMatchObject({ code: 'PGCOORD_INVALID_OPTION' });
    const report = await doctorApi({ project: patched3410 });
    expect(report).toMatchObject({ hazards: 0 });
  });

  it('a patched copy and a plain primary: no hazard (exit 0), settings reported', async () => {
    await db.sql.unsafe(`alter database "${new URL(db.url).pathname.slice(1)}" set idle_in_transaction_session_timeout = '5s'`);
    const r = await doctor(['--project', patched, '--url', db.url]);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(hazards(r.report)).toEqual([]);
    expect(r.report.findings).toContainEqual({ id: 'postgres-js', severity: 'ok', message: 'postgres.js 3.4.9 with the pgcoord patch' });
    expect(r.report.findings.find((f) => f.id === 'idempotency-table')?.severity).toBe('ok');
    expect(r.report.findings.find((f) => f.id === 'idle_in_transaction_session_timeout')?.message).toMatch(/= 5s: /);
    expect(r.report.findings.find((f) => f.id === 'lock_timeout')?.message).toMatch(/= 0 \(off\)/);
  });

  it('a missing or outdated idempotency table is a warning, not a hazard', async () => {
    const missing = await doctor(['--project', patched, '--url', db.url, '--schema', 'nowhere']);
    expect(missing.code).toBe(0);
    expect(missing.report.findings.find((f) => f.id === 'idempotency-table')).toMatchObject({
      severity: 'warning',
      message: /does not exist/,
    });
    await migrateIdempotency(db.sql, { schema: 'old', table: 'idem' });
    await db.sql`alter table old.idem drop column attempts`;
    const outdated = await doctor(['--project', patched, '--url', db.url, '--schema', 'old', '--table', 'idem']);
    expect(outdated.report.findings.find((f) => f.id === 'idempotency-table')).toMatchObject({
      severity: 'warning',
      message: /pending migration \(missing column attempts\)/,
    });
  });

  it('without a database only the drivers are checked', async () => {
    const r = await runCli(['doctor', '--project', patched], { env: { DATABASE_URL: undefined } });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^SKIP {3}no database/m);
  });

  describe('server hazards', () => {
    let standby: EmbeddedServer;
    beforeAll(async () => {
      standby = await startEmbeddedPostgres({ standby: true });
    });
    afterAll(async () => {
      await standby?.stop();
    });

    it('a standby (pg_is_in_recovery) is a hazard', async () => {
      const r = await doctor(['--project', patched, '--url', standby.url]);
      expect(r.code, r.stderr).toBe(1);
      expect(hazards(r.report)).toEqual(['standby']);
      expect(r.report.findings.find((f) => f.id === 'standby')?.fix).toMatch(/primary/);
    });

    // A real PgBouncer (pool_mode = transaction, its defaults otherwise) in front of the test database.
    describe.skipIf(PGBOUNCER_MISSING !== undefined)(pgbouncerSuite('behind PgBouncer'), () => {
      it('session locks behind a transaction-mode pooler are a hazard', async () => {
        const bouncer = await startPgBouncer(db.url);
        try {
          const r = await doctor(['--project', patched, '--url', bouncer.url(db.url)]);
          expect(r.code, r.stderr).toBe(1);
          expect(hazards(r.report)).toEqual(['transaction-pooler']);
          expect(r.report.findings.find((f) => f.id === 'transaction-pooler')?.message).toMatch(/ran on backends \d+, \d+/);
          expect(await bouncer.servers(new URL(db.url).pathname.slice(1))).toBeGreaterThan(1);
        } finally {
          await bouncer.stop();
        }
      });
    });
  });

  it('CockroachDB is recognised from version() (pure function; CockroachDB cannot run in this sandbox)', () => {
    expect(isCockroachVersion('CockroachDB CCL v23.1.11 (x86_64-pc-linux-gnu, built 2023/09/27 01:53:43, go1.19.10)')).toBe(true);
    expect(isCockroachVersion('PostgreSQL 15.20 (Debian 15.20-0+deb12u1) on x86_64-pc-linux-gnu')).toBe(false);
  });
});
