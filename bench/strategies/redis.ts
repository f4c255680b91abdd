// The seed's Redis lock around the same Postgres read and write: SET key token NX PX ttl, poll
// while taken, release with a Lua compare-and-delete. The lock lives in another system than the
// data, and it expires on a timer: a holder that pauses longer than the TTL loses it without
// knowing (see bench/fault.ts).
import { randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import { ADD_REFUND, SELECT_ORDER } from '../sql.js';
import { order, PREPARED } from './reserved.js';
import { fits, type Strategy, type StrategyContext } from './types.js';

/** Delete the key only if it still holds our token (a plain DEL could free someone else's lock). */
export const COMPARE_AND_DELETE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/** Lock TTL for the normal runs: far longer than any critical section here. */
export const REDIS_TTL_MS = 5000;

/** Redis key of an order's lock. */
export const redisKey = (orderId: number) => `pgcoord-bench:order:${orderId}`;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Take the lock, polling every 1–2 ms while it is taken (Redis has no wait queue).
 * Each failed poll counts as an extra attempt.
 */
export async function acquireRedisLock(ctx: Pick<StrategyContext, 'retry' | 'redisTrip'>, redis: Redis, key: string, ttlMs: number) {
  const token = randomUUID();
  for (;;) {
    ctx.redisTrip();
    if ((await redis.set(key, token, 'PX', ttlMs, 'NX')) === 'OK') return token;
    ctx.retry();
    await sleep(1 + Math.random());
  }
}

/** Release: true when the lock was still ours. */
export async function releaseRedisLock(
  ctx: Pick<StrategyContext, 'redisTrip'>,
  redis: Redis,
  key: string,
  token: string,
): Promise<boolean> {
  ctx.redisTrip();
  return (await redis.eval(COMPARE_AND_DELETE, 1, key, token)) === 1;
}

/** Redis lock + two autocommit Postgres statements (read, write) = 2 PG + 2 Redis round trips. */
export const redisLock: Strategy = {
  id: 'redis/plain',
  family: 'redis',
  impl: 'plain',
  label: 'Redis lock (SET NX PX) + PG',
  expectCorrect: true,
  dedupes: false,
  needsRedis: true,
  async refund(ctx, req) {
    const redis = ctx.redis;
    if (!redis) throw new Error('Redis is not available');
    const key = redisKey(req.orderId);
    const token = await acquireRedisLock(ctx, redis, key, REDIS_TTL_MS);
    try {
      const o = order(await ctx.sql.unsafe(SELECT_ORDER, [req.orderId], PREPARED));
      if (!fits(o, req.amount)) return 'rejected';
      await ctx.gateway.pay(req);
      await ctx.sql.unsafe(ADD_REFUND, [req.orderId, req.amount, req.requestId], PREPARED);
      return 'refunded';
    } finally {
      await releaseRedisLock(ctx, redis, key, token);
    }
  },
};
