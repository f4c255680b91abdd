// Hand-written twins of pgcoord strategies in pgcoord's exact SQL shape: the statements pgcoord
// sends (captured with postgres.js's `debug` hook), in the same round trips, prepared as pgcoord's
// are, so the ratio pgcoord / twin measures pgcoord's JavaScript only.
import { createHash } from 'node:crypto';
import { ADD_REFUND } from '../sql.js';
import { optimisticRefund } from './optimistic.js';
import { onReserved, order, pipeline } from './reserved.js';
import { fits, type Strategy } from './types.js';

const AS_PGCOORD = { prepare: true } as const; // pgcoord prepares its statements too

/** What `withRowLock(sql, { table: 'orders', key: { id } }, ...)` sends to lock and read the row. */
const ROW_LOCK = 'select * from "orders" where "id" = $1 limit $2 for update';

/** What `guardedUpdate(sql, { table: 'orders', key: { id }, set, guard, params: [amount], insert })` sends. */
const PGCOORD_GUARDED =
  'with pgcoord_r as (select (refunded + $1 <= total) as pgcoord_ok from "orders" where (true) and "id" = $2 for no key update),\n' +
  'pgcoord_u as (update "orders" set refunded = refunded + $1 from pgcoord_r where (true) and "id" = $2 and pgcoord_r.pgcoord_ok returning "orders".*, true as pgcoord_applied), ' +
  'pgcoord_i as (insert into "refunds" ("request_id", "amount", "order_id") select $3, $4, pgcoord_u."id" from pgcoord_u)\n' +
  'select pgcoord_u.*, (select count(*) from pgcoord_r)::int as pgcoord_found from (values (1)) as pgcoord_d (x) left join pgcoord_u on true';

/** withRowLock's write-plan shape: [BEGIN + row lock (limit 2)], then [UPDATE + COMMIT]. */
export const forUpdateSame: Strategy = {
  id: 'for-update/same',
  family: 'for-update',
  impl: 'same',
  label: 'FOR UPDATE, same SQL as pgcoord',
  expectCorrect: true,
  dedupes: false,
  refund: ({ sql, gateway }, req) =>
    onReserved(sql, async (c) => {
      const [, rows] = await pipeline(c, [['begin'], [ROW_LOCK, [req.orderId, 2], AS_PGCOORD]]);
      if (!fits(order(rows), req.amount)) {
        await c.unsafe('commit');
        return 'rejected';
      }
      await gateway.pay(req);
      await pipeline(c, [[ADD_REFUND, [req.orderId, req.amount, req.requestId]], ['commit']]);
      return 'refunded';
    }),
};

/** guardedUpdate's shape: its one statement (update + refund record) in autocommit; the gateway after. */
export const guardedSame: Strategy = {
  id: 'guarded/same',
  family: 'guarded',
  impl: 'same',
  label: 'guarded UPDATE, same SQL as pgcoord',
  expectCorrect: true,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    const [row] = await sql.unsafe(PGCOORD_GUARDED, [req.amount, req.orderId, req.requestId, req.amount], AS_PGCOORD);
    if (row?.pgcoord_applied !== true) return 'rejected';
    await gateway.pay(req);
    return 'refunded';
  },
};

/** What `updateVersioned(sql, { table: 'orders', key: { id }, set: { refunded }, expected, insert })` sends. */
const PGCOORD_VERSIONED =
  'with pgcoord_u as (update "orders" set "refunded" = $2, "version" = "version" + 1 where "id" = $1 and "version" = $3 returning *), ' +
  'pgcoord_i as (insert into "refunds" ("request_id", "amount", "order_id") select $4, $5, pgcoord_u."id" from pgcoord_u) select * from pgcoord_u';
/** What it sends when that matched nothing, to tell a conflict from a missing row. */
const PGCOORD_VERSION_NOW = 'select "version" as v from "orders" where "id" = $1 limit 1';

/**
 * pgcoord's optimistic shape: read, then its one-statement versioned update with the refund record;
 * on a conflict its second read, then pgcoord's retry backoff (full jitter, 10 ms base, 1 s cap).
 */
export const optimisticSame: Strategy = {
  id: 'optimistic/same',
  family: 'optimistic',
  impl: 'same',
  label: 'optimistic, same SQL as pgcoord',
  expectCorrect: true,
  dedupes: false,
  refund: (ctx, req) =>
    optimisticRefund(ctx, req, {
      write: (o) =>
        ctx.sql.unsafe(PGCOORD_VERSIONED, [req.orderId, o.refunded + req.amount, o.version ?? 0, req.requestId, req.amount], AS_PGCOORD),
      onConflict: () => ctx.sql.unsafe(PGCOORD_VERSION_NOW, [req.orderId], AS_PGCOORD),
      backoff: (attempt) => new Promise((r) => setTimeout(r, Math.random() * Math.min(1000, 10 * 2 ** (attempt - 1)))),
    }),
};

