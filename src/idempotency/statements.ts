// The idempotency table's statements, made once per table (names checked), and what a lease
// lost looks like when a fenced statement finds the row no longer its own.

import type { Statement } from '../driver/index.js';
import { sqlState } from '../errors.js';
import { FINGERPRINT_VERSION } from './fingerprint.js';
import type { Checked } from './options.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, type IdempotencyTableNames } from './schema.js';

/** The statements of one idempotency table. */
export interface Sql {
  label: string;
  claim: string;
  /** Fenced (see {@link fenced}): sent with COMMIT. */
  phase: string;
  heartbeat: string;
  complete: string;
  /** `complete`, fenced: sent with COMMIT in pgcoord's own transaction. */
  completeFenced: string;
  release: string;
}

// The text a fenced write fails with when it matched no row (the lease is not ours any more).
const LEASE_LOST = 'pgcoord: idempotency lease lost';

// A write that must abort its transaction when it matches no row, because COMMIT is already on
// its way in the same round trip. Plain SQL has no RAISE: the cast of a non-constant CASE fails at
// run time (22P02, with LEASE_LOST in the message) exactly when the update returned no row.
function fenced(update: string): string {
  return `with done as (${update})
select (case when count(*) = 1 then '1' else '${LEASE_LOST}' end)::int as ok from done`;
}

export function isLeaseLost(err: unknown): boolean {
  return sqlState(err) === '22P02' && err instanceof Error && err.message.includes(LEASE_LOST);
}

const cache = new Map<string, Sql>();

// Columns every claim answer carries. Byte and JSON columns come back as bytes and text from
// every driver; times only as milliseconds computed by the database (its clock, never ours).
const ANSWER = `state, fingerprint, fingerprint_version, attempts, recovery_point, recovery_data::text as recovery_data,
  response_status, response_headers::text as response_headers, response_body`;

