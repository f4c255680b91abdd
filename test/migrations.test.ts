// Migrations per capability (src/migrations.ts): migrate() applies only the idempotency table's
// migration and records it as it always did (same target, id and hash as the released file), the
// lease migrations go under their own target, concurrent deploys apply each once, an applied
// migration whose shipped file changed is refused per capability, and leaseSql() works on a
// database without the pgcoord schema.
import { afterAll, describe, expect, inject, it } from 'vitest';
import {
  IdempotencyMigrationError,
  idempotencyMigrations,
  idempotencySql,
  LeaseMigrationError,
  LimitMigrationError,
  leaseMigrations,
  leaseSql,
  migrateIdempotency,
  migrateLeases,
  migrateLimits,
  sqlState,
} from '../src/index.js';
import { createTestDatabase } from '../src/testing/index.js';
import { useTestDb } from './helpers.js';
import postgres from './pgjs.js';

const db = await useTestDb(8);
// sha256 of drizzle/0000_idempotency_keys.sql as released before leases existed: databases
// migrated then hold this hash, and must keep being accepted.
const RELEASED_IDEMPOTENCY_HASH = '2e2e0e5dd0dcd04c91e849ebe8d5ff337338acde0695aba8cdfbffce95c6b7e3';

const rows = async () =>
  (await db.sql`select target, id, hash from pgcoord.__migrations order by target, id`).map((r) => `${r.target} ${r.id} ${r.hash}`);

describe('migrations per capability', () => {
  it('the idempotency migrations are the idempotency table alone, as released', () => {
    expect(idempotencyMigrations().map((m) => [m.id, m.hash])).toEqual([['0000_idempotency_keys', RELEASED_IDEMPOTENCY_HASH]]);
    expect(idempotencySql()).not.toMatch(/leases|lease_fence|check_fence|singleton_runs|rate_limits/);
    const ids = leaseMigrations().map((m) => m.id);
    expect(ids[0]).toBe('0001_leases');
    expect(ids.every((id) => id.endsWith('_leases'))).toBe(true);
  });

  it('six concurrent deploys of each: every migration applied once, under its own target', async () => {
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) => (i % 2 ? migrateLeases : migrateIdempotency)(i % 4 < 2 ? db.sql : db.pool)),
    );
    const leaseIds = leaseMigrations().map((m) => m.id);
    const leaseResults = results.filter((_, i) => i % 2);
    const idemResults = results.filter((_, i) => i % 2 === 0);
    expect(leaseResults.filter((r) => r.applied.length > 0).map((r) => r.applied)).toEqual([leaseIds]);
    expect(leaseResults.filter((r) => r.applied.length === 0).map((r) => r.skipped)).toEqual(Array(5).fill(leaseIds));
    expect(idemResults.flatMap((r) => r.applied)).toEqual(['0000_idempotency_keys']);
    expect(await rows()).toEqual([
      `idempotency:pgcoord.idempotency_keys 0000_idempotency_keys ${RELEASED_IDEMPOTENCY_HASH}`,
      ...leaseMigrations().map((m) => `leases:pgcoord ${m.id} ${m.hash}`),
    ]);
    const [fn] = await db.sql`select to_regprocedure('pgcoord.check_fence(text,bigint)')::text as f`;
    expect(fn?.f).toBe('pgcoord.check_fence(text,bigint)');
  });

  it('an applied migration whose shipped file changed is refused, for its own capability only', async () => {
    await db.sql`update pgcoord.__migrations set hash = 'edited' where target = 'leases:pgcoord' and id = '0001_leases'`;
    const lease = await migrateLeases(db.sql).catch((e: unknown) => e);
    expect(lease).toBeInstanceOf(LeaseMigrationError);
    expect((lease as Error).message).toMatch(/migration 0001_leases of leases:pgcoord was applied with a different content/);
    expect((await migrateIdempotency(db.sql)).skipped).toEqual(['0000_idempotency_keys']);
    await db.sql`update pgcoord.__migrations set hash = 'edited' where target = 'idempotency:pgcoord.idempotency_keys'`;
    await expect(migrateIdempotency(db.sql)).rejects.toBeInstanceOf(IdempotencyMigrationError);
    await migrateLimits(db.sql);
    await db.sql`update pgcoord.__migrations set hash = 'edited' where target = 'limits:pgcoord'`;
    await expect(migrateLimits(db.sql)).rejects.toMatchObject({ name: 'LimitMigrationError', code: 'PGCOORD_LIMIT_MIGRATION' });
    await expect(migrateLimits(db.sql)).rejects.toBeInstanceOf(LimitMigrationError);
  });
});

describe('leaseSql()', () => {
  const created: { drop(): Promise<void> }[] = [];
  afterAll(async () => {
    await Promise.all(created.map((d) => d.drop()));
  });

  it('creates the pgcoord schema and the lease objects on a database without them (psql -f style)', async () => {
    const fresh = await createTestDatabase(inject('databaseUrl'), 'pgcoord_leasesql');
    created.push(fresh);
    const sql = postgres(fresh.url, { max: 1, onnotice: () => {} });
    try {
      await sql.unsafe(leaseSql());
      await sql`insert into pgcoord.leases (name, fence, holder, acquired_at, renewed_at, expires_at)
        values ('x', nextval('pgcoord.lease_fence'), gen_random_uuid(), now(), now(), clock_timestamp() + interval '1 minute')`;
      expect((await sql`select pgcoord.check_fence('x', 1) as ok`)[0]?.ok).toBe(true);
      const err = await sql`select pgcoord.check_fence('x', 2)`.catch((e: unknown) => e);
      expect(sqlState(err)).toBe('PGF01');
    } finally {
      await sql.end({ timeout: 1 });
    }
  });
});
