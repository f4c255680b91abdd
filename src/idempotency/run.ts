// Run a piece of work once per (scope, key) and hand the stored result to every repeat.
//
// The whole protocol is four statements on one table (schema.ts), each safe on its own under
// concurrency, so no code path reads and then writes:
//
//   claim      INSERT ... ON CONFLICT (scope, key) DO UPDATE ... WHERE <takeover allowed> RETURNING
//              plus, in the same statement, the existing row when nothing was claimed.
//   phase      UPDATE ... SET recovery_point ... WHERE lease_token = <ours> AND state = 'running'
//   heartbeat  UPDATE ... SET lease_expires_at ... WHERE lease_token = <ours> AND state = 'running'
//   complete   UPDATE ... SET state = 'completed', response ... WHERE lease_token = <ours> AND state = 'running'
//
// Transactional mode (default) sends the claim, the handler's statements and `complete` in one
// transaction: until it commits nobody else sees the row, and a crash rolls all of it back.
// Phased mode commits the claim at once (with a short lease kept alive by heartbeats), then each
// phase with its recovery point, so a retry after a crash resumes after the last committed phase.
//
// Round trips (one = the client sends and waits for the answer; postgres.js pipelines statements
// issued without awaiting in between, so each line below is one; counted on a connection that has
// already run these statements once: the runner prepares them, and postgres.js's first run of a
// parameterized statement on a connection, or every run on a pool made with `prepare: false`,
// adds a Parse/Describe round trip of its own). N = the handler's own round trips.
//
//   reference: the handler alone in pgcoord's own transaction: BEGIN rides with its first
//   statement, then COMMIT:                                               N + 1
//   transactional, first call:  BEGIN + claim (+ lock_timeout set/reset)   1
//                               the handler's statements                   N
//                               complete + COMMIT                          1   = N + 2: one extra
//   transactional, replay:      BEGIN + claim; the caller is answered here 1
//                               COMMIT, sent after the answer and not waited for by the caller
//                               (it ends a transaction that wrote nothing and frees the row lock
//                               the claim's conflict branch took; the pooled connection is busy
//                               for that one more round trip)
//   phased, claim:              BEGIN + claim + COMMIT                     1   (also a replay)
//   phased, each phase:         BEGIN rides with the phase's first statement, then recovery
//                               point + COMMIT                             N + 1: none extra
//   phased, heartbeat / complete / release:  BEGIN + update + COMMIT       1 each
//   joined (a caller's transaction): SAVEPOINT + claim                     1
//                               complete + RELEASE SAVEPOINT               1   (a replay: claim,
//                               then RELEASE SAVEPOINT before answering: 2)
// node-postgres does not pipeline (unless the client was made with `pipeline: true`): there every
// statement is a round trip of its own, and `scope.call` sends BEGIN by itself.
//
// COMMIT rides in the same round trip as the last write, so that write must abort the transaction
// when it matches no row (a lost lease): `fenced()` turns "no row" into an error, the pipelined
// COMMIT then only rolls back, and nothing the handler or phase wrote is committed without its
// fence. A connection lost with COMMIT in flight rejects with CommitUnknownError: either all of
// it committed (the row is completed, or has its new recovery point) or none of it did (the key
// stays retryable: transactional leaves no row; phased leaves the previous recovery point, free
// once the lease runs out).

import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { timeoutStatements } from '../advisory.js';
import { type Conn, inTransaction, isTransaction, type Row, type Runner, type Statement } from '../driver/index.js';
import { AbortedError, ConnectionLostError, InvalidOptionError, PgcoordError, sqlState } from '../errors.js';
import type { HandleOf } from '../handles.js';
import { describe } from '../text.js';
import {
  FinalFailure,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyLeaseLostError,
  IdempotencyMismatchError,
  IdempotencyNotMigratedError,
  IdempotencyScopeInvalidError,
  IdempotencyScopeRequiredError,
  IdempotentFailureError,
} from './errors.js';
import { FINGERPRINT_VERSION, phaseKey } from './fingerprint.js';
import {
  type Checked,
  checkOptions,
  type IdempotencyOptions,
  type IdempotentContext,
  type IdempotentResult,
  type StoredResponse,
} from './options.js';
import { checkPhase, claimPhased } from './phased.js';
import { outcomeOf, toStored } from './stored.js';

export {
  type Checked,
  checkKey,
  checkOptions,
  type IdempotencyMode,
  type IdempotencyOptions,
  type IdempotentContext,
  type IdempotentResult,
  type PhaseContext,
  type StoredResponse,
} from './options.js';

