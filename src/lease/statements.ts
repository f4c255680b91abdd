// The lease statements. Each is one statement on the database clock (`clock_timestamp()`), sent in
// autocommit: the row lock it takes lasts only for that statement.
//
// Why the fence only grows: it is drawn with nextval() in the DO UPDATE, that is after the row is
// locked and seen free, so every fence handed out for this name before (all drawn before their
// holder committed, so before this row lock was granted) is smaller. The insert path draws it as it
// inserts a name that has no row: greater than anything drawn before, including the fences of a
// row deleted by hand. Two inserts of a new name race on the unique key: the loser goes to the
// DO UPDATE path, after the winner's commit, and draws again.
//
// Why a fenced write cannot slip past a takeover: `pgcoord.check_fence()` takes FOR SHARE on the
// lease row, and a takeover is an UPDATE of that row; the two conflict. A fenced transaction that
// passed the check holds the share lock to its end, so a takeover waits for it to commit; one that
// comes after a takeover sees the new fence (a locking read rechecks the latest row version) and is
// refused.

import type { Statement } from '../driver/index.js';
import { FENCES, LEASE_SCHEMA, LEASES } from './schema.js';

/** The notification channel a release is announced on; the payload is the lease's name. */
export const RELEASE_CHANNEL = 'pgcoord_leases';

const expiry = (param: string) => `clock_timestamp() + ${param}::int * interval '1 millisecond'`;

// A held lease (by the statement's snapshot) is not touched at all: no row lock, so a try never
// waits behind the holder's fenced transactions. A free or missing one is upserted; the DO UPDATE
// rechecks freedom on the latest row version under the row lock.
const ACQUIRE = `with taken as (
  insert into ${LEASES} as l (name, fence, holder, holder_label, acquired_at, renewed_at, expires_at)
  select $1, nextval('${FENCES}'), $2::uuid, $3, clock_timestamp(), clock_timestamp(), ${expiry('$4')}
  where not exists (select 1 from ${LEASES} where name = $1 and expires_at > clock_timestamp())
  on conflict (name) do update
    set fence = nextval('${FENCES}'), holder = excluded.holder, holder_label = excluded.holder_label,
        acquired_at = clock_timestamp(), renewed_at = clock_timestamp(), expires_at = ${expiry('$4')}
    where l.expires_at <= clock_timestamp()
  returning l.fence
)
select fence::text as fence, null::text as holder, null::float8 as expires_in_ms from taken
union all
select null, holder_label, greatest(0, extract(epoch from expires_at - clock_timestamp()) * 1000)::float8
  from ${LEASES} where name = $1 and not exists (select 1 from taken)`;

/** Take `name` for `ttlMs` if it is free: a row with `fence` when taken, else the holder's. */
export function acquireStatement(name: string, holder: string, label: string, ttlMs: number): Statement {
  return { text: ACQUIRE, params: [name, holder, label, ttlMs] };
}

const RENEW = `update ${LEASES} set renewed_at = clock_timestamp(), expires_at = ${expiry('$4')}
  where name = $1 and fence = $2::bigint and holder = $3::uuid and expires_at > clock_timestamp()
  returning 1 as renewed`;

/** Extend the term by `ttlMs` from now: a row only while this term is still current and unexpired. */
export function renewStatement(name: string, fence: bigint, holder: string, ttlMs: number): Statement {
  return { text: RENEW, params: [name, String(fence), holder, ttlMs] };
}

// pg_notify rather than NOTIFY: it rides in the same statement, and only when something was
// released (NOTIFY serialises commits on a global lock: pay for it only when a waiter may care).
const RELEASE = `with released as (
  update ${LEASES} set holder = null, expires_at = clock_timestamp()
  where name = $1 and fence = $2::bigint and holder = $3::uuid and expires_at > clock_timestamp()
  returning name
)
select pg_notify('${RELEASE_CHANNEL}', name) from released`;

/** End the term now and wake waiters: a row when this call ended it. */
export function releaseStatement(name: string, fence: bigint, holder: string): Statement {
  return { text: RELEASE, params: [name, String(fence), holder] };
}

/** Refuse the transaction unless `fence` is the current, unexpired term of `name` (FOR SHARE until it ends). */
export function checkFenceStatement(name: string, fence: bigint): Statement {
  return { text: `select ${LEASE_SCHEMA}.check_fence($1, $2::bigint)`, params: [name, String(fence)] };
}

const ABANDON = `update ${LEASES} set holder = null, expires_at = clock_timestamp()
  where name = $1 and holder = $2::uuid and expires_at > clock_timestamp()`;

/** End a term known only by its owner token (an acquisition whose answer was lost). */
export function abandonStatement(name: string, holder: string): Statement {
  return { text: ABANDON, params: [name, holder] };
}
