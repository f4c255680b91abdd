// The figures of one strategy in one scenario, as the terminal table, the JSON and the HTML show them.
import type { Latency } from './stats.js';
import type { Family, Impl } from './strategies/types.js';
import type { Audit } from './workload.js';

/** Correctness verdict: WRONG = money beyond totals or an acknowledged refund missing. */
export type Verdict = 'OK' | 'WRONG' | 'DUP-PAID' | 'SKIPPED';

/** One row of the results. */
export interface StrategyResult {
  id: string;
  family: Family;
  impl: Impl | 'pgbench' | 'pgbench-pipelined';
  label: string;
  /** Hot-key / spread level: number of orders. */
  orders: number;
  verdict: Verdict;
  /** Why a run was skipped or what to know about it. */
  note?: string;
  expectCorrect: boolean;
  dedupes: boolean;
  /** Requests answered (including rejections and replays). */
  completed: number;
  /** New refunds taken (replays excluded). */
  refunds: number;
  rejected: number;
  replays: number;
  failed: number;
  seconds: number;
  refundsPerSec: number;
  latency: Latency;
  /** Attempts (first tries + retries after conflicts + lock polls that found the lock taken) per successfully answered request. */
  attemptsPerSuccess: number;
  /** Postgres round trips per answered request (client socket flushes; script-derived for pgbench). */
  roundTripsPerRequest: number;
  /** Redis round trips per answered request (Redis lock only). */
  redisTripsPerRequest?: number;
  errors: Record<string, number>;
  audit: Audit;
}

/** The verdict from the audit: over-refund or a lost acknowledgement is WRONG; a duplicate payout is DUP-PAID. */
export function verdictOf(a: Audit): Verdict {
  if (a.overRefund > 0 || a.ackedMissing > 0) return 'WRONG';
  if (a.duplicateCalls > 0) return 'DUP-PAID';
  return 'OK';
}
