// The public surface, written down: a change to it shows here in review (as DistributedLock's
// PublicAPI.Shipped.txt does). Plus direct tests of the small exports the feature tests reach only
// indirectly.
import { sql as dsql } from 'drizzle-orm';
import { drizzle } from 'drizzle-orm/postgres-js';
import { describe, expect, it } from 'vitest';
import * as cli from '../src/cli/api.js';
import * as api from '../src/index.js';
import * as otel from '../src/otel/index.js';
import * as testing from '../src/testing/index.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(4);

describe('public API', () => {
  it('exports exactly these names', () => {
    expect(Object.keys(api).sort()).toMatchInlineSnapshot(`
      [
        "AbortedError",
        "CommitUnknownError",
        "ConnectionLostError",
        "DeadlockError",
        "ERROR_CODES",
        "FinalFailure",
        "IdempotencyBodyInvalidError",
        "IdempotencyBodyTooLargeError",
        "IdempotencyError",
        "IdempotencyInFlightError",
        "IdempotencyKeyInvalidError",
        "IdempotencyKeyMissingError",
        "IdempotencyLeaseLostError",
        "IdempotencyMigrationError",
        "IdempotencyMismatchError",
        "IdempotencyNotMigratedError",
        "IdempotencyResponseNotStorableError",
        "IdempotencyScopeInvalidError",
        "IdempotencyScopeRequiredError",
        "IdempotentFailureError",
        "InvalidIdentifierError",
        "InvalidKeyError",
        "InvalidOptionError",
        "JobClaimLostError",
        "LeaseLostError",
        "LeaseMigrationError",
        "LeaseNotAcquiredError",
        "LeaseTimeoutError",
        "LeasesNotMigratedError",
        "LimitMigrationError",
        "LimitsNotMigratedError",
        "LockLostError",
        "LockNotAcquiredError",
        "LockTimeoutError",
        "MAX_PAYLOAD_CHARS",
        "NotInTransactionError",
        "PgcoordError",
        "QueueMigrationError",
        "QueueNotMigratedError",
        "RateLimitTimeoutError",
        "RetryExhaustedError",
        "RowLockedError",
        "RowNotFoundError",
        "STALE_FENCE_SQLSTATE",
        "SingleFlightTimeoutError",
        "TRACE_FAMILIES",
        "TransactionPoolingError",
        "UnsupportedRunnerError",
        "VersionConflictError",
        "acquireLease",
        "acquirePermit",
        "acquireSessionLock",
        "claim",
        "decodeLockRow",
        "enqueue",
        "flightValues",
        "guardedUpdate",
        "hashKey",
        "holdWarningChannel",
        "idempotencyExpress",
        "idempotencyFastify",
        "idempotencyHono",
        "idempotencyKeys",
        "idempotencyMigrations",
        "idempotencySql",
        "idempotencyTable",
        "idempotent",
        "isConnectionLost",
        "isLeaseLost",
        "leader",
        "leaseFence",
        "leaseMigrations",
        "leaseSql",
        "leases",
        "limit",
        "limitSql",
        "listQueueKeys",
        "lockChannels",
        "lockKey",
        "lockKeys",
        "lockRows",
        "lostChannel",
        "migrateIdempotency",
        "migrateLeases",
        "migrateLimits",
        "migrateQueue",
        "parseIdempotencyKey",
        "phaseKey",
        "purgeExpired",
        "queueFence",
        "queueJobId",
        "queueJobs",
        "queueKeys",
        "queueMigrations",
        "queueOrder",
        "queueSql",
        "queueStats",
        "rateLimitExpress",
        "rateLimitFastify",
        "rateLimitHono",
        "rateLimits",
        "retry",
        "retryDeadJob",
        "retryReason",
        "runSingleton",
        "singleFlight",
        "singletonRuns",
        "skipDeadJob",
        "sqlState",
        "traceChannels",
        "transaction",
        "transactionWithRetry",
        "tryAcquireLease",
        "tryAcquirePermit",
        "tryAcquireSessionLock",
        "tryWithLock",
        "updateVersioned",
        "waitForLimit",
        "warnOnLongHolds",
        "withFence",
        "withJobFence",
        "withLease",
        "withLock",
        "withPermit",
        "withRowLock",
        "work",
      ]
    `);
    expect(Object.keys(cli).sort()).toMatchInlineSnapshot(`
      [
        "CliFailedError",
        "CliUsageError",
        "checkQueueArgument",
        "doctor",
        "formatDoctor",
        "formatLeases",
        "formatLocks",
        "formatQueueAction",
        "formatQueueKeys",
        "formatQueueStats",
        "generateMigration",
        "isCockroachVersion",
        "listLeases",
        "listLocks",
        "purgeWithProgress",
        "queueAction",
      ]
    `);
    expect(Object.keys(otel).sort()).toMatchInlineSnapshot(`
      [
        "instrumentPgcoord",
      ]
    `);
    expect(Object.keys(testing).sort()).toMatchInlineSnapshot(`
      [
        "createTestDatabase",
        "setupTestServer",
        "startEmbeddedPostgres",
        "startTestServer",
      ]
    `);
  });

  it('every exported error class extends PgcoordError', () => {
    const errors = Object.entries(api).filter(
      ([name, value]) => typeof value === 'function' && name.endsWith('Error') && name !== 'PgcoordError',
    );
    expect(errors.length).toBeGreaterThan(20);
    for (const [name, Ctor] of errors) {
      expect(Object.create((Ctor as { prototype: object }).prototype), name).toBeInstanceOf(api.PgcoordError);
    }
  });
});