import { traced } from '../trace.js';
import { type IdempotentPlan, idempotentPlan, isIdempotentPlan } from './plan.js';
import { claimStatement, isLeaseLost } from './statements.js';

export function mapError(err: unknown, c: Checked): unknown {
  if (sqlState(err) === '42P01') return new IdempotencyNotMigratedError(c.sql.label, { cause: err });
  if (c.signal?.aborted && !(err instanceof PgcoordError)) return new AbortedError('idempotent call aborted', { cause: err });
  return err;
}

// ---------------------------------------------------------------- claim answers

/** The row as a claim saw it. */
export interface Seen {
  claimed: boolean;
  state: string;
  attempts: number;
  recoveryPoint: string;
  recoveryData: Record<string, unknown>;
  leaseLeftMs: number;
  response?: StoredResponse;
}

export type Step =
  | { kind: 'run'; seen: Seen }
  | { kind: 'replay'; response: StoredResponse }
  | { kind: 'inflight'; retryAfterMs: number }
  | { kind: 'miss' };

export function toBuffer(x: unknown): Buffer {
  if (Buffer.isBuffer(x)) return x;
  if (x instanceof Uint8Array) return Buffer.from(x);
  if (typeof x === 'string' && x.startsWith('\\x')) return Buffer.from(x.slice(2), 'hex');
  return Buffer.alloc(0);
}

export function readSeen(row: Row | undefined, c: Checked): Step {
  if (!row) return { kind: 'miss' };
  const seen: Seen = {
    claimed: row.claimed === true,
    state: String(row.state),
    attempts: Number(row.attempts),
    recoveryPoint: String(row.recovery_point),
    recoveryData: row.recovery_data ? JSON.parse(String(row.recovery_data)) : {},
    leaseLeftMs: Number(row.lease_left_ms ?? 0),
  };
  if (seen.claimed) return { kind: 'run', seen };
  // Rows of another fingerprint version cannot be compared; the claim treats them the same way.
  if (Number(row.fingerprint_version) === FINGERPRINT_VERSION && !toBuffer(row.fingerprint).equals(c.fingerprint)) {
    throw new IdempotencyMismatchError(c.scope, c.key);
  }
  if (seen.state === 'completed') {
    return {
      kind: 'replay',
      response: {
        status: Number(row.response_status),
        headers: row.response_headers ? JSON.parse(String(row.response_headers)) : {},
        body: toBuffer(row.response_body),
      },
    };
  }
  if (seen.state === 'running' && seen.leaseLeftMs > 0) return { kind: 'inflight', retryAfterMs: seen.leaseLeftMs };
  return { kind: 'miss' }; // freed between the two branches' snapshots: claim again
}

// ---------------------------------------------------------------- attempts

/** A claimed attempt, driven by the wrapper or the middleware. */
export interface IdempotentAttempt<H> {
  readonly context: IdempotentContext<H>;
  /** What the handler asked for with `decide()`. */
  readonly decision: 'final' | 'retryable' | undefined;
  /**
   * End the attempt: `store` true commits the work (transactional) and the response; false rolls
   * the work back (transactional) or marks the key retryable (phased). Rejects when the outcome
   * could not be committed (then nothing was stored).
   */
  finish(response: StoredResponse, store: boolean): Promise<void>;
  /**
   * End the attempt after an error: nothing is stored and the key stays retryable. Never rejects;
   * resolves to the error to report: `error`, or the transaction's {@link ConnectionLostError}
   * when its connection died under the handler (the handler then saw the driver's raw error).
   */
  fail(error: unknown): Promise<unknown>;
}

/** The outcome of {@link beginIdempotent}: replay a stored response, or run the work. */
export type Start<H> = { kind: 'replay'; response: StoredResponse } | { kind: 'run'; attempt: IdempotentAttempt<H> };

function deferred<T>() {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new AbortedError('idempotent call aborted while waiting', { cause: signal.reason }));
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(new AbortedError('idempotent call aborted while waiting', { cause: signal?.reason }));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export function anySignal(signals: (AbortSignal | undefined)[]): AbortSignal {
  return AbortSignal.any(signals.filter((s): s is AbortSignal => s !== undefined));
}

/**
 * Claim (scope, key), waiting for an in-flight attempt per `waitMs`. The engine under
 * {@link idempotent} and the HTTP middleware; exported for custom integrations.
 *
 * @throws {@link IdempotencyMismatchError}, {@link IdempotencyInFlightError}, {@link IdempotencyNotMigratedError}.
 */
