// Hand-written twins of pgcoord strategies in pgcoord's exact SQL shape: the statements pgcoord
// sends (captured with postgres.js's `debug` hook), in the same round trips, prepared as pgcoord's
// are, so the ratio pgcoord / twin measures pgcoord's JavaScript only.
import { ADD_REFUND, INSERT_REFUND } from '../sql.js';
import { onReserved, order, PREPARED, pipeline } from './reserved.js';
import { fits, type Strategy } from './types.js';

const AS_PGCOORD = { prepare: true } as const; // pgcoord prepares its statements too

/** What `withRowLock(sql, { table: 'orders', key: { id } }, ...)` sends to lock and read the row. */
const ROW_LOCK = 'select * from "orders" where "id" = $1 limit $2 for update';

/** What `guardedUpdate(tx, { table: 'orders', key: { id }, set, guard, params: [amount] })` sends. */
const PGCOORD_GUARDED =
  'with pgcoord_r as (select (refunded + $1 <= total) as pgcoord_ok from "orders" where (true) and "id" = $2 for no key update), ' +
  'pgcoord_u as (update "orders" set refunded = refunded + $1 from pgcoord_r where (true) and "id" = $2 and pgcoord_r.pgcoord_ok returning "orders".*, true as pgcoord_applied) ' +
  'select (select count(*) from pgcoord_r)::int as pgcoord_found, pgcoord_u.* from (values (1)) as pgcoord_d (x) left join pgcoord_u on true';

/** withRowLock's shape: [BEGIN + row lock (unprepared)], UPDATE, COMMIT. */
export const forUpdateSame: Strategy = {
  id: 'for-update/same',
  family: 'for-update',
  impl: 'same',
  label: 'FOR UPDATE, same shape as pgcoord',
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
      await c.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      await c.unsafe('commit');
      return 'refunded';
    }),
};

/** guardedUpdate-in-transaction's shape: [BEGIN + guarded CTE (unprepared)], INSERT refund, COMMIT; gateway after. */
export const guardedSame: Strategy = {
  id: 'guarded/same',
  family: 'guarded',
  impl: 'same',
  label: 'guarded UPDATE, same shape as pgcoord',
  expectCorrect: true,
  dedupes: false,
  async refund({ sql, gateway }, req) {
    const applied = await onReserved(sql, async (c) => {
      const [, rows] = await pipeline(c, [['begin'], [PGCOORD_GUARDED, [req.amount, req.orderId], AS_PGCOORD]]);
      const ok = rows?.[0]?.pgcoord_applied === true;
      if (ok) await c.unsafe(INSERT_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      await c.unsafe('commit');
      return ok;
    });
    if (!applied) return 'rejected';
    await gateway.pay(req);
    return 'refunded';
  },
};