describe('small exports', () => {
  it('lockKeys dedups, validates and sorts into one global order (int8 keys, then pairs)', () => {
    const keys = api.lockKeys(['b', 5n, [1, 2], 'b', -3, [0, 9], 5]);
    expect(keys).toHaveLength(5); // 5 and 5n are one key, 'b' twice is one key
    expect(keys.filter((k) => k.space === 'int8').map((k) => (k as { id: bigint }).id)).toEqual(
      [api.hashKey('b'), 5n, -3n].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)),
    );
    expect(keys.slice(-2).map((k) => k.label)).toEqual(['[0,9]', '[1,2]']);
    expect(api.lockKeys([1, 2])).toHaveLength(1); // [1, 2] alone is one pair key
    expect(() => api.lockKeys([])).toThrow(api.InvalidKeyError);
  });

  it('lockChannels are the diagnostics channels lock events go to', async () => {
    const seen: api.LockEvent[] = [];
    const on = (e: unknown) => seen.push(e as api.LockEvent);
    api.lockChannels.acquire.subscribe(on);
    try {
      await api.withLock(db.sql, 'channels', () => 1);
    } finally {
      api.lockChannels.acquire.unsubscribe(on);
    }
    expect(seen.map((e) => e.outcome)).toEqual(['acquired']);
  });

  it('sqlState and isConnectionLost look through drizzle-wrapped errors', async () => {
    const dz = drizzle(db.newSql({ max: 1 }));
    const err = await dz.execute(dsql`select 1/0`).catch((e) => e);
    expect(err.code).toBeUndefined(); // drizzle wraps: the SQLSTATE is on err.cause.code
    expect(api.sqlState(err)).toBe('22012');
    expect(api.isConnectionLost(err)).toBe(false);
    const lost = await dz.execute(dsql`select pg_terminate_backend(pg_backend_pid())`).catch((e) => e);
    expect(api.isConnectionLost(lost)).toBe(true);
    expect(api.isConnectionLost(new api.ConnectionLostError())).toBe(true);
    expect(api.sqlState(new Error('plain'))).toBeUndefined();
  });

  it('DeadlockError: two callers taking single keys in opposite orders inside their transactions', async () => {
    const a = db.newSql({ max: 1 });
    const b = db.newSql({ max: 1 });
    const order = async (sql: typeof db.sql, first: string, second: string) =>
      sql
        .begin(async (tx) => {
          await tx`set local deadlock_timeout = '100ms'`;
          await api.withLock(tx, first, () => {});
          await tx`select pg_sleep(0.2)`;
          await api.withLock(tx, second, () => {});
        })
        .then(
          () => 'done',
          (e) => e,
        );
    const results = await Promise.all([order(a, 'dl-1', 'dl-2'), order(b, 'dl-2', 'dl-1')]);
    const victims = results.filter((r) => r instanceof api.DeadlockError);
    expect(victims).toHaveLength(1);
    expect(victims[0]!.code).toBe('PGCOORD_DEADLOCK');
    expect(results).toContain('done');
  });
});
