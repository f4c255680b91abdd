// The queue's statements. Each runs on its own in autocommit, except `enqueue`, which joins the
// caller's transaction (the job exists if and only if the caller's writes commit). The functions
// they call are in the queue migration (drizzle/0004_queue.sql), with why each step is safe.

import type { Statement } from '../driver/index.js';
import { JOBS, KEYS, ORDER, QUEUE_SCHEMA } from './schema.js';

/** The notification channel a key turning ready is announced on; the payload is the queue's name. */
export const QUEUE_CHANNEL = 'pgcoord_queue';

// Why ids are in commit order within a key: the order row is locked (the DO UPDATE, or the insert
// of a new row, which a concurrent insert of the same key waits on) before the id is drawn in the
// DO UPDATE, and held until the caller's transaction ends; every earlier job of the key was
// committed (or rolled back) before the lock was granted, so its id is smaller. (The VALUES
// nextval of the insert path is used only when no row, so no job of the key, exists.)
//
// queue_keys is never locked here: an existing row is left alone (ON CONFLICT DO NOTHING takes no
// lock), so a worker's renewal or completion never waits for the caller's transaction. A new key
// (its row inserted here) is announced on QUEUE_CHANNEL at commit (a delayed one too: the workers
// then know when to look): NOTIFY serialises commits on a global lock, so it is paid only when a
// key turns ready, not for every job. A dedupe key already queued skips everything (the order row too, but for a race).
const ENQUEUE = `with o as (
  insert into ${ORDER} as o (queue, key, last_id)
  select $1, $2, nextval('${QUEUE_SCHEMA}.queue_job_id')
  where $6::text is null or not exists (select 1 from ${JOBS} where queue = $1 and dedupe_key = $6)
  on conflict (queue, key) do update set last_id = nextval('${QUEUE_SCHEMA}.queue_job_id')
  returning o.last_id
), j as (
  insert into ${JOBS} (id, queue, key, payload, run_at, enqueued_at, dedupe_key)
  select o.last_id, $1, $2, $3::text::jsonb,
    coalesce($4::timestamptz, clock_timestamp() + $5::int * interval '1 millisecond'), clock_timestamp(), $6
  from o
  on conflict do nothing
  returning id, run_at
), k as (
  insert into ${KEYS} (queue, key, ready_at) select $1, $2, j.run_at from j
  on conflict (queue, key) do nothing
  returning ready_at
)
select j.id::text as id, (select count(pg_notify('${QUEUE_CHANNEL}', $1)) from k)::int as woke
from j`;

/** Queue a job (a row with its id), or nothing when `dedupeKey` is already queued. */
export function enqueueStatement(
  queue: string,
  key: string,
  payloadJson: string,
  runAt: Date | undefined,
  delayMs: number,
  dedupeKey: string | undefined,
): Statement {
  return { text: ENQUEUE, params: [queue, key, payloadJson, runAt?.toISOString() ?? null, delayMs, dedupeKey ?? null] };
}

const CLAIM = `select claimed_key, claim_fence::text as claim_fence, job_id::text as job_id, job_payload::text as job_payload,
  job_attempts, job_enqueued_at, next_in_ms from ${QUEUE_SCHEMA}.queue_claim($1, $2::uuid, $3, $4::int, $5::int)`;

/** Claim up to `n` ready keys for `ttlMs`: a row per key with its head job, then one with `next_in_ms`. */
export function claimStatement(queue: string, holder: string, label: string, n: number, ttlMs: number): Statement {
  return { text: CLAIM, params: [queue, holder, label, n, ttlMs] };
}

const COMPLETE = `select claimed_key, claim_fence::text as claim_fence, job_id::text as job_id, job_payload::text as job_payload,
  job_attempts, job_enqueued_at from ${QUEUE_SCHEMA}.queue_complete($1, $2, $3::bigint, $4::bigint, $5::boolean, $6::boolean, $7::uuid, $8, $9::int)`;

