// The shipped migration is drizzle-kit's output for the schema module, and renaming it for other
// names gives exactly what drizzle-kit generates for those names.
import { pgSchema } from 'drizzle-orm/pg-core';
import { describe, expect, it } from 'vitest';
import { idempotencyMigrations, idempotencySql, idempotencyTable } from '../src/idempotency/index.js';

async function generated(schema: string, table: string): Promise<string[]> {
  const { generateDrizzleJson, generateMigration } = await import('drizzle-kit/api');
  const t = idempotencyTable({ schema, table });
  const before = generateDrizzleJson({});
  const after = generateDrizzleJson({ s: pgSchema(schema), t });
  return (await generateMigration(before, after)).map((s) => s.trim().replace(/CREATE SCHEMA "/, 'CREATE SCHEMA IF NOT EXISTS "'));
}

describe('idempotency schema and migrations', () => {
  it('the shipped migration matches drizzle-kit for the default names', async () => {
    const shipped = idempotencyMigrations().flatMap((m) => m.statements);
    expect(shipped).toEqual(await generated('pgcoord', 'idempotency_keys'));
  });

  it('renamed for other names, it matches drizzle-kit for those names', async () => {
    const shipped = idempotencyMigrations({ schema: 'billing', table: 'idem' }).flatMap((m) => m.statements);
    expect(shipped).toEqual(await generated('billing', 'idem'));
    expect(idempotencySql({ schema: 'billing', table: 'idem' })).toContain('CREATE TABLE "billing"."idem"');
    expect(idempotencySql({ schema: 'billing', table: 'idem' })).not.toMatch(/UNLOGGED|pgcoord|idempotency_keys/i);
  });

  it('refuses names that are not plain identifiers', () => {
    expect(() => idempotencyTable({ table: 'a"b' })).toThrow(/table name/);
    expect(() => idempotencyTable({ schema: 'X' })).toThrow(/schema name/);
  });
});
