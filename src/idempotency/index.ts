export {
  FinalFailure,
  IdempotencyBodyInvalidError,
  IdempotencyBodyTooLargeError,
  IdempotencyError,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyKeyMissingError,
  IdempotencyLeaseLostError,
  IdempotencyMigrationError,
  IdempotencyMismatchError,
  IdempotencyNotMigratedError,
  IdempotencyResponseNotStorableError,
  IdempotencyScopeInvalidError,
  IdempotencyScopeRequiredError,
  IdempotentFailureError,
} from './errors.js';
export { idempotencyExpress } from './express.js';
export { idempotencyFastify } from './fastify.js';
export {
  canonicalJson,
  FINGERPRINT_VERSION,
  fingerprintOf,
  phaseKey,
  type RequestBody,
  type RequestIdentity,
  requestFingerprint,
} from './fingerprint.js';
export { type IdempotencyVariables, idempotencyHono } from './hono.js';
export {
  DEFAULT_REPLAY_HEADERS,
  defaultStore,
  type HttpIdempotencyOptions,
  parseIdempotencyKey,
  problemResponse,
  replayResponse,
} from './http.js';
export { idempotencyMigrations, idempotencySql, type MigrateOptions, type MigrateResult, type Migration, migrate } from './migrate.js';
export type { IdempotentUpdateResult, UpdateIdempotency } from './one-statement.js';
export type { IdempotentPlan, IdempotentPlanContext, IdempotentWrites } from './plan.js';
export { type PurgeOptions, type PurgeResult, purgeExpired } from './purge.js';
export {
  beginIdempotent,
  type IdempotencyMode,
  type IdempotencyOptions,
  type IdempotentAttempt,
  type IdempotentContext,
  type IdempotentResult,
  idempotent,
  type PhaseContext,
  type Start,
  type StoredResponse,
} from './run.js';
export { type IdempotencyState, type IdempotencyTable, type IdempotencyTableNames, idempotencyKeys, idempotencyTable } from './schema.js';
