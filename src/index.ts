export { type LockMode, type LockOptions, tryWithLock, withLock } from './advisory.js';
export {
  AbortedError,
  CommitUnknownError,
  ConnectionLostError,
  DeadlockError,
  InvalidKeyError,
  InvalidOptionError,
  isConnectionLost,
  LockLostError,
  LockNotAcquiredError,
  LockTimeoutError,
  PgcoordError,
  sqlState,
  TransactionPoolingError,
  UnsupportedRunnerError,
} from './errors.js';
export { type LockEvent, lockChannels } from './events.js';
export { type GuardedResult, type GuardedUpdate, type GuardedUpdateOptions, guardedUpdate } from './guarded-update.js';
export type { HandleOf } from './handles.js';
export {
  type AdvisoryLockRow,
  type DecodedKey,
  decodeLockRow,
  hashKey,
  type LockKey,
  type LockKeyInput,
  lockKey,
  lockKeys,
} from './keys.js';
export {
  type DrizzleVersionedUpdate,
  type SqlVersionedUpdate,
  updateVersioned,
  type Version,
  VersionConflictError,
} from './optimistic.js';
export {
  type Attempt,
  RetryExhaustedError,
  type RetryOptions,
  type RetryReason,
  retry,
  retryReason,
  type TransactionRetryOptions,
  transactionWithRetry,
} from './retry.js';
export {
  type ClaimOptions,
  claim,
  type DrizzleRowTarget,
  type LockStrength,
  lockRows,
  NotInTransactionError,
  RowLockedError,
  type RowLockOptions,
  RowNotFoundError,
  type RowWait,
  type SqlRowTarget,
  withRowLock,
} from './row-locks.js';
export { acquireSessionLock, type SessionLock, type SessionLockOptions, tryAcquireSessionLock } from './session-lock.js';
export { InvalidIdentifierError, quoteIdent, type SqlTarget } from './sql-target.js';
export { type Isolation, type Runner, type TransactionOptions, transaction } from './transaction.js';
