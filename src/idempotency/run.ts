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
import { AbortedError, InvalidOptionError, PgcoordError, sqlState } from '../errors.js';
import type { HandleOf } from '../handles.js';
import { type Conn, type Isolation, inTransaction, type Row, type Runner, runnerKind, type Statement } from '../runner.js';
import {
  FinalFailure,
  IdempotencyInFlightError,
  IdempotencyKeyInvalidError,
  IdempotencyLeaseLostError,
  IdempotencyMismatchError,
  IdempotencyNotMigratedError,
  IdempotencyScopeRequiredError,
  IdempotentFailureError,
} from './errors.js';
import { FINGERPRINT_VERSION, fingerprintOf, phaseKey } from './fingerprint.js';
import { checkIdentifier, DEFAULT_SCHEMA, DEFAULT_TABLE, type IdempotencyTableNames } from './schema.js';

/** `transactional`: one transaction for claim, work and result. `phased`: committed phases with recovery points. */
export type IdempotencyMode = 'transactional' | 'phased';

/** Options of {@link idempotent} (and of the HTTP middleware, which fills scope, key and fingerprint). */
export interface IdempotencyOptions {
  /** Tenant / user / API client the key belongs to. Required unless `unscoped: true`. */
  scope?: string;
  /** Explicit opt-out of scoping: every caller shares one key space. */
  unscoped?: boolean;
  /** The idempotency key: 1 to 255 characters. */
  key: string;
  /** What the key must keep meaning: any JSON value, fingerprinted with SHA-256 over RFC 8785 JSON. */
  request?: unknown;
  /** A ready fingerprint (bytes), instead of `request`. */
  fingerprint?: Uint8Array;
  /** Default `'transactional'`. */
  mode?: IdempotencyMode;
  /** Phased mode: how long an attempt holds the key without a heartbeat. Default 10 000 ms. */
  leaseMs?: number;
  /** Phased mode: heartbeat period. Default a third of `leaseMs`. */
  heartbeatMs?: number;
  /** How long a result is kept for replay (and the key blocked for other requests). Default 24 h. */
  retentionMs?: number;
  /**
   * A repeat arriving while the first attempt runs waits up to this long for its result, then gets
   * {@link IdempotencyInFlightError} (HTTP 409 with Retry-After). `0`: answer 409 at once. Default 10 000 ms.
   */
  waitMs?: number;
  /** Transactional mode, pgcoord's own transaction: its isolation level. */
  isolation?: Isolation;
  /** Abort to give up waiting / cancel the running statement. */
  signal?: AbortSignal;
  /** Where the table is. Default `pgcoord.idempotency_keys`. */
  table?: IdempotencyTableNames;
  /** Secret for the per-phase downstream keys (HMAC-SHA-256). Default: a fixed public salt. */
  phaseSecret?: string | Buffer;
}

/** A stored outcome: HTTP-shaped so the middleware can replay it byte for byte. */
export interface StoredResponse {
  status: number;
  /** Allow-listed headers only, lower-case names. */
  headers: Record<string, string>;
  /** Exact body bytes. */
  body: Buffer;
}

/** What a phase callback gets besides the transaction. */
export interface PhaseContext {
  /** Stable key for this (scope, key, phase), the same in every attempt: pass it downstream. */
  key: string;
  /** Aborted when the lease is lost or the caller aborts. */
  signal: AbortSignal;
}

/** What the handler gets. */
export interface IdempotentContext<H> {
  /** Transactional mode: the transaction everything commits in. Phased mode: throws (each phase has its own). */
  readonly tx: H;
  /** Aborted when the lease is lost (phased), the connection dies, or the caller aborts. */
  readonly signal: AbortSignal;
  /** 1 for the first attempt on this key, 2 after one failed or abandoned attempt, ... */
  readonly attempt: number;
  readonly scope: string;
  readonly key: string;
  /** The last committed phase (`started` before any). */
  readonly recoveryPoint: string;
  /**
   * Run a named phase. Phased mode: runs `fn` in its own transaction that also records the phase
   * as the recovery point (fenced by the lease), and returns its (JSON) result; on a retry, a phase
   * already committed is not run again: its stored result is returned. Transactional mode: runs
   * `fn` in the one transaction.
   */
  phase<T>(name: string, fn: (tx: H, phase: PhaseContext) => Promise<T> | T): Promise<T>;
  /** The stable downstream key of a phase (see {@link PhaseContext.key}). */
  phaseKey(name: string): string;
  /** Override what happens to the outcome: `final` stores it, `retryable` does not (the key can be retried). */
  decide(outcome: 'final' | 'retryable'): void;
}