/**
 * What `guardedUpdate(sql, refund, { idempotency: { unscoped: true, key, request } })` sends: the
 * key's claim, the guarded refund, the refund record and the stored outcome in one statement
 * (see src/idempotency/one-statement.ts). $5 scope, $6 key, $7 fingerprint, $8 its version, $9
 * retention ms.
 */
const PGCOORD_KEYED_REFUND = `with pgcoord_r as (select true as pgcoord_found, (refunded + $1 <= total) as pgcoord_ok from "orders" where (true) and "id" = $2),
pgcoord_k as (insert into "pgcoord"."idempotency_keys" as t (scope, key, fingerprint, fingerprint_version, state, response_status, response_body, expires_at)
  select $5, $6, $7::bytea, $8::int2, 'completed', 200,
    case when pgcoord_r.pgcoord_found is null then '{"status":"not-found"}'::bytea when pgcoord_r.pgcoord_ok then '{"status":"applied"}'::bytea else '{"status":"guard-failed"}'::bytea end,
    clock_timestamp() + $9::int8 * interval '1 millisecond'
  from (values (1)) as pgcoord_d (x) left join pgcoord_r on true
  on conflict (scope, key) do nothing
  returning case response_body when '{"status":"applied"}'::bytea then 1 when '{"status":"guard-failed"}'::bytea then 2 else 3 end as pgcoord_claim),
pgcoord_u as (update "orders" set refunded = refunded + $1 from pgcoord_k where (true) and "id" = $2 and (refunded + $1 <= total) and pgcoord_k.pgcoord_claim = 1 returning "orders".*, true as pgcoord_applied), pgcoord_i as (insert into "refunds" ("request_id", "amount", "order_id") select $3, $4, pgcoord_u."id" from pgcoord_u)
select pgcoord_u.*, (case when pgcoord_k.pgcoord_claim = 1 and pgcoord_u.pgcoord_applied is null then 'pgcoord: the guarded row changed under the claim, run again' else '0' end)::int as pgcoord_check,
  pgcoord_k.pgcoord_claim as pgcoord_claimed, pgcoord_s.*
from (values (1)) as pgcoord_d (x) left join pgcoord_k on true left join pgcoord_u on true
  left join lateral (select state as pgcoord_state, fingerprint as pgcoord_fingerprint, fingerprint_version as pgcoord_fpv,
    response_status as pgcoord_status, response_body as pgcoord_body, expires_at <= statement_timestamp() as pgcoord_expired,
    extract(epoch from lease_expires_at - clock_timestamp()) * 1000 as pgcoord_lease_left
    from "pgcoord"."idempotency_keys" where pgcoord_k.pgcoord_claim is null and scope = $5 and key = $6) as pgcoord_s on true`;

const DAY_MS = 86_400_000;
const CHANGED = 'pgcoord: the guarded row changed under the claim';

/**
 * The one-statement idempotent refund in pgcoord's exact SQL: a first delivery or a replay in one
 * round trip; a copy whose snapshot could not show the first one's row, or whose order changed
 * after its snapshot, runs the statement again. (The takeover of an expired key, which pgcoord
 * also handles, cannot happen within a run.)
 */
export const idempotencySame: Strategy = {
  id: 'idempotency/same',
  family: 'idempotency',
  impl: 'same',
  label: 'idempotency key, same SQL as pgcoord',
  expectCorrect: true,
  dedupes: true,
  async refund({ sql, gateway }, req) {
    const fingerprint = createHash('sha256').update(`${req.orderId}:${req.amount}`).digest();
    const params = [req.amount, req.orderId, req.requestId, req.amount, '', req.requestId, fingerprint, 2, DAY_MS];
    for (;;) {
      let rows: Record<string, unknown>[];
      try {
        rows = await sql.unsafe(PGCOORD_KEYED_REFUND, params, AS_PGCOORD);
      } catch (err) {
        // the order changed between the snapshot and its row lock: run again on a new snapshot
        if ((err as { code?: string }).code === '22P02' && String((err as Error).message).includes(CHANGED)) continue;
        throw err;
      }
      const row = rows[0];
      if (!row) continue;
      if (row.pgcoord_claimed === 1) {
        await gateway.pay(req);
        return 'refunded';
      }
      if (row.pgcoord_claimed !== null) return 'rejected';
      if (row.pgcoord_state === 'completed')
        return Buffer.from(row.pgcoord_body as Uint8Array).toString() === '{"status":"applied"}'
          ? 'replayed-refunded'
          : 'replayed-rejected';
      // the first copy's row was committed after this statement's snapshot: run again
    }
  },
};
