export {
  isLeaseLost,
  type LeaseLossReason,
  LeaseLostError,
  LeaseNotAcquiredError,
  LeasesNotMigratedError,
  LeaseTimeoutError,
  STALE_FENCE_SQLSTATE,
} from './errors.js';
export { type LeaderOptions, type Leadership, leader } from './leader.js';
export { acquireLease, type Fence, type Lease, type LeaseOptions, tryAcquireLease, withFence, withLease } from './lease.js';
export { LeaseMigrationError, leaseMigrations, leaseSql, migrateLeases } from './migrate.js';
export { flightValues, leaseFence, leases, singletonRuns } from './schema.js';
export { acquirePermit, type PermitOptions, tryAcquirePermit, withPermit } from './semaphore.js';
export { type SingleFlightOptions, type SingleFlightResult, SingleFlightTimeoutError, singleFlight } from './single-flight.js';
export { type BusyPolicy, runSingleton, type SingletonOptions, type SingletonResult } from './singleton.js';