/** What {@link idempotent} resolves to. */
export interface IdempotentResult<T> {
  /** The handler's result as stored (JSON round trip), the same on the first call and on replays. */
  value: T;
  /** True when the handler did not run: this is the stored result of an earlier attempt. */
  replayed: boolean;
}

// ---------------------------------------------------------------- options

const MAX = 2_147_483_647;

function int(name: string, value: unknown, fallback: number, min: number, max = MAX): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new InvalidOptionError(`${name} must be an integer from ${min} to ${max}, got ${String(value)}`);
  }
  return value;
}

/** Validate a key for the wrapper: a string of 1 to 255 characters, no control characters. */
export function checkKey(key: unknown): string {
  if (typeof key !== 'string') throw new IdempotencyKeyInvalidError(`expected a string, got ${key === null ? 'null' : typeof key}`);
  if (key.length === 0) throw new IdempotencyKeyInvalidError('it is empty');
  if (key.length > 255) throw new IdempotencyKeyInvalidError(`it has ${key.length} characters, at most 255 are allowed`);
  // biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what is refused here
  if (/[\u0000-\u001f\u007f]/.test(key)) throw new IdempotencyKeyInvalidError('it contains control characters');
  return key;
}

/** Checked options. */
export interface Checked {
  scope: string;
  key: string;
  fingerprint: Buffer;
  mode: IdempotencyMode;
  leaseMs: number;
  heartbeatMs: number;
  retentionMs: number;
  waitMs: number;
  isolation: Isolation | undefined;
  signal: AbortSignal | undefined;
  sql: Sql;
  secret: string | Buffer | undefined;
}

export function checkOptions(o: IdempotencyOptions): Checked {
  if (o === null || typeof o !== 'object') throw new InvalidOptionError('idempotency options must be an object');
  const key = checkKey(o.key);
  let scope: string;
  if (o.scope === undefined || o.scope === null || o.scope === '') {
    if (o.unscoped !== true) throw new IdempotencyScopeRequiredError();
    scope = '';
  } else if (typeof o.scope !== 'string' || o.scope.length > 255) {
    throw new InvalidOptionError(`scope must be a string of at most 255 characters, got ${typeof o.scope}`);
  } else scope = o.scope;
  const mode = o.mode ?? 'transactional';
  if (mode !== 'transactional' && mode !== 'phased')
    throw new InvalidOptionError(`mode must be 'transactional' or 'phased', got ${JSON.stringify(mode)}`);
  const leaseMs = int('leaseMs', o.leaseMs, mode === 'phased' ? 10_000 : 60_000, 100, 86_400_000);
  const heartbeatMs = int('heartbeatMs', o.heartbeatMs, Math.max(30, Math.floor(leaseMs / 3)), 10, leaseMs - 1);
  const retentionMs = int('retentionMs', o.retentionMs, 86_400_000, 1, 366 * 86_400_000);
  const waitMs = int('waitMs', o.waitMs, 10_000, 0);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw new InvalidOptionError('signal must be an AbortSignal');
  let fingerprint: Buffer;
  if (o.fingerprint !== undefined) {
    if (!(o.fingerprint instanceof Uint8Array) || o.fingerprint.length === 0 || o.fingerprint.length > 64)
      throw new InvalidOptionError('fingerprint must be 1 to 64 bytes (a Buffer or Uint8Array)');
    fingerprint = Buffer.from(o.fingerprint);
  } else fingerprint = fingerprintOf(o.request === undefined ? null : o.request);
  if (o.phaseSecret !== undefined && typeof o.phaseSecret !== 'string' && !Buffer.isBuffer(o.phaseSecret))
    throw new InvalidOptionError('phaseSecret must be a string or a Buffer');
  let sql: Sql;
  try {
    sql = statementsFor(o.table ?? {});
  } catch (err) {
    throw err instanceof TypeError ? new InvalidOptionError(err.message) : err;
  }
  return {
    scope,
    key,
    fingerprint,
    mode,
    leaseMs,
    heartbeatMs,
    retentionMs,
    waitMs,
    isolation: o.isolation,
    signal: o.signal,
    sql,
    secret: o.phaseSecret,
  };
}

