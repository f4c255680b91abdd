// The lease table and its fence sequence, as drizzle objects. Importable on its own (no side
// effects, no database access): drizzle-kit reads it to generate the migration shipped in
// `drizzle/`, and `pgcoord generate` adds it to an app's migrations.
//
// One row per lease name, kept forever once created (a released or expired lease is a row whose
// `expires_at` is past). Fences come from one sequence, never from the row: a fence is greater
// than every fence handed out before it, for any name, even after a row was deleted by hand.

import { sql } from 'drizzle-orm';
import { bigint, check, jsonb, pgSchema, primaryKey, text, timestamp, uuid } from 'drizzle-orm/pg-core';

export const LEASE_SCHEMA = 'pgcoord';
export const LEASE_TABLE = 'leases';
export const FENCE_SEQUENCE = 'lease_fence';
export const RUNS_TABLE = 'singleton_runs';
export const FLIGHTS_TABLE = 'flight_values';

/** Qualified names as they appear in pgcoord's statements. */
export const LEASES = `${LEASE_SCHEMA}.${LEASE_TABLE}`;
export const FENCES = `${LEASE_SCHEMA}.${FENCE_SEQUENCE}`;
export const RUNS = `${LEASE_SCHEMA}.${RUNS_TABLE}`;
export const FLIGHTS = `${LEASE_SCHEMA}.${FLIGHTS_TABLE}`;

const schema = pgSchema(LEASE_SCHEMA);

/** The sequence every fence is drawn from (`nextval` while the row is locked: see statements.ts). */
export const leaseFence = schema.sequence(FENCE_SEQUENCE, { startWith: 1, minValue: 1 });

/**
 * `pgcoord.leases`, as a drizzle table (rows typed for drizzle queries). Every column is written
 * only by pgcoord's statements in src/lease/statements.ts.
 */
export const leases = schema.table(
  LEASE_TABLE,
  {
    /** The lease's name, e.g. `report:daily` (1 to 255 characters). */
    name: text('name').primaryKey(),
    /** The fencing token of the current (or last) term: strictly increasing per name, forever. */
    fence: bigint('fence', { mode: 'bigint' }).notNull(),
    /** Owner token of the current term (random per acquisition); null once released. */
    holder: uuid('holder'),
    /** Who holds it, for people (`pgcoord leases`): a label the holder chose, or host and pid. */
    holderLabel: text('holder_label'),
    /** When the current term began. Database clock. */
    acquiredAt: timestamp('acquired_at', { withTimezone: true }).notNull(),
    /** Last successful renewal (or the acquisition). Database clock. */
    renewedAt: timestamp('renewed_at', { withTimezone: true }).notNull(),
    /** The term ends here unless renewed; past = free to take. Database clock. */
    expiresAt: timestamp('expires_at', { withTimezone: true }).notNull(),
  },
  (t) => [check('leases_name_check', sql`length(${t.name}) between 1 and 255`)],
);

/**
 * `pgcoord.singleton_runs`: one row per (job, slot) a singleton job started, written only under
 * the job's lease and fenced by it (src/lease/singleton.ts). `done` rows are what makes a slot run
 * once, however early it finished; their result is what the other instances receive.
 */
export const singletonRuns = schema.table(
  RUNS_TABLE,
  {
    job: text('job').notNull(),
    /** The schedule slot, e.g. `2026-12-04` for a daily job. */
    slot: text('slot').notNull(),
    /** `running` while the term that started it works; `done` once it finished. */
    state: text('state').$type<'running' | 'done'>().notNull(),
    /** The fence of the lease term that wrote this row last. */
    fence: bigint('fence', { mode: 'bigint' }).notNull(),
    /** The job's result (JSON), once done. */
    result: jsonb('result'),
    startedAt: timestamp('started_at', { withTimezone: true }).notNull(),
    finishedAt: timestamp('finished_at', { withTimezone: true }),
  },
  (t) => [
    primaryKey({ name: 'singleton_runs_pkey', columns: [t.job, t.slot] }),
    check('singleton_runs_state_check', sql`${t.state} in ('running', 'done')`),
  ],
);

/**
 * `pgcoord.flight_values`: the last value single-flight computed per key, written only by the
 * holder of the key's flight lease and fenced by it (src/lease/single-flight.ts).
 */
export const flightValues = schema.table(FLIGHTS_TABLE, {
  key: text('key').primaryKey(),
  /** The computed value (JSON). */
  value: jsonb('value').notNull(),
  /** The fence of the flight that computed it. */
  fence: bigint('fence', { mode: 'bigint' }).notNull(),
  computedAt: timestamp('computed_at', { withTimezone: true }).notNull(),
  /** Served without computing until then. Database clock. */
  freshUntil: timestamp('fresh_until', { withTimezone: true }).notNull(),
});
