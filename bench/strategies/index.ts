// The registry: every strategy the benchmark runs, in table order. Adding a strategy = writing one
// module that exports a `Strategy` and listing it here.
import { advisoryBegin, advisoryBest, advisorySame } from './advisory.js';
import { forUpdateBegin, forUpdateBest } from './for-update.js';
import { guarded } from './guarded.js';
import { idempotency } from './idempotency.js';
import { naive } from './naive.js';
import { optimistic } from './optimistic.js';
import { pgcoordAdvisory, pgcoordAdvisoryCallback } from './pgcoord-advisory.js';
import { pgcoordIdempotencyOne, pgcoordIdempotencyPlan } from './pgcoord-idempotency.js';
import { pgcoordForUpdate, pgcoordGuarded, pgcoordIdempotency, pgcoordOptimistic, pgcoordSerializable } from './pgcoord-others.js';
import { redisLock } from './redis.js';
import { forUpdateSame, guardedSame, idempotencySame, optimisticSame } from './same-shape.js';
import { serializableBegin, serializableBest } from './serializable.js';
import type { Strategy } from './types.js';

export type { Family, Impl, Outcome, Strategy, StrategyContext } from './types.js';

/** All in-process strategies, in the order they run and are shown. */
export const strategies: readonly Strategy[] = [
  naive,
  guarded,
  guardedSame,
  pgcoordGuarded,
  forUpdateBegin,
  forUpdateBest,
  forUpdateSame,
  pgcoordForUpdate,
  advisoryBegin,
  advisorySame,
  advisoryBest,
  pgcoordAdvisory,
  pgcoordAdvisoryCallback,
  optimistic,
  optimisticSame,
  pgcoordOptimistic,
  serializableBegin,
  serializableBest,
  pgcoordSerializable,
  idempotency,
  idempotencySame,
  pgcoordIdempotencyOne,
  pgcoordIdempotencyPlan,
  pgcoordIdempotency,
  redisLock,
];
