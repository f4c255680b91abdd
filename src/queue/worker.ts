// Workers: claim keys whose head job can run, run each key's jobs one at a time in enqueue order,
// many keys at once (`concurrency`). A claim is a lease on the key, kept alive by one renewal
// statement for all the worker's keys; a worker that dies stops renewing, and its keys are taken
// over by another worker once their claims run out, with a greater fence, so the dead worker's
// completion (were it to come back) is refused. The job then runs again: at least once, in order;
// the handler's idempotency key makes its effect happen once.
//
// Expiry is decided on the database clock. The worker's own view of a claim is a trust window on
// its monotonic clock from the moment it sent the statement the server confirmed (send time + TTL
// − margin): when it runs out without a confirmed renewal, the job's signal aborts, before any
// other worker can take the key.

import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { performance } from 'node:perf_hooks';
import { isTransaction, type Row, type Runner, runStatement, type Statement } from '../driver/index.js';
import { CommitUnknownError, InvalidOptionError, isConnectFailure, isConnectionLost, UnsupportedRunnerError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { publishLost, type TraceContext, traced } from '../trace.js';
import { arm, joinWaiters } from '../wake.js';
import { checkName } from './enqueue.js';
import { JobClaimLostError, queueError } from './errors.js';
import { abandonStatement, claimStatement, completeStatement, failStatement, QUEUE_CHANNEL, renewStatement } from './statements.js';

const MAX_MS = 2_147_483_647;

/** A job as its handler gets it. */
export interface Job<P = unknown> {
  readonly queue: string;
  readonly key: string;
  /** Unique forever; within a key, the enqueue (commit) order. */
  readonly id: bigint;
  readonly payload: P;
  /** 1 for the first attempt (an attempt whose worker died counts). */
  readonly attempt: number;
  readonly enqueuedAt: Date;
  /** The fence of this worker's claim of the key: pass the job to {@link withJobFence} for fenced writes. */
  readonly fence: bigint;
  /** Aborts ({@link JobClaimLostError}) when this worker's claim of the key is over: stop the job. */
  readonly signal: AbortSignal;
  /**
   * A key unique to this job, the same on every attempt: give it to pgcoord's `idempotent()` (or
   * an external API's idempotency key) so the job's effect happens once however often it runs.
   */
  readonly idempotencyKey: string;
}

/** Options of {@link work}. */
export interface WorkOptions {
  /** How many keys this worker runs at once (1 to 1000, default 1); a key's jobs never run in parallel. */
  concurrency?: number;
  /**
   * How long a claim of a key lasts without renewal, in ms (1000 to 2147483647, default 15000): a
   * worker that dies holds its keys this long. Renewed every third of it while a job runs.
   */
  claimTtlMs?: number;
  /** Attempts before a job is dead and its key stops (1 to 1000, default 5). */
  maxAttempts?: number;
  /**
   * Delay before the next attempt after attempt `attempt` failed, in ms. Default 1 s doubled per
   * attempt up to 5 minutes. The job stays its key's head meanwhile: later jobs of the key wait.
   */
  retryDelayMs?: (attempt: number) => number;
  /** Jobs of one key run back to back before the key is released to the other keys' turn (default 16). */
  batch?: number;
  /** Who works, for people (`pgcoord queue`). Default `<hostname>:<pid>`. */
  holder?: string;
  /** Stops the worker like `stop()`. */
  signal?: AbortSignal;
  /**
   * Told of every failure: a handler's (the job is retried or dead; the error is also stored on the
   * job) and the worker's own (the database unreachable: it keeps trying). Default: nothing.
   */
  onError?: (err: unknown, job?: Job) => void;
}

/** A running worker. */
export interface Worker extends AsyncDisposable {
  /** Stop claiming, let running jobs finish, release their keys. Resolves once all of that is done. */
  stop(): Promise<void>;
}

interface Checked {
  queue: string;
  concurrency: number;
  ttlMs: number;
  marginMs: number;
  maxAttempts: number;
  retryDelayMs: (attempt: number) => number;
  batch: number;
  label: string;
  signal: AbortSignal | undefined;
  onError: (err: unknown, job?: Job) => void;
}

const isInt = (v: unknown, min: number, max: number): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max;

const defaultRetryDelay = (attempt: number) => Math.min(1000 * 2 ** Math.min(attempt - 1, 20), 300_000);

function checkOptions(queue: unknown, handler: unknown, options: WorkOptions): Checked {
  checkName(queue, 'queue');
  if (typeof handler !== 'function') throw new InvalidOptionError(`the job handler must be a function, got ${describe(handler)}`);
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('work options must be an object');
  const { concurrency = 1, claimTtlMs = 15_000, maxAttempts = 5, retryDelayMs = defaultRetryDelay, batch = 16 } = options;
  if (!isInt(concurrency, 1, 1000))
    throw new InvalidOptionError(`concurrency must be an integer from 1 to 1000, got ${describe(concurrency)}`);
  if (!isInt(claimTtlMs, 1000, MAX_MS))
    throw new InvalidOptionError(`claimTtlMs must be an integer from 1000 to ${MAX_MS}, got ${describe(claimTtlMs)}`);
  if (!isInt(maxAttempts, 1, 1000))
    throw new InvalidOptionError(`maxAttempts must be an integer from 1 to 1000, got ${describe(maxAttempts)}`);
  if (typeof retryDelayMs !== 'function') throw new InvalidOptionError(`retryDelayMs must be a function, got ${describe(retryDelayMs)}`);
  if (!isInt(batch, 1, 1_000_000)) throw new InvalidOptionError(`batch must be an integer from 1 to 1000000, got ${describe(batch)}`);
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal))
    throw new InvalidOptionError('signal must be an AbortSignal');
  if (options.onError !== undefined && typeof options.onError !== 'function') throw new InvalidOptionError('onError must be a function');
  let label = `${hostname()}:${process.pid}`;
  if (options.holder !== undefined) {
    const { holder } = options;
    if (typeof holder !== 'string' || holder.length === 0 || holder.length > 200)
      throw new InvalidOptionError(`holder must be a string of 1 to 200 characters, got ${describe(holder)}`);
    const problem = textProblem(holder);
    if (problem) throw new InvalidOptionError(`holder ${problem}`);
    label = holder;
  }
  return {
    queue: queue as string,
    concurrency,
    ttlMs: claimTtlMs,
    marginMs: Math.floor(claimTtlMs / 5),
    maxAttempts,
    retryDelayMs,
    batch,
    label,
    signal: options.signal,
    onError: options.onError ?? (() => {}),
  };
}

