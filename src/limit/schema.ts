// The limit tables, as drizzle objects (no side effects, no database access): drizzle-kit reads
// this to generate the migration shipped in `drizzle/`.

import { pgSchema, text, timestamp } from 'drizzle-orm/pg-core';

export const LIMIT_SCHEMA = 'pgcoord';
export const RATE_TABLE = 'rate_limits';
export const RATES = `${LIMIT_SCHEMA}.${RATE_TABLE}`;

const schema = pgSchema(LIMIT_SCHEMA);

/**
 * `pgcoord.rate_limits`: one row per limited key, holding its GCRA theoretical arrival time. A row
 * is written only when a request is allowed. The table may be made UNLOGGED by choice
 * (`alter table pgcoord.rate_limits set unlogged`): decisions then write no WAL, and a crash of
 * the server empties it, which resets every key to a full burst.
 */
export const rateLimits = schema.table(RATE_TABLE, {
  /** The limited key, e.g. `partner-api` or `user:42`. */
  key: text('key').primaryKey(),
  /** Theoretical arrival time: the key is back to a full burst at this time. Database clock. */
  tat: timestamp('tat', { withTimezone: true }).notNull(),
});