// ---------------------------------------------------------------- SQL

interface Sql {
  label: string;
  claim: string;
  /** Fenced (see {@link fenced}): sent with COMMIT. */
  phase: string;
  heartbeat: string;
  complete: string;
  /** `complete`, fenced: sent with COMMIT in pgcoord's own transaction. */
  completeFenced: string;
  release: string;
}

// The text a fenced write fails with when it matched no row (the lease is not ours any more).
const LEASE_LOST = 'pgcoord: idempotency lease lost';

// A write that must abort its transaction when it matches no row, because COMMIT is already on
// its way in the same round trip. Plain SQL has no RAISE: the cast of a non-constant CASE fails at
// run time (22P02, with LEASE_LOST in the message) exactly when the update returned no row.
function fenced(update: string): string {
  return `with done as (${update})
select (case when count(*) = 1 then '1' else '${LEASE_LOST}' end)::int as ok from done`;
}

function isLeaseLost(err: unknown): boolean {
  return sqlState(err) === '22P02' && err instanceof Error && err.message.includes(LEASE_LOST);
}

const cache = new Map<string, Sql>();

// Columns every claim answer carries. Byte and JSON columns come back as bytes and text from
// every driver; times only as milliseconds computed by the database (its clock, never ours).
const ANSWER = `state, fingerprint, fingerprint_version, attempts, recovery_point, recovery_data::text as recovery_data,
  response_status, response_headers::text as response_headers, response_body`;

