// Hand-written twins of pgcoord strategies in pgcoord's exact SQL shape: the statements pgcoord
// sends (captured with postgres.js's `debug` hook), in the same round trips, prepared as pgcoord's
// are, so the ratio pgcoord / twin measures pgcoord's JavaScript only.
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