/** A key this worker holds: its claim's fence, the trust window, the signal its job gets. */
interface Claim {
  key: string;
  fence: bigint;
  controller: AbortController;
  deadline: number;
  timer: ReturnType<typeof setTimeout> | undefined;
}

const transient = (err: unknown) => err instanceof CommitUnknownError || isConnectionLost(err) || isConnectFailure(err);

/** An error as stored on the job: text a `text` column can hold, at most 2000 characters. */
function errorText(err: unknown): string {
  let s: string;
  try {
    s = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  } catch {
    s = describe(err);
  }
  s = s.slice(0, 2000).replaceAll('\0', '\uFFFD');
  return (s as string & { toWellFormed(): string }).toWellFormed();
}

const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    setTimeout(resolve, ms).unref?.();
  });

/**
 * Start a worker for `queue`: it claims keys whose head job can run, calls `handler` with each job,
 * deletes the job when the handler resolves and retries it (still its key's head) when it throws,
 * up to `maxAttempts`, then marks it dead and stops its key until {@link retryDeadJob} or
 * {@link skipDeadJob}. Other keys are never held up by a failing one.
 *
 * Wakes on LISTEN/NOTIFY when a key turns ready (on a connection of its own, from the pool: give a
 * pool, not a transaction), and polls every few seconds as a fallback (behind a transaction-mode
 * pooler, where LISTEN does not work, it polls every second).
 *
 * @throws {@link InvalidOptionError} for a bad queue name, handler or option (before anything is sent).
 * @example
 * const worker = work(sql, 'refunds', async (job) => {
 *   await idempotent(sql, { scope: 'refunds', key: job.idempotencyKey }, (ctx) => refund(ctx.tx, job.payload));
 * }, { concurrency: 4 });
 * // at shutdown
 * await worker.stop();
 */
