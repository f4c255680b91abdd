export { listQueueKeys, type QueueKeyInfo, type QueueStats, queueStats, retryDeadJob, skipDeadJob, withJobFence } from './admin.js';
export { type Enqueued, type EnqueueOptions, enqueue, MAX_PAYLOAD_CHARS } from './enqueue.js';
export { JobClaimLostError, QueueNotMigratedError } from './errors.js';
export { migrateQueue, QueueMigrationError, queueMigrations, queueSql } from './migrate.js';
export { queueFence, queueJobId, queueJobs, queueKeys, queueOrder } from './schema.js';
export { type Job, type Worker, type WorkOptions, work } from './worker.js';
