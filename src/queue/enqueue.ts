// Putting a job on a key's queue, in the caller's transaction when given one: the outbox pattern,
// the job exists if and only if the business write commits. One statement, one round trip.

import { type Runner, runStatement } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { traced } from '../trace.js';
import { queueError } from './errors.js';
import { enqueueStatement } from './statements.js';

const MAX_MS = 2_147_483_647;
/** The largest payload, as JSON text (UTF-16 code units): a queue is not a blob store. */
export const MAX_PAYLOAD_CHARS = 1_048_576;

/** Options of {@link enqueue}. */
export interface EnqueueOptions {
  /**
   * Not before this point in time (compared with the database clock). Order is kept: the key's
   * jobs enqueued after this one wait behind it.
   */
  runAt?: Date;
  /** Not before this many ms from now, on the database clock (0 to 2147483647); order is kept as with `runAt`. */
  delayMs?: number;
  /**
   * While a job with this dedupe key is queued in the same queue (waiting, running or dead), a
   * further enqueue with it does nothing. It does not outlive the job: use an idempotency key in
   * the handler for effects that must happen once, ever.
   */
  dedupeKey?: string;
}

/** What {@link enqueue} did. */
export interface Enqueued {
  /** False when a job with the same `dedupeKey` was already queued (nothing was added). */
  enqueued: boolean;
  /** The new job's id (unique forever; within a key, the enqueue order). Absent when not enqueued. */
  id?: bigint;
}

/** Check a queue, key or dedupe key name: a string of 1 to 255 characters, no NUL, well-formed. */
export function checkName(value: unknown, what: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.length > 255)
    throw new InvalidOptionError(`${what} must be a string of 1 to 255 characters, got ${describe(value)}`);
  const problem = textProblem(value);
  if (problem) throw new InvalidOptionError(`${what} ${problem}`);
  return value;
}

/**
 * The payload as JSON text, or a typed error: it must be JSON (no undefined at the top, no
 * functions, symbols or BigInts, no NaN or Infinity, which JSON would silently turn into null), its
 * strings and property names without NUL or lone surrogates (jsonb cannot hold them), and at most
 * {@link MAX_PAYLOAD_CHARS} long.
 */
export function payloadJson(payload: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(payload, function (this: unknown, name: string, value: unknown) {
      const problem = textProblem(name);
      if (problem) throw new InvalidOptionError(`a payload property name ${problem}`);
      if (typeof value === 'number' && !Number.isFinite(value))
        throw new InvalidOptionError(`the payload holds ${value}, which JSON cannot represent`);
      if (typeof value === 'string') {
        const bad = textProblem(value);
        if (bad) throw new InvalidOptionError(`a payload string ${bad}`);
      }
      return value;
    });
  } catch (err) {
    if (err instanceof InvalidOptionError) throw err;
    throw new InvalidOptionError(`the payload must be JSON-serializable, got ${describe(payload)}: ${(err as Error).message}`);
  }
  if (text === undefined) throw new InvalidOptionError(`the payload must be JSON-serializable, got ${describe(payload)}`);
  if (text.length > MAX_PAYLOAD_CHARS)
    throw new InvalidOptionError(`the payload is ${text.length} characters of JSON, more than the ${MAX_PAYLOAD_CHARS} allowed`);
  return text;
}

/**
 * Queue a job on `key` of `queue`. Jobs of one key run one at a time, in the order their enqueues
 * committed; jobs of different keys run in parallel. Given a transaction (a postgres.js `sql.begin`
 * handle, a pg client in a transaction, a drizzle `tx`), the job joins it and exists only if it
 * commits; given a pool, it is one autocommit statement.
 *
 * Enqueues to one key wait for each other: each holds the key's order row until its transaction
 * ends. Keep such transactions short.
 *
 * @throws {@link InvalidOptionError} for a bad name, payload or option (before anything is sent).
 * @throws {@link QueueNotMigratedError} when the queue tables do not exist.
 * @example
 * await sql.begin(async (tx) => {
 *   await tx`insert into refund_requests ${tx(request)}`;
 *   await enqueue(tx, 'refunds', `order:${request.orderId}`, { requestId: request.id, amount: request.amount });
 * });
 */
export function enqueue(runner: Runner, queue: string, key: string, payload: unknown, options: EnqueueOptions = {}): Promise<Enqueued> {
  return traced(
    'queue',
    () => ({ operation: 'enqueue', queue: typeof queue === 'string' ? queue : undefined, keys: typeof key === 'string' ? [key] : [] }),
    async (ctx) => {
      const r = await put(runner, queue, key, payload, options);
      if (ctx) ctx.outcome = r.enqueued ? 'enqueued' : 'deduplicated';
      return r;
    },
  );
}

async function put(runner: Runner, queue: string, key: string, payload: unknown, options: EnqueueOptions): Promise<Enqueued> {
  checkName(queue, 'queue');
  checkName(key, 'key');
  const text = payloadJson(payload);
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('enqueue options must be an object');
  const { runAt, delayMs, dedupeKey } = options;
  if (runAt !== undefined && !(runAt instanceof Date && Number.isFinite(runAt.getTime())))
    throw new InvalidOptionError(`runAt must be a valid Date, got ${describe(runAt)}`);
  if (delayMs !== undefined && !(Number.isInteger(delayMs) && delayMs >= 0 && delayMs <= MAX_MS))
    throw new InvalidOptionError(`delayMs must be an integer from 0 to ${MAX_MS}, got ${describe(delayMs)}`);
  if (runAt !== undefined && delayMs !== undefined) throw new InvalidOptionError('give runAt or delayMs, not both');
  if (dedupeKey !== undefined) checkName(dedupeKey, 'dedupeKey');
  let rows: Awaited<ReturnType<typeof runStatement>>;
  try {
    rows = await runStatement(runner, enqueueStatement(queue, key, text, runAt, delayMs ?? 0, dedupeKey));
  } catch (err) {
    throw queueError(err);
  }
  const row = rows[0];
  return row ? { enqueued: true, id: BigInt(String(row.id)) } : { enqueued: false };
}