export function statementsFor(names: IdempotencyTableNames): Sql {
  const schema = checkIdentifier(names.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkIdentifier(names.table ?? DEFAULT_TABLE, 'table');
  const t = `"${schema}"."${table}"`;
  const cached = cache.get(t);
  if (cached) return cached;
  const base = {
    label: `${schema}.${table}`,
    // $1 scope, $2 key, $3 fingerprint, $4 fingerprint version, $5 lease token, $6 lease ms, $7 retention ms.
    //
    // Why it is safe: the primary key makes (scope, key) a single row, and INSERT ... ON CONFLICT
    // is atomic against concurrent inserts of the same key: a second claimer blocks on the first
    // one's uncommitted row (bounded by lock_timeout) and then takes the conflict branch, which
    // locks the row and re-checks the WHERE against its latest committed version. So of any number
    // of concurrent claimers exactly one gets a row back with claimed = true; the rest see the row
    // as it is. A takeover is allowed only for a row past its retention (the key is free again),
    // or for the same request whose last attempt failed retryably or whose lease expired (its
    // holder is presumed dead; fencing by lease_token makes a late write of it a no-op).
    // statement_timestamp() is used wherever one instant must be seen twice in the statement.
    //
    // When nothing is claimed, the second branch returns the existing row in the same round trip.
    // It reads with the statement's snapshot, which may predate a row the INSERT waited for: then
    // no row comes back at all and the caller simply claims again (a new statement, a new snapshot).
    // A snapshot row past its retention is not answered either: the INSERT found it claimable, so
    // when nothing was claimed a concurrent call took the key over meanwhile, and the expired
    // result is not an answer any more (the caller claims again and sees the new attempt).
    claim: `with claimed as (
  insert into ${t} as t (scope, key, fingerprint, fingerprint_version, state, lease_token, lease_expires_at, expires_at)
  values ($1, $2, $3::bytea, $4::int2, 'running', $5::uuid,
          clock_timestamp() + $6::int8 * interval '1 millisecond',
          clock_timestamp() + greatest($7::int8, $6::int8) * interval '1 millisecond')
  on conflict (scope, key) do update set
    state = 'running',
    lease_token = excluded.lease_token,
    lease_expires_at = excluded.lease_expires_at,
    fingerprint = excluded.fingerprint,
    fingerprint_version = excluded.fingerprint_version,
    recovery_point = case when t.expires_at <= statement_timestamp() then 'started' else t.recovery_point end,
    recovery_data = case when t.expires_at <= statement_timestamp() then '{}'::jsonb else t.recovery_data end,
    attempts = case when t.expires_at <= statement_timestamp() then 1 else t.attempts + 1 end,
    created_at = case when t.expires_at <= statement_timestamp() then clock_timestamp() else t.created_at end,
    response_status = null, response_headers = null, response_body = null,
    updated_at = clock_timestamp(),
    expires_at = excluded.expires_at
  where t.expires_at <= statement_timestamp()
     or ((t.fingerprint_version <> excluded.fingerprint_version or t.fingerprint = excluded.fingerprint)
         and (t.state = 'failed_retryable' or (t.state = 'running' and t.lease_expires_at <= clock_timestamp())))
  returning true as claimed, ${ANSWER}, 0::float8 as lease_left_ms
)
select * from claimed
union all
select false, ${ANSWER},
  coalesce(extract(epoch from (lease_expires_at - clock_timestamp())) * 1000, 0)::float8
from ${t} where scope = $1 and key = $2 and expires_at > statement_timestamp() and not exists (select 1 from claimed)`,
    // $1 scope, $2 key, $3 lease token, $4 phase, $5 phase result (JSON text), $6 lease ms.
    // Sent last in the phase's own transaction, after the phase's statements and with COMMIT: it
    // commits the phase's writes and its recovery point together, and only if this attempt still
    // holds the lease (no row: the statement fails and the COMMIT behind it only rolls back). It
    // also renews the lease.
    phase: fenced(`update ${t} set recovery_point = $4, recovery_data = recovery_data || jsonb_build_object($4::text, $5::text::jsonb),
  lease_expires_at = clock_timestamp() + $6::int8 * interval '1 millisecond',
  expires_at = greatest(expires_at, clock_timestamp() + $6::int8 * interval '1 millisecond'),
  updated_at = clock_timestamp()
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning 1 as ok`),
    // $1 scope, $2 key, $3 lease token, $4 lease ms. Fenced like every write after the claim: a
    // heartbeat of an attempt that lost its lease matches no row (the token changed), and tells it so.
    heartbeat: `update ${t} set lease_expires_at = clock_timestamp() + $4::int8 * interval '1 millisecond',
  expires_at = greatest(expires_at, clock_timestamp() + $4::int8 * interval '1 millisecond')
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning 1 as ok`,
    // $1 scope, $2 key, $3 lease token, $4 status, $5 headers (JSON text), $6 body, $7 retention ms.
    // Completed rows are immutable: no statement here matches state = 'completed' (only a claim of
    // a row past its retention replaces one), and the lease token is cleared so nothing fenced by
    // it can match again.
    complete: `update ${t} set state = 'completed', response_status = $4::int2, response_headers = $5::text::jsonb, response_body = $6::bytea,
  lease_token = null, lease_expires_at = null, updated_at = clock_timestamp(),
  expires_at = clock_timestamp() + $7::int8 * interval '1 millisecond'
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning attempts`,
    // $1 scope, $2 key, $3 lease token. The attempt failed retryably: free the key at once for a
    // retry of the same request, keeping the recovery point.
    release: `update ${t} set state = 'failed_retryable', lease_token = null, lease_expires_at = null, updated_at = clock_timestamp()
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning 1 as ok`,
  };
  const sql: Sql = { ...base, completeFenced: fenced(base.complete) };
  cache.set(t, sql);
  return sql;
}

export function claimStatement(c: Checked, token: string): Statement {
  return {
    text: c.sql.claim,
    params: [c.scope, c.key, c.fingerprint, FINGERPRINT_VERSION, token, c.leaseMs, c.retentionMs],
  };
}
