// `pgcoord purge` through the real CLI: --dry-run counts without deleting; purge deletes exactly
// the expired rows (never a running attempt whose lease is live), in batches, with progress.
import { describe, expect, it } from 'vitest';
import { migrateIdempotency } from '../src/index.js';
import { runCli } from './fixtures/cli-run.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(2);
await migrateIdempotency(db.sql, { schema: 'ops', table: 'idem' });

async function seed() {
  await db.sql`truncate ops.idem`;
  // 25 completed rows past retention, 5 still retained, 2 running with a live lease but past
  // retention (kept), 3 running with a dead lease past retention (purged).
  const insert = (prefix: string, n: number, state: string, lease: string | null, expires: string) =>
    db.sql.unsafe(
      `insert into ops.idem (scope, key, fingerprint, fingerprint_version, state, lease_token, lease_expires_at, response_status, response_body, expires_at)
       select 's', '${prefix}-' || i, '\\x00'::bytea, 1, '${state}', ${lease ? 'gen_random_uuid()' : 'null'}, ${lease ?? 'null'},
         ${state === 'completed' ? "200, '\\x7b7d'::bytea" : 'null, null'}, ${expires} from generate_series(1, ${n}) i`,
    );
  await insert('old', 25, 'completed', null, "now() - interval '1 hour'");
  await insert('new', 5, 'completed', null, "now() + interval '1 hour'");
  await insert('live', 2, 'running', "now() + interval '1 hour'", "now() - interval '1 hour'");
  await insert('dead', 3, 'running', "now() - interval '1 minute'", "now() - interval '1 hour'");
}

const keys = async () => (await db.sql`select key from ops.idem order by key`).map((r) => String(r.key));

describe('pgcoord purge', () => {
  it('--dry-run counts the expired rows and deletes nothing; purge deletes exactly them', async () => {
    await seed();
    const before = await keys();
    const dry = await runCli(['purge', '--url', db.url, '--schema', 'ops', '--table', 'idem', '--dry-run']);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout.trim()).toBe('dry run: 28 of 35 rows in ops.idem are expired and would be deleted');
    expect(await keys()).toEqual(before);

    const run = await runCli(['purge', '--schema', 'ops', '--table', 'idem', '--batch-size', '10'], { env: { DATABASE_URL: db.url } });
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout.trim()).toBe('deleted 28 expired rows from ops.idem in 3 batches');
    expect(run.stderr.trim().split('\n')).toEqual(['batch 1: 10 of 28 deleted', 'batch 2: 20 of 28 deleted', 'batch 3: 28 of 28 deleted']);
    expect(await keys()).toEqual(before.filter((k) => k.startsWith('new-') || k.startsWith('live-')));
  });

  it('--max-batches bounds a run; --json for machines', async () => {
    await seed();
    const r = await runCli([
      'purge',
      '--url',
      db.url,
      '--schema',
      'ops',
      '--table',
      'idem',
      '--batch-size',
      '4',
      '--max-batches',
      '2',
      '--json',
    ]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ expired: 28, total: 35, deleted: 8, batches: 2, dryRun: false });
    expect(await keys()).toHaveLength(27);
  });

  it('a missing table fails with exit 1 and one line; bad options exit 2', async () => {
    const missing = await runCli(['purge', '--url', db.url]);
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    expect(missing.stderr).toMatch(/^pgcoord: .*pgcoord\.idempotency_keys/);
    expect((await runCli(['purge', '--url', db.url, '--batch-size', '0'])).code).toBe(2);
    expect((await runCli(['purge', '--url', db.url, '--table', 'a;b'])).code).toBe(2);
  });
});