/**
 * The job is done: delete it under claim `fence`. With `keep`, go on with the key's next job if it
 * can run now; else release the key and, with `takeNext`, claim the oldest ready key for `holder`.
 * Claims last `ttlMs`. A row when the worker has a next job (of this key or another). Refused
 * (PGF01) when the claim is not current.
 */
export function completeStatement(
  queue: string,
  claim: { key: string; fence: bigint },
  id: bigint,
  next: { keep: boolean; takeNext: boolean; holder: string; label: string; ttlMs: number },
): Statement {
  return {
    text: COMPLETE,
    params: [queue, claim.key, String(id), String(claim.fence), next.keep, next.takeNext, next.holder, next.label, next.ttlMs],
  };
}

/** The attempt failed: retry the job (still its key's head) in `retryInMs`, or (null) mark it dead. */
export function failStatement(queue: string, key: string, id: bigint, fence: bigint, error: string, retryInMs: number | null): Statement {
  return {
    text: `select ${QUEUE_SCHEMA}.queue_fail($1, $2, $3::bigint, $4::bigint, $5, $6::int)`,
    params: [queue, key, String(id), String(fence), error, retryInMs],
  };
}

// One statement renews every key a worker holds (a JSON list of key and claim fence). A key's row
// held FOR SHARE by a fenced transaction (withJobFence: the job's own writes) is skipped, not
// waited for: waiting would hold up the renewal of every other key the worker holds until that
// transaction ends, and their claims would lapse. A skipped claim is still current (the final
// select reads the rows as they were, unlocked) and cannot be taken over while the lock lasts (a
// takeover must lock the row); it is answered `renewed = false` and tried again at the next beat.
const RENEW = `with c as (select * from jsonb_to_recordset($4::text::jsonb) as c(key text, fence bigint)),
  mine as (
    select kk.key from ${KEYS} kk join c on kk.key = c.key and kk.fence = c.fence
    where kk.queue = $1 and kk.holder = $2::uuid
    for no key update of kk skip locked),
  renewed as (
    update ${KEYS} kk set ready_at = clock_timestamp() + $3::int * interval '1 millisecond'
    from mine where kk.queue = $1 and kk.key = mine.key
    returning kk.key)
  select kk.key, exists (select 1 from renewed r where r.key = kk.key) as renewed
  from ${KEYS} kk join c on kk.key = c.key and kk.fence = c.fence
  where kk.queue = $1 and kk.holder = $2::uuid`;

/**
 * Extend the claims (`[key, fence]`) by `ttlMs` from now: a row per claim still current, with
 * `renewed` false where a fenced transaction holds the key's row (extended at a later beat).
 */
export function renewStatement(queue: string, holder: string, ttlMs: number, claims: readonly { key: string; fence: bigint }[]): Statement {
  const list = JSON.stringify(claims.map((c) => ({ key: c.key, fence: String(c.fence) })));
  return { text: RENEW, params: [queue, holder, ttlMs, list] };
}

// After a claim whose answer was lost: whatever it claimed is released at once (attempt counted)
// rather than waiting for the claim to run out.
const ABANDON = `update ${KEYS} kk set holder = null, holder_label = null, ready_at = clock_timestamp()
  where kk.queue = $1 and kk.holder = $2::uuid
    and not exists (select 1 from jsonb_to_recordset($3::text::jsonb) as c(key text, fence bigint) where c.key = kk.key and c.fence = kk.fence)`;

/** Release every key `holder` holds in `queue` except the claims it knows of. */
export function abandonStatement(queue: string, holder: string, known: readonly { key: string; fence: bigint }[]): Statement {
  return { text: ABANDON, params: [queue, holder, JSON.stringify(known.map((c) => ({ key: c.key, fence: String(c.fence) })))] };
}

/** Refuse the caller's transaction unless claim `fence` of the key is current (FOR SHARE until it ends). */
export function checkClaimStatement(queue: string, key: string, fence: bigint): Statement {
  return { text: `select ${QUEUE_SCHEMA}.check_queue_fence($1, $2, $3::bigint)`, params: [queue, key, String(fence)] };
}
