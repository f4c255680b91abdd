// What a strategy is: one small module that answers one refund request.
import type { Redis } from 'ioredis';
import type postgres from 'postgres';
import type { Gateway, RefundRequest } from '../workload.js';

/** The answer a client gets. `replayed` = a duplicate delivery answered from the first one's record. */
export type Outcome = 'refunded' | 'rejected' | 'replayed-refunded' | 'replayed-rejected';

/** What a strategy runs with. */
export interface StrategyContext {
  sql: postgres.Sql;
  gateway: Gateway;
  /** Present when Redis answered at start-up. */
  redis?: Redis;
  /** Call once per extra attempt (a retry after a conflict, a lock poll that found the lock taken). */
  retry(): void;
  /** Call once per round trip to Redis (Postgres round trips are counted on the socket). */
  redisTrip(): void;
  /** Cap on attempts for the retrying strategies. */
  maxAttempts: number;
}

/** The concurrency-control families compared in the benchmark. */
export type Family = 'naive' | 'guarded' | 'for-update' | 'advisory' | 'optimistic' | 'serializable' | 'idempotency' | 'redis';

/**
 * How a strategy is written:
 * - `pgcoord`: pgcoord's API;
 * - `same`: hand-written on postgres.js in the same SQL shape (same statements, same round trips) as pgcoord's;
 * - `begin`: hand-written the obvious way, inside `sql.begin` with one await per statement;
 * - `best`: hand-written in its best shape (pipelined: BEGIN + lock + read in one round trip,
 *   UPDATE + COMMIT in another, on `sql.reserve()`);
 * - `plain`: hand-written, a strategy with a single natural shape.
 */
export type Impl = 'pgcoord' | 'same' | 'begin' | 'best' | 'plain';

/** One strategy module. */
export interface Strategy {
  /** Unique id, `family/impl`. */
  id: string;
  family: Family;
  impl: Impl;
  /** Short human name for tables and charts. */
  label: string;
  /** False for the negative control: it is expected to over-refund. */
  expectCorrect: boolean;
  /** True when duplicate deliveries are deduplicated (idempotency keys). */
  dedupes: boolean;
  /** Needs Redis. */
  needsRedis?: boolean;
  /** Answer one refund request. Throws on errors it does not handle (counted by SQLSTATE). */
  refund(ctx: StrategyContext, req: RefundRequest): Promise<Outcome>;
}

/** postgres.js rows as the bench reads them. */
export type OrderRow = { total: number; refunded: number; version?: number };

/** True when refunding `amount` keeps the order within its total. */
export function fits(order: OrderRow | undefined, amount: number): order is OrderRow {
  return order !== undefined && order.refunded + amount <= order.total;
}

/** Serialization failure or deadlock: the transaction may simply be run again. */
export function retryable(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return code === '40001' || code === '40P01';
}
