// The plan form of `idempotent` (transactional mode), shaped like the lock plans (advisory.ts):
// `{ read?, write }`. On postgres.js, a first call is two round trips and a replay is answered
// after one:
//
//   [BEGIN, lock_timeout set, claim, lock_timeout reset, read]   the read rides behind the claim
//   `write(tx, rows)` decides (it may await, e.g. a payment gateway; the key's row stays locked
//   by the uncommitted claim, so a copy of the request waits for this one's outcome)
//   [complete, writes..., COMMIT]                                 the stored value with the writes
//
// The value to store is decided by `write` before its writes are sent, so `complete` can go in
// the same batch as they do: they commit together or not at all (a failed write makes the
// pipelined COMMIT a rollback, and the claim goes with it: the key stays retryable). A replay, a
// mismatch or an attempt in flight is known from the claim's answer: the read that rode with it
// is dropped, and the transaction (which wrote nothing) ends after the caller has its answer.
//
// The claim and complete statements are `idempotent`'s own (run.ts), so the rows, their
// guarantees (scope, fingerprint, retention, takeover of abandoned attempts) and their purge are
// the same. Elsewhere (node-postgres, drizzle builders, a caller's transaction) the same plan runs
// one statement at a time.

import { randomUUID } from 'node:crypto';
import { type PlanWrites, timeoutStatements } from '../advisory.js';
import { commitWith, inTransaction, type Row, type Runner, type Statement } from '../driver/index.js';
import { CommitUnknownError, InvalidOptionError, sqlState } from '../errors.js';
import { describe } from '../text.js';
import { FinalFailure, IdempotencyLeaseLostError, IdempotencyMismatchError } from './errors.js';
import { FINGERPRINT_VERSION } from './fingerprint.js';
import { type Checked, type IdempotentResult, mapError, type StoredResponse, toBuffer, waitForClaim } from './run.js';
import { isLeaseLost } from './statements.js';
import { outcomeOf, toStored } from './stored.js';

/** What a plan's `write` gets besides the transaction and the read. */
export interface IdempotentPlanContext {
  /** 1 for the first attempt on this key, 2 after one failed or abandoned attempt, ... */
  readonly attempt: number;
  readonly scope: string;
  readonly key: string;
  /** Aborted when the transaction's connection dies or the caller aborts. */
  readonly signal: AbortSignal;
}

/**
 * What a plan's `write` returns: the value to store (and return), and the writes, unawaited, in an
 * array (an array is not a thenable, so they stay unsent): they are sent with the stored value and
 * COMMIT. Throw {@link FinalFailure} to store a failure instead; any other error leaves the key
 * retryable.
 */
export interface IdempotentWrites<T> {
  value: T;
  writes?: PlanWrites;
}

/**
 * The plan form of {@link idempotent}: `read` (optional) is sent right behind the claim, `write`
 * decides from its rows and returns the value to store and the writes. Transactional mode only.
 */
export interface IdempotentPlan<H, R, T> {
  read?: (tx: H) => PromiseLike<R> | R;
  write: (tx: H, read: R, ctx: IdempotentPlanContext) => IdempotentWrites<T> | Promise<IdempotentWrites<T>>;
}

export function isIdempotentPlan(x: unknown): x is IdempotentPlan<unknown, unknown, unknown> {
  return (
    typeof x === 'object' &&
    x !== null &&
    typeof (x as IdempotentPlan<unknown, unknown, unknown>).write === 'function' &&
    ((x as IdempotentPlan<unknown, unknown, unknown>).read === undefined ||
      typeof (x as IdempotentPlan<unknown, unknown, unknown>).read === 'function')
  );
}

type Step = { kind: 'done'; response: StoredResponse; replayed: boolean } | { kind: 'inflight'; retryAfterMs: number } | { kind: 'miss' };

// How long one claim waits for a row lock held by an attempt in flight before its connection is
// given back and it sleeps without one (the same slice as idempotent()'s callback form).

/**
 * Run a plan once per (scope, key): claim (waiting for an attempt in flight up to `waitMs`), then
 * the plan, or the stored result. The options are checked (`checkOptions`) by the caller.
 */
export async function idempotentPlan<H, R, T>(runner: Runner, c: Checked, plan: IdempotentPlan<H, R, T>): Promise<IdempotentResult<T>> {
  if (c.mode !== 'transactional')
    throw new InvalidOptionError(
      "the { read, write } plan form is transactional mode only: use a handler with ctx.phase() for mode: 'phased'",
    );
  const step = await waitForClaim(c, (slice) => attempt(runner, c, plan, slice));
  return outcomeOf<T>(c.key, step.response, step.replayed);
}

// Thrown inside the transaction to roll it back when the caller has (or will get) its answer.
class Rollback {
  constructor(readonly step?: Step) {}
}

