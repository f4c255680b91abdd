// The idempotency table, as a drizzle table factory. Importable on its own (no side effects, no
// database access): drizzle-kit reads it to generate the migrations shipped in `drizzle/`, and a
// CLI can call `idempotencyTable({ schema, table })` for other names.

import { sql } from 'drizzle-orm';
import {
  check,
  customType,
  index,
  integer,
  jsonb,
  pgSchema,
  pgTable,
  primaryKey,
  smallint,
  text,
  timestamp,
  uuid,
} from 'drizzle-orm/pg-core';

/** Exact bytes (request fingerprints, response bodies). */
const bytea = customType<{ data: Buffer; driverData: Buffer }>({
  dataType: () => 'bytea',
});

/** Where the idempotency table lives. Defaults: schema `pgcoord`, table `idempotency_keys`. */
export interface IdempotencyTableNames {
  schema?: string;
  table?: string;
}

export const DEFAULT_SCHEMA = 'pgcoord';
export const DEFAULT_TABLE = 'idempotency_keys';

/** The states a key can be in. `failed_retryable`: the last attempt failed and may be retried at once. */
export const IDEMPOTENCY_STATES = ['running', 'completed', 'failed_retryable'] as const;
export type IdempotencyState = (typeof IDEMPOTENCY_STATES)[number];

const IDENT = /^[a-z_][a-z0-9_]*$/;

/**
 * Check a schema or table name: lower-case letters, digits and `_`, not starting with a digit, and
 * short enough that the derived index and constraint names (`<table>_running_lease_idx`) fit in
 * Postgres's 63 bytes. Returns the name.
 */
export function checkIdentifier(name: unknown, what: 'schema' | 'table'): string {
  const max = what === 'table' ? 40 : 63;
  if (typeof name !== 'string' || !IDENT.test(name) || name.length > max) {
    // A plain Error here keeps this module free of imports from the rest of pgcoord; callers map it.
    throw new TypeError(`idempotency ${what} name must match ${IDENT} and be at most ${max} characters, got ${JSON.stringify(name)}`);
  }
  return name;
}

/**
 * The idempotency table for the given names, as a drizzle `pgTable` (rows typed for drizzle
 * queries). Every column below is written only by pgcoord's statements in `run.ts`.
 *
 * @example
 * import { idempotencyTable } from 'pgcoord';
 * export const idem = idempotencyTable({ schema: 'billing', table: 'idempotency_keys' }); // for drizzle-kit
 */
export function idempotencyTable(names: IdempotencyTableNames = {}) {
  const schemaName = checkIdentifier(names.schema ?? DEFAULT_SCHEMA, 'schema');
  const tableName = checkIdentifier(names.table ?? DEFAULT_TABLE, 'table');
  const columns = {
    /** Tenant / user / API client: a key under one scope never sees another scope's row. */
    scope: text('scope').notNull(),
    /** The client's idempotency key. */
    key: text('key').notNull(),
    /** SHA-256 of the canonical request (see fingerprint.ts). */
    fingerprint: bytea('fingerprint').notNull(),
    fingerprintVersion: smallint('fingerprint_version').notNull(),
    state: text('state').$type<IdempotencyState>().notNull(),
    /** Fencing token of the attempt that holds the row; every write after the claim checks it. */
    leaseToken: uuid('lease_token'),
    /** A running row whose lease is past may be taken over by a retry. Database clock. */
    leaseExpiresAt: timestamp('lease_expires_at', { withTimezone: true }),
    /** Last committed phase (phased mode); `started` before any. */
    recoveryPoint: text('recovery_point').notNull().default('started'),
    /** Results of the committed phases, by phase name (phased mode). */
    recoveryData: jsonb('recovery_data').notNull().default({}),
    responseStatus: smallint('response_status'),
    /** Allow-listed response headers only (never Set-Cookie). */
    responseHeaders: jsonb('response_headers').$type<Record<string, string>>(),
    /** The exact response body bytes. */
    responseBody: bytea('response_body'),
    createdAt: timestamp('created_at', { withTimezone: true }).notNull().default(sql`now()`),
    updatedAt: timestamp('updated_at', { withTimezone: true }).notNull().default(sql`now()`),
    /** Retention: after this the row may be purged and the key reused. Separate from the lease. */
    expiresAt: timestamp('expires_at', { withTimezone: true }).notNull(),
    attempts: integer('attempts').notNull().default(1),
  };
  const extras = (t: Record<keyof typeof columns, { name: string }> & Record<string, unknown>) => [
    primaryKey({ name: `${tableName}_pkey`, columns: [t.scope as never, t.key as never] }),
    check(`${tableName}_state_check`, sql`${t.state} in ('running', 'completed', 'failed_retryable')`),
    check(
      `${tableName}_running_lease_check`,
      sql`${t.state} <> 'running' or (${t.leaseToken} is not null and ${t.leaseExpiresAt} is not null)`,
    ),
    check(
      `${tableName}_completed_response_check`,
      sql`${t.state} <> 'completed' or (${t.responseStatus} is not null and ${t.responseBody} is not null)`,
    ),
    check(`${tableName}_status_check`, sql`${t.responseStatus} is null or ${t.responseStatus} between 100 and 599`),
    check(`${tableName}_attempts_check`, sql`${t.attempts} >= 1`),
    check(`${tableName}_key_check`, sql`length(${t.key}) between 1 and 255`),
    // Takeover of abandoned attempts: running rows by lease expiry.
    index(`${tableName}_running_lease_idx`)
      .on(t.leaseExpiresAt as never)
      .where(sql`${t.state} = 'running'`),
    // Retention purge: oldest expiry first.
    index(`${tableName}_expires_idx`).on(t.expiresAt as never),
  ];
  // pgSchema('public') is refused by drizzle; the public schema is drizzle's plain pgTable.
  if (schemaName === 'public') return pgTable(tableName, columns, extras as never);
  return pgSchema(schemaName).table(tableName, columns, extras as never);
}

/** The table type for any names. */
export type IdempotencyTable = ReturnType<typeof idempotencyTable>;

/** The `pgcoord` schema object (exported so drizzle-kit emits `CREATE SCHEMA`). */
export const pgcoordSchema = pgSchema(DEFAULT_SCHEMA);

/** The default idempotency table, `pgcoord.idempotency_keys`. */
export const idempotencyKeys = idempotencyTable();