export async function beginIdempotent<H>(runner: Runner, options: IdempotencyOptions | Checked): Promise<Start<H>> {
  const c = 'sql' in options ? (options as Checked) : checkOptions(options as IdempotencyOptions);
  if (c.mode === 'phased') {
    if (isTransaction(runner))
      throw new InvalidOptionError(
        'phased mode commits each phase itself: pass a pool or client (sql, Pool, drizzle db), not a transaction',
      );
  }
  // (a 'run' step carrying `seen` never comes back from these: a run comes back as its attempt)
  const claim = (slice: number) => (c.mode === 'transactional' ? openTransactional<H>(runner, c, slice) : claimPhased<H>(runner, c, slice));
  return (await waitForClaim(c, claim)) as Start<H>;
}

/**
 * The waiting of a claim, for every form of it: each try waits for the first attempt's row lock
 * for a short slice only, then gives its pooled connection back (ROLLBACK) and sleeps without one,
 * so duplicates of a slow request never hold the pool while they wait. Polls with a growing pause,
 * never past `waitMs` (then {@link IdempotencyInFlightError}) nor (much) past the holder's lease.
 * Returns the first answer that is neither a miss nor "in flight".
 */
export async function waitForClaim<S extends { kind: string }>(
  c: Checked,
  claim: (slice: number) => Promise<S | { kind: 'miss' } | { kind: 'inflight'; retryAfterMs: number }>,
): Promise<S> {
  const deadline = performance.now() + c.waitMs;
  let misses = 0;
  let pause = 10;
  for (;;) {
    const step = await claim(Math.min(Math.max(0, Math.round(deadline - performance.now())), CLAIM_WAIT_MS));
    if (step.kind === 'miss') {
      if (++misses > 20)
        throw new PgcoordError(
          'PGCOORD_IDEMPOTENCY_UNSTABLE',
          `idempotency key ${JSON.stringify(c.key)} kept changing under the claim; retry`,
        );
      continue;
    }
    if (step.kind !== 'inflight') return step as S;
    const { retryAfterMs } = step as { retryAfterMs: number };
    const now = performance.now();
    if (now >= deadline) throw new IdempotencyInFlightError(c.scope, c.key, Math.max(1000, retryAfterMs));
    await sleep(Math.max(1, Math.min(pause, deadline - now, retryAfterMs + 5)), c.signal);
    pause = Math.min(pause * 2, 250);
  }
}

// Conn.send with COMMIT in the batch when asked (pgcoord's own transaction only). Conn.send never
// waits past the connection's loss, and reports a loss with COMMIT in the batch as CommitUnknownError.
export function send(conn: Conn, statements: readonly Statement[], signal?: AbortSignal, commit = false): Promise<Row[][]> {
  return conn.send(statements, signal, commit ? { commit } : undefined);
}

// How long one claim may wait for a row lock held by an attempt in flight before its connection is
// given back (transactional mode: the first attempt's uncommitted row; phased: a phase committing).
export const CLAIM_WAIT_MS = 50;

export function lockTimeoutMs(left: number): number {
  return Math.max(1, left); // lock_timeout 0 would mean "wait forever"
}