function statementsFor(names: IdempotencyTableNames): Sql {
  const schema = checkIdentifier(names.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkIdentifier(names.table ?? DEFAULT_TABLE, 'table');
  const t = `"${schema}"."${table}"`;
  const cached = cache.get(t);
  if (cached) return cached;
  const base = {
    label: `${schema}.${table}`,
    // $1 scope, $2 key, $3 fingerprint, $4 fingerprint version, $5 lease token, $6 lease ms, $7 retention ms.
    //
    // Why it is safe: the primary key makes (scope, key) a single row, and INSERT ... ON CONFLICT
    // is atomic against concurrent inserts of the same key: a second claimer blocks on the first
    // one's uncommitted row (bounded by lock_timeout) and then takes the conflict branch, which
    // locks the row and re-checks the WHERE against its latest committed version. So of any number
    // of concurrent claimers exactly one gets a row back with claimed = true; the rest see the row
    // as it is. A takeover is allowed only for a row past its retention (the key is free again),
    // or for the same request whose last attempt failed retryably or whose lease expired (its
    // holder is presumed dead; fencing by lease_token makes a late write of it a no-op).
    // statement_timestamp() is used wherever one instant must be seen twice in the statement.
    //
    // When nothing is claimed, the second branch returns the existing row in the same round trip.
    // It reads with the statement's snapshot, which may predate a row the INSERT waited for: then
    // no row comes back at all and the caller simply claims again (a new statement, a new snapshot).
    claim: `with claimed as (
  insert into ${t} as t (scope, key, fingerprint, fingerprint_version, state, lease_token, lease_expires_at, expires_at)
  values ($1, $2, $3::bytea, $4::int2, 'running', $5::uuid,
          clock_timestamp() + $6::int8 * interval '1 millisecond',
          clock_timestamp() + greatest($7::int8, $6::int8) * interval '1 millisecond')
  on conflict (scope, key) do update set
    state = 'running',
    lease_token = excluded.lease_token,
    lease_expires_at = excluded.lease_expires_at,
    fingerprint = excluded.fingerprint,
    fingerprint_version = excluded.fingerprint_version,
    recovery_point = case when t.expires_at <= statement_timestamp() then 'started' else t.recovery_point end,
    recovery_data = case when t.expires_at <= statement_timestamp() then '{}'::jsonb else t.recovery_data end,
    attempts = case when t.expires_at <= statement_timestamp() then 1 else t.attempts + 1 end,
    created_at = case when t.expires_at <= statement_timestamp() then clock_timestamp() else t.created_at end,
    response_status = null, response_headers = null, response_body = null,
    updated_at = clock_timestamp(),
    expires_at = excluded.expires_at
  where t.expires_at <= statement_timestamp()
     or ((t.fingerprint_version <> excluded.fingerprint_version or t.fingerprint = excluded.fingerprint)
         and (t.state = 'failed_retryable' or (t.state = 'running' and t.lease_expires_at <= clock_timestamp())))
  returning true as claimed, ${ANSWER}, 0::float8 as lease_left_ms
)
select * from claimed
union all
select false, ${ANSWER},
  coalesce(extract(epoch from (lease_expires_at - clock_timestamp())) * 1000, 0)::float8
from ${t} where scope = $1 and key = $2 and not exists (select 1 from claimed)`,
    // $1 scope, $2 key, $3 lease token, $4 phase, $5 phase result (JSON text), $6 lease ms.
    // Sent last in the phase's own transaction, after the phase's statements and with COMMIT: it
    // commits the phase's writes and its recovery point together, and only if this attempt still
    // holds the lease (no row: the statement fails and the COMMIT behind it only rolls back). It
    // also renews the lease.
    phase: fenced(`update ${t} set recovery_point = $4, recovery_data = recovery_data || jsonb_build_object($4::text, $5::text::jsonb),
  lease_expires_at = clock_timestamp() + $6::int8 * interval '1 millisecond',
  expires_at = greatest(expires_at, clock_timestamp() + $6::int8 * interval '1 millisecond'),
  updated_at = clock_timestamp()
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning 1 as ok`),
    // $1 scope, $2 key, $3 lease token, $4 lease ms. Fenced like every write after the claim: a
    // heartbeat of an attempt that lost its lease matches no row (the token changed), and tells it so.
    heartbeat: `update ${t} set lease_expires_at = clock_timestamp() + $4::int8 * interval '1 millisecond',
  expires_at = greatest(expires_at, clock_timestamp() + $4::int8 * interval '1 millisecond')
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning 1 as ok`,
    // $1 scope, $2 key, $3 lease token, $4 status, $5 headers (JSON text), $6 body, $7 retention ms.
    // Completed rows are immutable: no statement here matches state = 'completed' (only a claim of
    // a row past its retention replaces one), and the lease token is cleared so nothing fenced by
    // it can match again.
    complete: `update ${t} set state = 'completed', response_status = $4::int2, response_headers = $5::text::jsonb, response_body = $6::bytea,
  lease_token = null, lease_expires_at = null, updated_at = clock_timestamp(),
  expires_at = clock_timestamp() + $7::int8 * interval '1 millisecond'
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning attempts`,
    // $1 scope, $2 key, $3 lease token. The attempt failed retryably: free the key at once for a
    // retry of the same request, keeping the recovery point.
    release: `update ${t} set state = 'failed_retryable', lease_token = null, lease_expires_at = null, updated_at = clock_timestamp()
where scope = $1 and key = $2 and lease_token = $3::uuid and state = 'running' returning 1 as ok`,
  };
  const sql: Sql = { ...base, completeFenced: fenced(base.complete) };
  cache.set(t, sql);
  return sql;
}

function claimStatement(c: Checked, token: string): Statement {
  return {
    text: c.sql.claim,
    params: [c.scope, c.key, c.fingerprint, FINGERPRINT_VERSION, token, c.leaseMs, c.retentionMs],
  };
}

function mapError(err: unknown, c: Checked): unknown {
  if (sqlState(err) === '42P01') return new IdempotencyNotMigratedError(c.sql.label, { cause: err });
  if (c.signal?.aborted && !(err instanceof PgcoordError)) return new AbortedError('idempotent call aborted', { cause: err });
  return err;
}

// ---------------------------------------------------------------- claim answers

/** The row as a claim saw it. */
interface Seen {
  claimed: boolean;
  state: string;
  attempts: number;
  recoveryPoint: string;
  recoveryData: Record<string, unknown>;
  leaseLeftMs: number;
  response?: StoredResponse;
}

type Step =
  | { kind: 'run'; seen: Seen }
  | { kind: 'replay'; response: StoredResponse }
  | { kind: 'inflight'; retryAfterMs: number }
  | { kind: 'miss' };

function toBuffer(x: unknown): Buffer {
  if (Buffer.isBuffer(x)) return x;
  if (x instanceof Uint8Array) return Buffer.from(x);
  if (typeof x === 'string' && x.startsWith('\\x')) return Buffer.from(x.slice(2), 'hex');
  return Buffer.alloc(0);
}

function readSeen(row: Row | undefined, c: Checked): Step {
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
  /** End the attempt after an error: nothing is stored and the key stays retryable. Never rejects. */
  fail(error: unknown): Promise<void>;
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

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
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

function anySignal(signals: (AbortSignal | undefined)[]): AbortSignal {
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
    const kind = runnerKind(runner);
    if (kind === 'pgjs-tx' || kind === 'pg-in-tx')
      throw new InvalidOptionError(
        'phased mode commits each phase itself: pass a pool or client (sql, Pool, drizzle db), not a transaction',
      );
  }
  const deadline = performance.now() + c.waitMs;
  let misses = 0;
  let pause = 10;
  for (;;) {
    const left = Math.max(0, Math.round(deadline - performance.now()));
    const step = c.mode === 'transactional' ? await openTransactional<H>(runner, c, left) : await claimPhased<H>(runner, c, left);
    if (step.kind === 'run' || step.kind === 'replay') return step as Start<H>;
    if (step.kind === 'miss') {
      if (++misses > 20)
        throw new PgcoordError(
          'PGCOORD_IDEMPOTENCY_UNSTABLE',
          `idempotency key ${JSON.stringify(c.key)} kept changing under the claim; retry`,
        );
      continue;
    }
    const now = performance.now();
    if (now >= deadline) throw new IdempotencyInFlightError(c.scope, c.key, Math.max(1000, step.retryAfterMs));
    // Poll with a growing pause, never past the deadline nor (much) past the holder's lease.
    await sleep(Math.max(1, Math.min(pause, deadline - now, step.retryAfterMs + 5)), c.signal);
    pause = Math.min(pause * 2, 250);
  }
}

// Conn.send with COMMIT in the batch when asked (pgcoord's own transaction only). Conn.send never
// waits past the connection's loss, and reports a loss with COMMIT in the batch as CommitUnknownError.
function send(conn: Conn, statements: readonly Statement[], signal?: AbortSignal, commit = false): Promise<Row[][]> {
  return conn.send(statements, signal, commit ? { commit } : undefined);
}

function lockTimeoutMs(left: number): number {
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
    const sp = 'pgcoord_idempotency';
    const work = inTransaction<H, void>(runner, { isolation: c.isolation }, async (scope) => {
      const joined = !scope.conn.own;
      const undo = async () => {
        // A caller's transaction stays usable: undo only what this call did.
        if (joined && !scope.conn.lost.aborted)
          await send(scope.conn, [{ text: `rollback to savepoint ${sp}` }, { text: `release savepoint ${sp}` }]);
      };
      const timeout = timeoutStatements(lockTimeoutMs(left));
      const token = randomUUID();
      let step: Step;
      try {
        const rows = await send(
          scope.conn,
          [...(joined ? [{ text: `savepoint ${sp}` }] : []), timeout.before, claimStatement(c, token), timeout.after],
          c.signal,
        );
        step = readSeen(rows[joined ? 2 : 1]?.[0], c);
      } catch (err) {
        await undo();
        // The first attempt has not committed within the wait: it is in flight.
        if (sqlState(err) === '55P03' && !c.signal?.aborted) {
          if (joined) return settle({ kind: 'inflight', retryAfterMs: 1000 });
          throw { [rollback]: { kind: 'inflight', retryAfterMs: 1000 } };
        }
        throw mapError(err, c);
      }
      if (step.kind !== 'run') {
        if (joined) {
          await send(scope.conn, [{ text: `release savepoint ${sp}` }]);
          return settle(step);
        }
        // This transaction wrote nothing: answer now; its COMMIT (it only ends the transaction and
        // releases the row lock the conflict branch took) completes in the background.
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
              await committed.promise.catch(() => {});
            },
          },
        });
        const o = await outcome.promise;
        if ('error' in o || !o.store) {
          await undo();
          if (joined) return;
          throw { [rollback]: true };
        }
        const { response } = o;
        const params = [c.scope, c.key, token, response.status, JSON.stringify(response.headers), response.body, c.retentionMs];
        // A lost lease cannot happen while the claim is uncommitted (the row is ours alone); checked
        // anyway. Own transaction: `complete` and COMMIT in one round trip (finish() sends no COMMIT).
        const lost = () => new IdempotencyLeaseLostError(c.scope, c.key, 'the row changed under its own transaction');
        if (joined) {
          const [done] = await send(scope.conn, [{ text: c.sql.complete, params }, { text: `release savepoint ${sp}` }]);
          if (done?.length !== 1) throw lost();
          return;
        }
        try {
          await send(scope.conn, [{ text: c.sql.completeFenced, params }], undefined, true);
        } catch (err) {
          throw isLeaseLost(err) ? lost() : err;
        }
      });
    });
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

