// `pgcoord doctor` through the real CLI: each hazard is set up for real and detected (unpatched
// postgres.js, a standby, session locks behind a transaction-mode pooler), a patched driver and a
// plain server show none; CockroachDB cannot run here, so only its pure detector is unit-tested.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isCockroachVersion, migrateIdempotency } from '../src/index.js';
import { type EmbeddedServer, startEmbeddedPostgres } from '../src/testing/index.js';
import { startTransactionPooler, type TestPooler } from './fixtures/cli-pooler.js';
import { ROOT, runCli } from './fixtures/cli-run.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(2);
await migrateIdempotency(db.sql);

// An app folder whose postgres.js 3.4.9 carries the pgcoord patch (applied with git apply).
const patched = mkdtempSync(join(tmpdir(), 'pgcoord-doctor-'));
mkdirSync(join(patched, 'node_modules'));
cpSync(join(ROOT, 'node_modules', 'postgres'), join(patched, 'node_modules', 'postgres'), { recursive: true });
execFileSync('git', ['apply', join(ROOT, 'patches', 'postgres+3.4.9.patch')], { cwd: patched });
afterAll(() => rmSync(patched, { recursive: true, force: true }));

interface Report {
  findings: { id: string; severity: string; message: string; fix?: string }[];
  hazards: number;
}
const doctor = async (args: string[], env: Record<string, string | undefined> = {}) => {
  const r = await runCli(['doctor', '--json', ...args], { env });
  return { ...r, report: JSON.parse(r.stdout || '{"findings":[]}') as Report };
};
const hazards = (r: Report) => r.findings.filter((f) => f.severity === 'hazard').map((f) => f.id);

describe('pgcoord doctor', () => {
  it('the repo install of postgres.js 3.4.9 is unpatched: a hazard, with how to apply the patch (exit 1)', async () => {
    const r = await runCli(['doctor', '--url', db.url]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stdout).toMatch(/^HAZARD postgres\.js 3\.4\.9 .*pgcoord patch is not applied/m);
    expect(r.stdout).toMatch(/fix: copy .*patches\/postgres\+3\.4\.9\.patch .*patch-package/);
    expect(r.stdout).toMatch(/^OK {5}one connection keeps its backend/m);
    expect(r.stdout.trim().split('\n').at(-1)).toBe('1 hazard found');
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
    let pooler: TestPooler;
    beforeAll(async () => {
      [standby, pooler] = await Promise.all([
        startEmbeddedPostgres({ standby: true }),
        startTransactionPooler({ host: new URL(db.url).hostname, port: Number(new URL(db.url).port || 5432) }),
      ]);
    });
    afterAll(async () => {
      await Promise.all([standby?.stop(), pooler?.close()]);
    });

    it('a standby (pg_is_in_recovery) is a hazard', async () => {
      const r = await doctor(['--project', patched, '--url', standby.url]);
      expect(r.code, r.stderr).toBe(1);
      expect(hazards(r.report)).toEqual(['standby']);
      expect(r.report.findings.find((f) => f.id === 'standby')?.fix).toMatch(/primary/);
    });

    it('session locks behind a transaction-mode pooler are a hazard', async () => {
      const url = new URL(db.url);
      url.host = `127.0.0.1:${pooler.port}`;
      const r = await doctor(['--project', patched, '--url', url.toString()]);
      expect(r.code, r.stderr).toBe(1);
      expect(hazards(r.report)).toEqual(['transaction-pooler']);
      expect(r.report.findings.find((f) => f.id === 'transaction-pooler')?.message).toMatch(/ran on backends \d+, \d+/);
      expect(pooler.upstreams()).toBeGreaterThan(1);
    });
  });

  it('CockroachDB is recognised from version() (pure function; CockroachDB cannot run in this sandbox)', () => {
    expect(isCockroachVersion('CockroachDB CCL v23.1.11 (x86_64-pc-linux-gnu, built 2023/09/27 01:53:43, go1.19.10)')).toBe(true);
    expect(isCockroachVersion('PostgreSQL 15.20 (Debian 15.20-0+deb12u1) on x86_64-pc-linux-gnu')).toBe(false);
  });
});