export function work<P = unknown>(runner: Runner, queue: string, handler: (job: Job<P>) => unknown, options: WorkOptions = {}): Worker {
  const c = checkOptions(queue, handler, options);
  if (isTransaction(runner))
    throw new UnsupportedRunnerError(
      'a worker runs its own statements: pass a pool (postgres.js sql, pg Pool or a drizzle db), not a transaction',
    );
  const token = randomUUID();
  const claims = new Map<string, Claim>();
  const slots = new Set<Promise<void>>();
  let stopping = false;
  let kicked = false;
  let wakeLoop: (() => void) | undefined;
  let heartbeat: ReturnType<typeof setTimeout> | undefined;

  const kick = () => {
    kicked = true;
    wakeLoop?.();
  };

  const report = (err: unknown, job?: Job) => {
    try {
      c.onError(err, job);
    } catch {
      // the caller's logger failing must not stop the worker
    }
  };

  const lose = (claim: Claim, reason: 'lost' | 'lapsed') => {
    clearTimeout(claim.timer);
    if (claim.controller.signal.aborted) return;
    claim.controller.abort(new JobClaimLostError(c.queue, claim.key, claim.fence, reason));
    publishLost(() => ({ kind: 'job-claim', keys: [claim.key], reason, queue: c.queue }));
  };

  const trust = (claim: Claim, sentAt: number) => {
    claim.deadline = sentAt + c.ttlMs - c.marginMs;
    clearTimeout(claim.timer);
    claim.timer = setTimeout(() => lose(claim, 'lapsed'), Math.max(0, claim.deadline - performance.now()));
    claim.timer.unref?.();
  };

  // One statement renews every held key; a key missing from the answer was taken over. A key
  // answered but not renewed is held by the job's own fenced transaction: still ours, its trust
  // window is left as it is (never extended without the database's word) until a later beat.
  const renew = async () => {
    const held = [...claims.values()].filter((h) => !h.controller.signal.aborted);
    if (held.length === 0) return;
    const sentAt = performance.now();
    let rows: Row[];
    try {
      rows = await runStatement(runner, renewStatement(c.queue, token, c.ttlMs, held));
    } catch (err) {
      report(queueError(err));
      return; // transient: the trust windows run on; the next beat tries again
    }
    const current = new Map(rows.map((r) => [String(r.key), r.renewed === true || r.renewed === 't']));
    for (const h of held) {
      if (claims.get(h.key) !== h) continue;
      const renewed = current.get(h.key);
      if (renewed === undefined) lose(h, 'lost');
      else if (renewed) trust(h, sentAt);
    }
  };

  const beat = () => {
    heartbeat = setTimeout(
      () => {
        renew().finally(() => {
          if (!stopping || claims.size > 0) beat();
        });
      },
      Math.floor(c.ttlMs / 3),
    );
    heartbeat.unref?.();
  };

  // Release whatever this worker holds but does not know of (a claim whose answer was lost) now,
  // rather than when those claims run out.
  const abandonUnknown = () => {
    const known = [...claims.values()].map((h) => ({ key: h.key, fence: h.fence }));
    return runStatement(runner, abandonStatement(c.queue, token, known)).then(
      () => {},
      () => {},
    );
  };

  // A statement that moves the key on (complete, fail). Retried while the connection is the
  // problem and the claim may still be ours; refused (PGF01) means the key went to another worker.
  const settle = async (claim: Claim, statement: Statement, mayClaim: boolean): Promise<Row[] | undefined> => {
    let unknown = false;
    for (let tries = 0; ; tries++) {
      try {
        return await runStatement(runner, statement);
      } catch (raw) {
        const err = queueError(raw, { queue: c.queue, key: claim.key, fence: claim.fence });
        if (err instanceof JobClaimLostError) {
          if (!unknown) report(err);
          // after an unknown outcome, most likely our own first try committed (and, when it could
          // claim a next key, did so without our knowing)
          else if (mayClaim) await abandonUnknown();
          return undefined;
        }
        if (!transient(err) || tries >= 20 || performance.now() > claim.deadline + c.marginMs) {
          report(err);
          return undefined; // the claim runs out and the job runs again elsewhere
        }
        unknown ||= err instanceof CommitUnknownError;
        await sleep(Math.min(50 * 2 ** tries, 1000));
      }
    }
  };

  const toJob = (claim: Claim, row: Row): Job<P> => {
    const id = BigInt(String(row.job_id));
    return {
      queue: c.queue,
      key: claim.key,
      id,
      payload: JSON.parse(String(row.job_payload)) as P,
      attempt: Number(row.job_attempts),
      enqueuedAt: new Date(row.job_enqueued_at as string | Date),
      fence: claim.fence,
      signal: claim.controller.signal,
      idempotencyKey: `pgcoord-job:${id}`,
    };
  };

  const adopt = (row: Row, sentAt: number): Claim => {
    const claim: Claim = {
      key: String(row.claimed_key),
      fence: BigInt(String(row.claim_fence)),
      controller: new AbortController(),
      deadline: 0,
      timer: undefined,
    };
    trust(claim, sentAt);
    claims.set(claim.key, claim);
    return claim;
  };

  const drop = (claim: Claim) => {
    clearTimeout(claim.timer);
    if (claims.get(claim.key) === claim) claims.delete(claim.key);
  };

  const fail = async (claim: Claim, job: Job<P>, err: unknown) => {
    report(err, job);
    let retryIn: number | null = null;
    if (job.attempt < c.maxAttempts) {
      try {
        const ms = c.retryDelayMs(job.attempt);
        retryIn = isInt(ms, 0, MAX_MS) ? ms : defaultRetryDelay(job.attempt);
      } catch {
        retryIn = defaultRetryDelay(job.attempt);
      }
    }
    await settle(claim, failStatement(c.queue, claim.key, job.id, claim.fence, errorText(err), retryIn), false);
  };

  // Run one job and settle it: fail (retry or dead) when the handler throws, else complete, keeping
  // the key or taking the next one when `keep()` says so. The row of the worker's next job, if any.
  const processJob = async (
    claim: Claim,
    job: Job<P>,
    keep: () => boolean,
    sentAt: { at: number },
    ctx: TraceContext | undefined,
  ): Promise<Row | undefined> => {
    try {
      await handler(job);
    } catch (err) {
      const dead = job.attempt >= c.maxAttempts;
      await fail(claim, job, err);
      if (ctx) ctx.outcome = claim.controller.signal.aborted ? 'lost' : dead ? 'dead' : 'retry';
      return undefined;
    }
    const next = { keep: keep(), takeNext: !stopping, holder: token, label: c.label, ttlMs: c.ttlMs };
    sentAt.at = performance.now();
    const rows = await settle(claim, completeStatement(c.queue, claim, job.id, next), next.takeNext);
    if (ctx) ctx.outcome = rows ? 'completed' : 'lost';
    return rows?.[0];
  };

  // One slot: a key's jobs back to back (up to `batch`), then whichever key the statement that
  // completed the last one claimed next, and so on, until no key is ready or the worker stops.
  const runSlot = async (first: Row, firstSentAt: number) => {
    let claim = adopt(first, firstSentAt);
    let row: Row | undefined = first;
    try {
      for (let n = 1; row; n++) {
        const job = toJob(claim, row);
        const current = claim;
        const keep = () => !stopping && n < c.batch && !current.controller.signal.aborted;
        const sentAt = { at: 0 };
        // one traced operation per job: the handler, then the statement that settles it
        row = await traced(
          'queue',
          () => ({ operation: 'process', queue: c.queue, keys: [job.key], attempts: job.attempt }),
          (ctx) => processJob(current, job, keep, sentAt, ctx),
        );
        if (!row) break;
        if (String(row.claimed_key) === claim.key && BigInt(String(row.claim_fence)) === claim.fence) trust(claim, sentAt.at);
        else {
          drop(claim);
          claim = adopt(row, sentAt.at);
          n = 0;
        }
      }
    } finally {
      drop(claim);
    }
  };

  const start = (row: Row, sentAt: number) => {
    const slot: Promise<void> = runSlot(row, sentAt).finally(() => {
      slots.delete(slot);
      kick();
    });
    slots.add(slot);
  };

  const loop = async () => {
    const waiting = await joinWaiters(runner, QUEUE_CHANNEL);
    let failures = 0;
    try {
      while (!stopping) {
        kicked = false;
        const armed = arm(waiting.listener, [c.queue], `worker of queue ${JSON.stringify(c.queue)}`);
        const free = c.concurrency - slots.size;
        let nextInMs: number | undefined;
        if (free > 0) {
          const sentAt = performance.now();
          let rows: Row[];
          try {
            rows = await runStatement(runner, claimStatement(c.queue, token, c.label, free, c.ttlMs));
            failures = 0;
          } catch (raw) {
            armed.disarm();
            const err = queueError(raw);
            report(err);
            // what that claim took (if it committed) is released now rather than at its expiry
            if (err instanceof CommitUnknownError) await abandonUnknown();
            // a worker started before the deploy's migration, or with the database away: keep trying
            await sleep(Math.min(100 * 2 ** failures++, 5000));
            continue;
          }
          let claimed = 0;
          for (const row of rows) {
            if (row.claimed_key === null) nextInMs = row.next_in_ms === null ? undefined : Number(row.next_in_ms);
            else {
              claimed++;
              start(row, sentAt);
            }
          }
          if (claimed === free) {
            armed.disarm();
            continue; // every slot busy: the loop waits for one below, at the next turn
          }
          if (claimed > 0 && nextInMs === 0) {
            armed.disarm();
            continue; // more keys were ready than this claim could take (skipped, or settled)
          }
        }
        if (kicked || stopping) {
          armed.disarm();
          continue;
        }
        const wake = new AbortController();
        wakeLoop = () => wake.abort();
        // a ready key this claim did not get (another worker is on its row right now): look again soon
        const wait = nextInMs === 0 ? 20 : nextInMs;
        await armed.sleep(free > 0 ? wait : undefined, MAX_MS, wake.signal).catch(() => {});
        wakeLoop = undefined;
      }
    } finally {
      waiting.leave();
    }
  };

  beat();
  const running = loop().catch((err: unknown) => {
    report(err);
  });
  let stopped: Promise<void> | undefined;
  const stop = () => {
    stopped ??= (async () => {
      stopping = true;
      kick();
      await running;
      while (slots.size > 0) await Promise.all([...slots]);
      clearTimeout(heartbeat);
    })();
    return stopped;
  };
  if (c.signal) {
    if (c.signal.aborted) void stop();
    else c.signal.addEventListener('abort', () => void stop(), { once: true });
  }
  return { stop, [Symbol.asyncDispose]: stop };
}
