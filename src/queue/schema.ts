// The keyed queue's tables, as drizzle objects. Importable on its own (no side effects, no database
// access): drizzle-kit reads it to generate the migration shipped in `drizzle/`, and `pgcoord
// generate` adds it to an app's migrations.
//
// Three tables, because two kinds of writer must not wait for each other:
// - `queue_order`: one row per key with queued jobs, locked by `enqueue` until the enqueuing
//   transaction ends. Job ids are drawn under that lock, so within a key, id order is commit order.
// - `queue_keys`: one row per key with queued jobs, written by workers only (claims, renewals,
//   completions). An enqueue never locks it: a worker's renewal or completion never waits for a
//   caller's open transaction, and a claim never skips a key because someone is enqueuing to it.
// - `queue_jobs`: the jobs; a key's head is its job with the smallest id.
// The functions that move a key along (claim, complete, fail) are in the same migration; the
// comments there say why each step is safe.

import { sql } from 'drizzle-orm';
import { bigint, check, index, integer, jsonb, pgSchema, primaryKey, text, timestamp, uniqueIndex, uuid } from 'drizzle-orm/pg-core';

export const QUEUE_SCHEMA = 'pgcoord';
export const ORDER_TABLE = 'queue_order';
export const KEYS_TABLE = 'queue_keys';
export const JOBS_TABLE = 'queue_jobs';
export const JOB_ID_SEQUENCE = 'queue_job_id';
export const QUEUE_FENCE_SEQUENCE = 'queue_fence';

/** Qualified names as they appear in pgcoord's statements. */
export const ORDER = `${QUEUE_SCHEMA}.${ORDER_TABLE}`;
export const KEYS = `${QUEUE_SCHEMA}.${KEYS_TABLE}`;
export const JOBS = `${QUEUE_SCHEMA}.${JOBS_TABLE}`;
export const JOB_IDS = `${QUEUE_SCHEMA}.${JOB_ID_SEQUENCE}`;

const schema = pgSchema(QUEUE_SCHEMA);

/** Job ids: drawn by `enqueue` while it holds the key's `queue_order` row (see above). */
export const queueJobId = schema.sequence(JOB_ID_SEQUENCE, { startWith: 1, minValue: 1 });

/** The fence of each claim of a key: greater than every fence handed out before, for any key. */
export const queueFence = schema.sequence(QUEUE_FENCE_SEQUENCE, { startWith: 1, minValue: 1 });

/** `pgcoord.queue_order`: the enqueuers' row per key (the last job id handed out). */
export const queueOrder = schema.table(
  ORDER_TABLE,
  {
    queue: text('queue').notNull(),
    key: text('key').notNull(),
    /** The id of the key's last enqueued job. */
    lastId: bigint('last_id', { mode: 'bigint' }).notNull(),
  },
  (t) => [primaryKey({ columns: [t.queue, t.key] })],
);

/** `pgcoord.queue_keys`: the workers' row per key: when its head can run, who holds it. */
export const queueKeys = schema.table(
  KEYS_TABLE,
  {
    queue: text('queue').notNull(),
    key: text('key').notNull(),
    /**
     * When a worker may claim the key: its head's `run_at` while free, the end of the claim's
     * lease while held (so an expired claim is taken over by the same scan), null while the head
     * is dead (the key waits for a retry or a skip). Database clock.
     */
    readyAt: timestamp('ready_at', { withTimezone: true }),
    /** The holding worker's token while claimed, else null. */
    holder: uuid('holder'),
    /** Who holds it, for people (`pgcoord queue`). */
    holderLabel: text('holder_label'),
    /** The fence of the current (or last) claim. */
    fence: bigint('fence', { mode: 'bigint' }),
  },
  (t) => [primaryKey({ columns: [t.queue, t.key] }), index('queue_keys_ready_idx').on(t.queue, t.readyAt)],
);

/** `pgcoord.queue_jobs`: queued jobs (a completed job is deleted; a dead one stays until retried or skipped). */
export const queueJobs = schema.table(
  JOBS_TABLE,
  {
    /** The job's id: unique forever; within a key, the enqueue (commit) order. */
    id: bigint('id', { mode: 'bigint' }).primaryKey(),
    queue: text('queue').notNull(),
    key: text('key').notNull(),
    payload: jsonb('payload').notNull(),
    /** Not before this time (database clock); a failed attempt moves it to the retry time. */
    runAt: timestamp('run_at', { withTimezone: true }).notNull(),
    enqueuedAt: timestamp('enqueued_at', { withTimezone: true }).notNull(),
    /** Attempts started (counted when claimed, so a worker that died counts). */
    attempts: integer('attempts').notNull().default(0),
    /** `ready` or `dead` (attempts exhausted: its key waits for a retry or a skip). */
    state: text('state').notNull().default('ready'),
    lastError: text('last_error'),
    /** While a job with this key is queued in the same queue, another enqueue with it does nothing. */
    dedupeKey: text('dedupe_key'),
  },
  (t) => [
    uniqueIndex('queue_jobs_key_idx').on(t.queue, t.key, t.id),
    uniqueIndex('queue_jobs_dedupe_idx').on(t.queue, t.dedupeKey).where(sql`${t.dedupeKey} is not null`),
    check('queue_jobs_state_check', sql`${t.state} in ('ready', 'dead')`),
  ],
);
