export { LimitsNotMigratedError, RateLimitTimeoutError } from './errors.js';
export { type HttpRateLimitOptions, rateLimitExpress, rateLimitFastify, rateLimitHono } from './http.js';
export { LimitMigrationError, limitSql, migrateLimits } from './migrate.js';
export { limit, type RateLimitDecision, type RateLimitOptions, type WaitForLimitOptions, waitForLimit } from './rate.js';
export { rateLimits } from './schema.js';