// Transactional mode: the claim opens a transaction that stays open while the handler runs (its
// statements go through the same transaction) and ends with `complete` + COMMIT, or ROLLBACK.
function openTransactional<H>(runner: Runner, c: Checked, left: number): Promise<Step | Start<H>> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const settle = (s: Step | Start<H>) => {
      settled = true;
      resolve(s);
    };
    const outcome = deferred<{ error: unknown } | { response: StoredResponse; store: boolean }>();
    const committed = deferred<void>();
    const rollback = Symbol('rollback');
    // The claim, the handler's work and `complete` are one attempt: in a caller's transaction a
    // failure (or a result not to be stored) undoes only what this call did (the seam's savepoint,
    // the driver's own where it has one), and the caller's transaction stays usable.
    const work = inTransaction<H, void>(runner, { isolation: c.isolation }, (outer) =>
      outer.attempt(async (scope) => {
        const joined = !scope.conn.own;
        const timeout = timeoutStatements(lockTimeoutMs(left));
        const token = randomUUID();
        let step: Step;
        try {
          const rows = await send(scope.conn, [timeout.before, claimStatement(c, token), timeout.after], c.signal);
          step = readSeen(rows[1]?.[0], c);
        } catch (err) {
          // The first attempt has not committed within the wait: it is in flight.
          if (sqlState(err) === '55P03' && !c.signal?.aborted) throw { [rollback]: { kind: 'inflight', retryAfterMs: 1000 } };
          throw mapError(err, c);
        }
        if (step.kind !== 'run') {
          // This call wrote nothing: answer now; pgcoord's own COMMIT (it only ends the transaction
          // and releases the row lock the conflict branch took) completes in the background.
          settle(step);
          return;
        }
        const seen = step.seen;
        const signal = anySignal([scope.conn.lost, c.signal]);
        await scope.call(async (tx: H) => {
          let decision: 'final' | 'retryable' | undefined;
          const context = makeContext<H>(
            c,
            seen,
            signal,
            () => tx,
            (d) => (decision = d),
            async (_name, fn) => fn(tx),
          );
          settle({
            kind: 'run',
            attempt: {
              context,
              get decision() {
                return decision;
              },
              async finish(response, store) {
                outcome.resolve({ response, store });
                await committed.promise;
              },
              async fail(error) {
                outcome.resolve({ error });
                return committed.promise.then(
                  () => error,
                  (ended) => (ended instanceof ConnectionLostError && !(error instanceof PgcoordError) ? ended : error),
                );
              },
            },
          });
          const o = await outcome.promise;
          if ('error' in o || !o.store) throw { [rollback]: true };
          const { response } = o;
          const params = [c.scope, c.key, token, response.status, JSON.stringify(response.headers), response.body, c.retentionMs];
          // A lost lease cannot happen while the claim is uncommitted (the row is ours alone); checked
          // anyway. Own transaction: `complete` and COMMIT in one round trip (finish() sends no COMMIT).
          const lost = () => new IdempotencyLeaseLostError(c.scope, c.key, 'the row changed under its own transaction');
          if (joined) {
            const [done] = await send(scope.conn, [{ text: c.sql.complete, params }]);
            if (done?.length !== 1) throw lost();
            return;
          }
          try {
            await send(scope.conn, [{ text: c.sql.completeFenced, params }], undefined, true);
          } catch (err) {
            throw isLeaseLost(err) ? lost() : err;
          }
        });
      }),
    );
    work.then(
      () => {
        committed.resolve();
        if (!settled) reject(new Error('pgcoord: idempotent transaction ended without an answer'));
      },
      (err) => {
        const marker = err && typeof err === 'object' ? (err as Record<symbol, unknown>)[rollback] : undefined;
        if (marker !== undefined) {
          committed.resolve();
          if (!settled && typeof marker === 'object') settle(marker as Step);
          return;
        }
        committed.reject(mapError(err, c));
        if (!settled) reject(mapError(err, c));
      },
    );
    committed.promise.catch(() => {}); // observed by finish(); never an unhandled rejection
  });
}

export function makeContext<H>(
  c: Checked,
  seen: Seen,
  signal: AbortSignal,
  tx: () => H,
  decide: (d: 'final' | 'retryable') => void,
  runPhase: <T>(name: string, fn: (tx: H) => Promise<T> | T) => Promise<T>,
): IdempotentContext<H> {
  const used = new Set<string>();
  const keyOf = (name: string) => phaseKey(c.scope, c.key, name, c.secret);
  return {
    get tx() {
      return tx();
    },
    signal,
    attempt: seen.attempts,
    scope: c.scope,
    key: c.key,
    recoveryPoint: seen.recoveryPoint,
    phaseKey: (name) => keyOf(checkPhase(name)),
    decide(d) {
      if (d !== 'final' && d !== 'retryable') throw new InvalidOptionError(`decide() takes 'final' or 'retryable', got ${describe(d)}`);
      decide(d);
    },
    async phase(name, fn) {
      checkPhase(name);
      if (typeof fn !== 'function') throw new InvalidOptionError('phase() needs a callback');
      if (used.has(name))
        throw new InvalidOptionError(`phase ${JSON.stringify(name)} was already run in this attempt; phase names must be unique`);
      used.add(name);
      if (signal.aborted) throw signal.reason;
      return runPhase(name, (h) => fn(h, { key: keyOf(name), signal }));
    },
  };
}

// ---------------------------------------------------------------- the wrapper

