// pgcoord/cli: what the `pgcoord` command does, as functions for code (doctor, generate, locks, leases,
// purge, queue). Kept out of the main entry: a service needs none of it to coordinate.

export { type DoctorFinding, type DoctorOptions, type DoctorReport, doctor, formatDoctor, isCockroachVersion } from './doctor.js';
export { CliFailedError, CliUsageError } from './errors.js';
export { type GenerateOptions, type GenerateResult, generateMigration } from './generate.js';
export { formatLeases, type LeaseInfo, listLeases } from './leases.js';
export { type AdvisoryLockInfo, formatLocks, type KeyCandidate, type ListLocksOptions, listLocks } from './locks.js';
export { type PurgeCliOptions, type PurgeCliResult, purgeWithProgress } from './purge.js';
export {
  checkQueueArgument,
  formatQueueAction,
  formatQueueKeys,
  formatQueueStats,
  type QueueActionResult,
  queueAction,
} from './queue.js';
