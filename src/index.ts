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
export { acquireSessionLock, type SessionLock, type SessionLockOptions, tryAcquireSessionLock } from './session-lock.js';
export { type Isolation, type Runner, type TransactionOptions, transaction } from './transaction.js';
