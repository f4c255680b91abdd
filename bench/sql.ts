// The SQL of the refund storm, shared by every strategy so that "the same SQL" means the same text.
// $1 = order id, $2 = amount, $3 = refund request id; strategies add their own extra parameters.

/** Tables of the workload: orders with a refundable total, the refunds paid out, idempotency keys. */
export const SCHEMA = `
create table if not exists orders (
  id int primary key,
  total int not null,
  refunded int not null default 0,
  version int not null default 0
);
create table if not exists refunds (
  id bigserial primary key,
  request_id text not null,
  order_id int not null,
  amount int not null
);
create index if not exists refunds_request_id on refunds (request_id);
create table if not exists idempotency_keys (
  key text primary key,
  created_at timestamptz not null default now()
);`;

/** Read the order (the "read" of read-check-write). */
export const SELECT_ORDER = 'select total, refunded from orders where id = $1';

/** Read the order and lock its row until the transaction ends. */
export const SELECT_ORDER_FOR_UPDATE = 'select total, refunded from orders where id = $1 for update';

/** Read the order with its version, for optimistic concurrency. */
export const SELECT_ORDER_VERSION = 'select total, refunded, version from orders where id = $1';

/** Transaction-scoped advisory lock on the order id (the int8 key space, as pgcoord's number keys). */
export const ADVISORY_LOCK = 'select pg_advisory_xact_lock($1::int8)';

/**
 * Add the refund and record it, in one statement (the "write" of read-check-write). No guard: the
 * check was done by the caller under a lock, so this is only correct if the lock really excluded
 * everybody else.
 */
export const ADD_REFUND =
  'with u as (update orders set refunded = refunded + $2 where id = $1 returning id) ' +
  'insert into refunds (request_id, order_id, amount) select $3, id, $2 from u';

/**
 * Guarded atomic UPDATE: the check is in the WHERE clause, so the row lock the UPDATE takes (and
 * READ COMMITTED's re-check of the WHERE on the newest row version after waiting) makes the
 * check-and-add atomic without any explicit lock. Returns one row when the refund was taken.
 */
export const GUARDED_REFUND =
  'with u as (update orders set refunded = refunded + $2 where id = $1 and refunded + $2 <= total returning id) ' +
  'insert into refunds (request_id, order_id, amount) select $3, id, $2 from u returning id';

/**
 * The negative control's write: it stores the value computed in the client ($4 = refunded as read
 * + amount). Two clients that read the same value both pass the check and the second write
 * overwrites the first (a lost update), so more money goes out than the order's total.
 */
export const NAIVE_WRITE =
  'with u as (update orders set refunded = $4 where id = $1 returning id) ' +
  'insert into refunds (request_id, order_id, amount) select $3, id, $2 from u';

/** Optimistic write: only if nobody changed the row since it was read ($4 = version read). */
export const OPTIMISTIC_REFUND =
  'with u as (update orders set refunded = refunded + $2, version = version + 1 where id = $1 and version = $4 returning id) ' +
  'insert into refunds (request_id, order_id, amount) select $3, id, $2 from u returning id';

/**
 * Idempotency key and guarded refund in one autocommit statement. A duplicate delivery of the same
 * key blocks on the unique index until the first one commits, then inserts nothing, so its UPDATE
 * (gated on `exists (select from k)`) does nothing either. `fresh` = 1 for the first delivery,
 * `done` = 1 when the money was taken.
 */
export const IDEMPOTENT_REFUND =
  'with k as (insert into idempotency_keys (key) values ($3) on conflict do nothing returning key), ' +
  'u as (update orders set refunded = refunded + $2 where id = $1 and refunded + $2 <= total and exists (select 1 from k) returning id), ' +
  'r as (insert into refunds (request_id, order_id, amount) select $3, id, $2 from u returning id) ' +
  'select (select count(*) from k)::int as fresh, (select count(*) from r)::int as done';

/** A replay's answer: was the first delivery's refund taken? (A fresh statement sees its commit.) */
export const REPLAY_OUTCOME = 'select exists (select 1 from refunds where request_id = $1) as done';