/**
 * Run `handler` once per (scope, key) and give every repeat its stored result: for jobs, queue
 * consumers and webhooks. The result is stored as JSON and returned as stored (a JSON round trip)
 * on the first call and on replays alike.
 *
 * - Transactional mode (default): `ctx.tx` is the transaction in which the claim, the handler's
 *   writes and the stored result commit together. A crash or a thrown error rolls all of it back.
 * - Phased mode: `ctx.phase(name, fn)` commits each phase with a recovery point; a retry resumes
 *   after the last committed phase. Pass `ctx.phaseKey(name)` / the phase's `key` downstream.
 *
 * A thrown error leaves the key retryable; throw {@link FinalFailure} to store a failure (repeats
 * then get {@link IdempotentFailureError} without running the handler).
 *
 * @throws {@link IdempotencyMismatchError} (same key, different `request`), {@link IdempotencyInFlightError}
 * (another attempt still running after `waitMs`), {@link IdempotencyScopeRequiredError},
 * {@link IdempotencyScopeInvalidError}, {@link IdempotencyKeyInvalidError}, {@link IdempotencyLeaseLostError},
 * {@link IdempotentFailureError}; InvalidOptionError for a `request` or a result with no JSON form
 * (the attempt is ended first: nothing is stored and the key stays retryable).
 *
 * @example
 * const { value } = await idempotent(sql, { scope: `shop:${shopId}`, key: event.id, request: event.data }, async ({ tx }) => {
 *   await tx`update orders set paid = true where id = ${event.data.orderId}`;
 *   return { ok: true };
 * });
 */
export function idempotent<R extends Runner, T>(
  runner: R,
  options: IdempotencyOptions,
  handler: (ctx: IdempotentContext<HandleOf<R>>) => Promise<T> | T,
): Promise<IdempotentResult<T>>;
/**
 * The plan form (transactional mode), shaped like the lock plans: `read` rides behind the claim,
 * `write` returns `{ value, writes }` and the writes go with the stored value and COMMIT. On
 * postgres.js: two round trips for a first call, a replay answered after one (see plan.ts).
 *
 * @example
 * const { value } = await idempotent(sql, { scope, key, request }, {
 *   read: (tx) => tx`select total, refunded from orders where id = ${id} for update`,
 *   write: async (tx, [o]) => o.refunded + amount > o.total ? { value: { done: false } }
 *     : { value: { done: true }, writes: [tx`update orders set refunded = refunded + ${amount} where id = ${id}`] },
 * });
 */
export function idempotent<R extends Runner, Read, T>(
  runner: R,
  options: IdempotencyOptions,
  plan: IdempotentPlan<HandleOf<R>, Read, T>,
): Promise<IdempotentResult<T>>;
export function idempotent<R extends Runner, T>(
  runner: R,
  options: IdempotencyOptions,
  handler: ((ctx: IdempotentContext<HandleOf<R>>) => Promise<T> | T) | IdempotentPlan<HandleOf<R>, unknown, T>,
): Promise<IdempotentResult<T>> {
  return traced(
    'idempotency',
    () => ({ operation: 'idempotent' }),
    (trace) =>
      once(runner, options, handler).then((r) => {
        if (trace) trace.outcome = r.replayed ? 'replay' : 'first';
        return r;
      }),
  );
}

async function once<R extends Runner, T>(
  runner: R,
  options: IdempotencyOptions,
  handler: ((ctx: IdempotentContext<HandleOf<R>>) => Promise<T> | T) | IdempotentPlan<HandleOf<R>, unknown, T>,
): Promise<IdempotentResult<T>> {
  if (typeof handler !== 'function') {
    if (isIdempotentPlan(handler)) return idempotentPlan(runner, checkOptions(options), handler as IdempotentPlan<HandleOf<R>, unknown, T>);
    throw new InvalidOptionError('idempotent() needs a handler function (or a { read?, write } plan)');
  }
  const c = checkOptions(options);
  const start = await beginIdempotent<HandleOf<R>>(runner, c);
  if (start.kind === 'replay') return outcomeOf<T>(c.key, start.response, true);
  const attempt = start.attempt;
  let response: StoredResponse;
  try {
    const value = await handler(attempt.context);
    response = toStored(value, 200);
  } catch (err) {
    if (err instanceof FinalFailure && attempt.decision !== 'retryable') {
      let stored: StoredResponse;
      try {
        if (!Number.isInteger(err.status) || err.status < 400 || err.status > 599)
          throw new InvalidOptionError(`FinalFailure status must be from 400 to 599, got ${describe(err.status)}`);
        stored = toStored(err.body, err.status);
      } catch (bad) {
        // Nothing can be stored: end the attempt (roll back / release) so that neither the key
        // nor the pooled connection stays held, and report why.
        await attempt.fail(bad);
        throw bad;
      }
      await attempt.finish(stored, true);
      return outcomeOf<T>(c.key, stored, false);
    }
    throw await attempt.fail(err);
  }
  await attempt.finish(response, attempt.decision !== 'retryable');
  return outcomeOf<T>(c.key, response, false);
}