/** One claim and, when it is ours, the plan; answered as soon as the outcome is known. */
function attempt<H, R, T>(runner: Runner, c: Checked, plan: IdempotentPlan<H, R, T>, slice: number): Promise<Step> {
  return new Promise((resolve, reject) => {
    let answered = false;
    const answer = (step: Step) => {
      answered = true;
      resolve(step);
    };
    const refuse = (err: unknown) => {
      answered = true;
      reject(err);
    };
    let result: Step | undefined;
    const work = inTransaction<H, void>(runner, { isolation: c.isolation }, (outer) =>
      // In a caller's transaction the attempt runs under a savepoint: a lock timeout, a mismatch or
      // a failed plan undoes only this call's claim, and the caller's transaction stays usable.
      outer.attempt(async (scope) => {
        const joined = !scope.conn.own;
        const token = randomUUID();
        const timeout = timeoutStatements(Math.max(1, slice)); // lock_timeout 0 would mean "wait forever"
        const claim: Statement = {
          text: c.sql.claim,
          params: [c.scope, c.key, c.fingerprint, FINGERPRINT_VERSION, token, c.leaseMs, c.retentionMs],
        };
        const statements = [timeout.before, claim, timeout.after];
        let rows: unknown[];
        try {
          const { read } = plan;
          rows = read
            ? await scope.conn.sendThen(statements, () => scope.call(read as (tx: H) => Promise<R>), c.signal)
            : await scope.conn.send(statements, c.signal);
        } catch (err) {
          // the first attempt has not committed within the slice: it is in flight
          if (sqlState(err) === '55P03' && !c.signal?.aborted) throw new Rollback({ kind: 'inflight', retryAfterMs: 1000 });
          throw err;
        }
        let seen: Seen;
        try {
          seen = readClaim((rows[1] as Row[] | undefined)?.[0], c);
        } catch (err) {
          refuse(err); // a mismatch: answered now, this call's (write-free) transaction ends after
          throw new Rollback();
        }
        if (seen.kind !== 'run') {
          // This call wrote nothing: answer now; the COMMIT (which also frees the row lock the
          // claim's conflict branch took) completes after the caller has its answer.
          answer(seen.kind === 'replay' ? { kind: 'done', response: seen.response, replayed: true } : seen);
          return;
        }
        const read = (plan.read ? rows[rows.length - 1] : undefined) as R;
        const signal = c.signal ? AbortSignal.any([scope.conn.lost, c.signal]) : scope.conn.lost;
        const context: IdempotentPlanContext = { attempt: seen.attempts, scope: c.scope, key: c.key, signal };
        let stored: StoredResponse;
        let writes: unknown;
        try {
          const out = await scope.call((tx) => plan.write(tx, read, context));
          if (out === null || typeof out !== 'object' || !('value' in out))
            throw new InvalidOptionError(`a plan's write must return { value, writes? }, got ${describe(out)}`);
          writes = out.writes;
          stored = toStored(out.value, 200);
        } catch (err) {
          if (!(err instanceof FinalFailure)) throw err; // rolled back: the key stays retryable
          if (!Number.isInteger(err.status) || err.status < 400 || err.status > 599)
            throw new InvalidOptionError(`FinalFailure status must be from 400 to 599, got ${describe(err.status)}`);
          stored = toStored(err.body, err.status);
          writes = [];
        }
        const params = [c.scope, c.key, token, stored.status, JSON.stringify(stored.headers), stored.body, c.retentionMs];
        const lost = () => new IdempotencyLeaseLostError(c.scope, c.key, 'the row changed under its own transaction');
        if (scope.conn.pipelines) {
          // [complete, writes..., COMMIT] in one round trip. complete is fenced: were the row not
          // ours (it cannot be while the claim is uncommitted), it would fail and the COMMIT behind
          // it would only roll back.
          const done = scope.conn.send([{ text: c.sql.completeFenced, params }]);
          const committed = commitWith(scope.conn, writes);
          const [d, w] = await Promise.allSettled([done, committed]);
          if (w.status === 'rejected' && w.reason instanceof CommitUnknownError) throw w.reason;
          if (d.status === 'rejected') throw isLeaseLost(d.reason) ? lost() : d.reason;
          if (w.status === 'rejected') throw w.reason;
        } else {
          await commitWith(scope.conn, writes);
          if (joined) {
            const [done] = await scope.conn.send([{ text: c.sql.complete, params }]);
            if (done?.length !== 1) throw lost();
          } else {
            try {
              await scope.conn.send([{ text: c.sql.completeFenced, params }], undefined, { commit: true });
            } catch (err) {
              throw isLeaseLost(err) ? lost() : err;
            }
          }
        }
        result = { kind: 'done', response: stored, replayed: false };
      }),
    );
    work.then(
      () => {
        if (answered) return;
        if (result) answer(result);
        else refuse(new Error('pgcoord: idempotent plan ended without an answer'));
      },
      (err: unknown) => {
        if (answered) return;
        if (err instanceof Rollback && err.step) answer(err.step);
        else refuse(mapError(err, c));
      },
    );
  });
}

type Seen =
  | { kind: 'run'; attempts: number }
  | { kind: 'replay'; response: StoredResponse }
  | { kind: 'inflight'; retryAfterMs: number }
  | { kind: 'miss' };

// The claim's answer (the columns of run.ts's claim statement), read as idempotent() reads it.
function readClaim(row: Row | undefined, c: Checked): Seen {
  if (!row) return { kind: 'miss' };
  if (row.claimed === true) return { kind: 'run', attempts: Number(row.attempts) };
  // Rows of another fingerprint version cannot be compared; the claim treats them the same way.
  if (Number(row.fingerprint_version) === FINGERPRINT_VERSION && !toBuffer(row.fingerprint).equals(c.fingerprint))
    throw new IdempotencyMismatchError(c.scope, c.key);
  if (row.state === 'completed')
    return {
      kind: 'replay',
      response: {
        status: Number(row.response_status),
        headers: row.response_headers ? JSON.parse(String(row.response_headers)) : {},
        body: toBuffer(row.response_body),
      },
    };
  const leaseLeftMs = Number(row.lease_left_ms ?? 0);
  if (row.state === 'running' && leaseLeftMs > 0) return { kind: 'inflight', retryAfterMs: leaseLeftMs };
  return { kind: 'miss' }; // freed between the claim's two branches' snapshots: claim again
}