function makeContext<H>(
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
      if (d !== 'final' && d !== 'retryable')
        throw new InvalidOptionError(`decide() takes 'final' or 'retryable', got ${JSON.stringify(d)}`);
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

function checkPhase(name: unknown): string {
  if (typeof name !== 'string' || name.length === 0 || name.length > 100 || name === 'started')
    throw new InvalidOptionError(`a phase name must be a string of 1 to 100 characters other than 'started', got ${JSON.stringify(name)}`);
  return name;
}

// Phased mode: the claim is its own (one-statement) transaction, sent with its COMMIT: one round
// trip, whatever the answer (a claim, a replay, a mismatch, an attempt in flight).
async function claimPhased<H>(runner: Runner, c: Checked, left: number): Promise<Step | Start<H>> {
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
      const sentAt = performance.now();
      const value = await inTransaction<H, unknown>(runner, {}, async (scope) => {
        // BEGIN rides with the phase's first statement (or with the recovery point below).
        const v = await scope.call((tx) => fn(tx));
        if (signal.aborted) throw signal.reason;
        const json = JSON.stringify(v === undefined ? null : v);
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
      if (!store) return this.fail(undefined);
      if (controller.signal.aborted) throw controller.signal.reason;
      const rows = await once({
        text: c.sql.complete,
        params: [c.scope, c.key, token, response.status, JSON.stringify(response.headers), response.body, c.retentionMs],
      });
      if (rows.length !== 1)
        throw new IdempotencyLeaseLostError(c.scope, c.key, 'another attempt took the key over before the result was stored');
    },
    async fail() {
      stop();
      // Free the key for an immediate retry. If this fails too, the lease expiry frees it later.
      await once({ text: c.sql.release, params: [c.scope, c.key, token] }).catch(() => {});
    },
  };
}

// ---------------------------------------------------------------- the wrapper

const JSON_HEADERS = { 'content-type': 'application/json' };

function decodeJson(body: Buffer): unknown {
  return body.length === 0 ? null : JSON.parse(body.toString('utf8'));
}

function toStored(value: unknown, status: number): StoredResponse {
  let text: string;
  try {
    text = JSON.stringify(value === undefined ? null : value);
  } catch (err) {
    throw new InvalidOptionError(`the idempotent result must be JSON-serializable: ${(err as Error).message}`);
  }
  return { status, headers: JSON_HEADERS, body: Buffer.from(text, 'utf8') };
}

function outcomeOf<T>(key: string, response: StoredResponse, replayed: boolean): IdempotentResult<T> {
  const body = decodeJson(response.body);
  if (response.status >= 400) throw new IdempotentFailureError(key, response.status, body, replayed);
  return { value: body as T, replayed };
}

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
 * {@link IdempotencyKeyInvalidError}, {@link IdempotencyLeaseLostError}, {@link IdempotentFailureError}.
 *
 * @example
 * const { value } = await idempotent(sql, { scope: `shop:${shopId}`, key: event.id, request: event.data }, async ({ tx }) => {
 *   await tx`update orders set paid = true where id = ${event.data.orderId}`;
 *   return { ok: true };
 * });
 */
export async function idempotent<R extends Runner, T>(
  runner: R,
  options: IdempotencyOptions,
  handler: (ctx: IdempotentContext<HandleOf<R>>) => Promise<T> | T,
): Promise<IdempotentResult<T>> {
  if (typeof handler !== 'function') throw new InvalidOptionError('idempotent() needs a handler function');
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
      if (!Number.isInteger(err.status) || err.status < 400 || err.status > 599) {
        await attempt.fail(err);
        throw new InvalidOptionError(`FinalFailure status must be from 400 to 599, got ${err.status}`);
      }
      const stored = toStored(err.body, err.status);
      await attempt.finish(stored, true);
      return outcomeOf<T>(c.key, stored, false);
    }
    await attempt.fail(err);
    throw err;
  }
  await attempt.finish(response, attempt.decision !== 'retryable');
  return outcomeOf<T>(c.key, response, false);
}
