// The shipped lease migration is drizzle-kit's output for src/lease/schema.ts (the exported
// `leases`, `leaseFence` and `singletonRuns`), plus the check_fence function drizzle-kit does not
// model; migrateLeases applies it once, however many deploys race.
import { describe, expect, it } from 'vitest';
import { flightValues, leaseFence, leaseMigrations, leaseSql, leases, migrateLeases, singletonRuns } from '../src/index.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(8);

describe('lease schema and migrations', () => {
  it('the shipped migration is what drizzle-kit generates for the exported tables, then check_fence', async () => {
    const { generateDrizzleJson, generateMigration } = await import('drizzle-kit/api');
    const expected = (
      await generateMigration(generateDrizzleJson({}), generateDrizzleJson({ leases, leaseFence, singletonRuns, flightValues }))
    ).map((s) => s.trim());
    const shipped = leaseMigrations().flatMap((m) => m.statements);
    const functions = shipped.filter((s) => s.startsWith('CREATE FUNCTION'));
    expect(shipped.filter((s) => !s.startsWith('CREATE FUNCTION'))).toEqual(expected);
    expect(functions).toHaveLength(1);
    expect(functions[0]).toMatch(/^CREATE FUNCTION "pgcoord"\."check_fence"/);
    expect(leaseSql()).toContain('CREATE TABLE "pgcoord"."leases"');
  });

  it('six deploys at once: applied once, the others skip', async () => {
    const results = await Promise.all(Array.from({ length: 6 }, (_, i) => migrateLeases(i % 2 ? db.sql : db.pool)));
    expect(results.filter((r) => r.applied.length === 2)).toHaveLength(1);
    expect(results.filter((r) => r.skipped.length === 2)).toHaveLength(5);
    const [row] = await db.sql`select count(*)::int as n from pgcoord.__migrations where target = 'leases:pgcoord'`;
    expect(row?.n).toBe(2);
  });
});
