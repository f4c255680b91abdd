// Phased mode: each named phase commits on its own with a recovery point, under a lease the
// attempt heartbeats; a retry resumes after the last committed phase.

import { randomUUID } from 'node:crypto';
import { timeoutStatements } from '../advisory.js';
import { inLazyTransaction, inTransaction, type Row, type Runner, type Statement } from '../driver/index.js';
import { InvalidOptionError, sqlState } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { IdempotencyKeyInvalidError, IdempotencyLeaseLostError } from './errors.js';
import {
  anySignal,
  type Checked,
  type IdempotentAttempt,
  lockTimeoutMs,
  makeContext,
  mapError,
  readSeen,
  type Seen,
  type Start,
  type Step,
  send,
} from './run.js';
import { claimStatement, isLeaseLost } from './statements.js';

export function checkPhase(name: unknown): string {
  if (typeof name !== 'string' || name.length === 0 || name.length > 100 || name === 'started')
    throw new InvalidOptionError(`a phase name must be a string of 1 to 100 characters other than 'started', got ${describe(name)}`);
  // The name keys the phase's stored result and its downstream key: it must be one string on the
  // server too (a lone surrogate would be stored as U+FFFD).
  const problem = textProblem(name);
  if (problem !== undefined) throw new IdempotencyKeyInvalidError(`${describe(name)} ${problem}`, 'phase name');
  return name;
}

// Phased mode: the claim is its own (one-statement) transaction, sent with its COMMIT: one round
// trip, whatever the answer (a claim, a replay, a mismatch, an attempt in flight).
export async function claimPhased<H>(runner: Runner, c: Checked, left: number): Promise<Step | Start<H>> {
  const token = randomUUID();
  const timeout = timeoutStatements(lockTimeoutMs(left));
  let rows: Row[][];
  try {
    rows = await inTransaction(runner, {}, (scope) =>
      send(scope.conn, [timeout.before, claimStatement(c, token), timeout.after], c.signal, true),
    );
  } catch (err) {
    if (sqlState(err) === '55P03' && !c.signal?.aborted) return { kind: 'inflight', retryAfterMs: 1000 };
    throw mapError(err, c);
  }
  const step = readSeen(rows[1]?.[0], c); // may throw a mismatch: nothing was written
  return step.kind === 'run' ? { kind: 'run', attempt: phasedAttempt<H>(runner, c, step.seen, token) } : step;
}

function phasedAttempt<H>(runner: Runner, c: Checked, seen: Seen, token: string): IdempotentAttempt<H> {
  const controller = new AbortController();
  const signal = anySignal([controller.signal, c.signal]);
  const recovered = { ...seen.recoveryData };
  // Local bound on the lease, from the moment each renewal was sent (the database computes the
  // real expiry later, from its own clock, so this one is never later than the real one).
  let confirmedUntil = performance.now() + c.leaseMs;
  let ended = false;
  const lose = (reason: string) => {
    if (!controller.signal.aborted) controller.abort(new IdempotencyLeaseLostError(c.scope, c.key, reason));
  };
  // One statement in its own transaction, COMMIT in the same round trip.
  const once = async (statement: Statement): Promise<Row[]> => {
    const [rows] = await inTransaction(runner, {}, (scope) => send(scope.conn, [statement], undefined, true));
    return rows ?? [];
  };
  const beat = async () => {
    if (ended || controller.signal.aborted) return;
    const sentAt = performance.now();
    try {
      const rows = await once({ text: c.sql.heartbeat, params: [c.scope, c.key, token, c.leaseMs] });
      if (rows.length === 0) lose('another attempt took the key over');
      else confirmedUntil = Math.max(confirmedUntil, sentAt + c.leaseMs);
    } catch {
      // One failed heartbeat is not a lost lease; running past the confirmed lease is.
      if (performance.now() >= confirmedUntil) lose('its heartbeat could not be confirmed before the lease ran out');
    }
  };
  const timer = setInterval(() => void beat(), c.heartbeatMs);
  timer.unref();
  const deadline = setInterval(
    () => {
      if (performance.now() >= confirmedUntil) lose('its heartbeat could not be confirmed before the lease ran out');
    },
    Math.max(10, Math.floor(c.heartbeatMs / 2)),
  );
  deadline.unref();
  const stop = () => {
    ended = true;
    clearInterval(timer);
    clearInterval(deadline);
  };
  let decision: 'final' | 'retryable' | undefined;
  const context = makeContext<H>(
    c,
    seen,
    signal,
    () => {
      throw new InvalidOptionError('phased mode has no transaction for the whole handler: use ctx.phase(name, (tx) => ...)');
    },
    (d) => (decision = d),
    async (name, fn) => {
      if (Object.hasOwn(recovered, name)) return recovered[name] as never; // committed by an earlier attempt
      let sentAt = 0;
      // The phase's connection is reserved by its first statement (or by the recovery point below),
      // not when the phase starts: a phase awaiting a gateway holds no pooled connection, so the
      // heartbeats (and the other requests' phases) always find one.
      const value = await inLazyTransaction<H, unknown>(runner, async (scope) => {
        // BEGIN rides with the phase's first statement (or with the recovery point below).
        const v = await scope.call((tx) => fn(tx));
        if (signal.aborted) throw signal.reason;
        const json = JSON.stringify(v === undefined ? null : v) as string | undefined;
        if (json === undefined) throw new InvalidOptionError(`a phase result must be JSON-serializable, got ${describe(v)}`);
        sentAt = performance.now(); // the recovery point renews the lease, no earlier than this
        try {
          await send(scope.conn, [{ text: c.sql.phase, params: [c.scope, c.key, token, name, json, c.leaseMs] }], undefined, true);
        } catch (err) {
          if (!isLeaseLost(err)) throw err;
          lose('another attempt took the key over');
          throw new IdempotencyLeaseLostError(c.scope, c.key, 'another attempt took the key over');
        }
        return JSON.parse(json);
      });
      confirmedUntil = Math.max(confirmedUntil, sentAt + c.leaseMs);
      recovered[name] = value;
      return value as never;
    },
  );
  return {
    context,
    get decision() {
      return decision;
    },
    async finish(response, store) {
      stop();
      if (!store) {
        await this.fail(undefined);
        return;
      }
      if (controller.signal.aborted) throw controller.signal.reason;
      const rows = await once({
        text: c.sql.complete,
        params: [c.scope, c.key, token, response.status, JSON.stringify(response.headers), response.body, c.retentionMs],
      });
      if (rows.length !== 1)
        throw new IdempotencyLeaseLostError(c.scope, c.key, 'another attempt took the key over before the result was stored');
    },
    async fail(error) {
      stop();
      // Free the key for an immediate retry. If this fails too, the lease expiry frees it later.
      await once({ text: c.sql.release, params: [c.scope, c.key, token] }).catch(() => {});
      return error;
    },
  };
}
