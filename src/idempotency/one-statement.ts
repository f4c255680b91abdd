// An idempotency key on a one-statement update (`guardedUpdate`, `updateVersioned`): the claim of
// the key, the guarded write, the optional insert and the stored outcome in ONE statement, so a
// first call costs one round trip (in autocommit on a pool: no BEGIN, no COMMIT, no reserved
// connection) and so does a replay. The row it leaves is an ordinary completed row of the
// idempotency table: `idempotent()` with the same key replays it, `purgeExpired` purges it.
//
// The statement (the update's own parts come from guarded-update.ts and optimistic.ts), in the
// order its data dependencies make it run:
//
//   pgcoord_r  the target row as the statement's snapshot sees it: found? guard true?
//   pgcoord_k  the claim: INSERT of the key row, already `completed`, with the outcome pgcoord_r
//              predicts (applied / guard-failed / not-found) as its stored response,
//              ON CONFLICT (scope, key) DO NOTHING. It returns that outcome (1 = write).
//   pgcoord_u  the write, joined to the claim's row (so it runs only when this statement claimed
//              the key and predicted `applied`), with the guard in its WHERE.
//   pgcoord_i  the optional insert, drawn from pgcoord_u's RETURNING.
//   check      claimed + predicted applied, but the write did not apply: the target row changed
//              after the snapshot (the guard is re-evaluated on its newest version, under its row
//              lock, as any UPDATE does in READ COMMITTED): the statement fails on purpose (a
//              cast error) and rolls back as a whole, so the stored outcome never differs from
//              what happened; the caller runs it again, on a new snapshot.
//   pgcoord_s  only when nothing was claimed: the key's row as the snapshot sees it (a replay,
//              another request: 422, an attempt of `idempotent()` in flight, or a row a claim
//              may take over: past its retention, or the same request whose attempt failed
//              retryably or whose lease expired; then the statement runs again in its takeover
//              variant, ON CONFLICT DO UPDATE ... WHERE <the same rule as idempotent's claim>).
//
// The outcome is stored by the claim itself (a row inserted by one CTE cannot be updated by
// another of the same statement), so it is decided before the write: guard-failed and not-found
// are judged on the statement's snapshot, as a plain `UPDATE ... WHERE guard` judges the rows it
// skips; applied is confirmed on the newest version (the check above). The key row is inserted
// before the write takes the target's row lock, so on a hot row the lock is held no longer than
// by the hand-written `UPDATE`; a replay reads two rows, locks nothing and writes nothing.
//
// Why two copies of one key never both apply (READ COMMITTED; autocommit or a caller's
// transaction): the write joins the row the claim returned, and the primary key on (scope, key)
// lets at most one statement per key insert (or take over) that row until it commits:
// - A copy whose snapshot already shows the first one's committed row: its INSERT conflicts and
//   does nothing (no lock, no write), pgcoord_s shows the row, it answers from the stored outcome.
// - Copies running at the same time: their INSERTs meet on the unique index; the later one waits
//   for the first one's transaction. If that commits, the later one's INSERT does nothing and
//   returns no row, so its write joins nothing; its snapshot cannot show the row it waited for,
//   so it reports nothing and the caller runs the statement again: the new snapshot shows the
//   row and answers the replay. (If the first one rolls back, the later one inserts: one claim.)
// - Two takeovers of one free row serialize on that row's lock: the later one re-checks the DO
//   UPDATE's WHERE on the newest version, by then the first one's completed row, and gets none.
// - Under REPEATABLE READ / SERIALIZABLE, a conflict with a row the snapshot cannot see fails with
//   40001 instead (retryable), as Postgres does for every such write.
// A statement that fails rolls back as a whole (in a caller's transaction, to the savepoint
// runStatement sets): no claim without its write, no write without its claim.

import { performance } from 'node:perf_hooks';
import { type Row, type Runner, runStatement, type TransactionOptions } from '../driver/index.js';
import { InvalidOptionError, PgcoordError, sqlState } from '../errors.js';
import type { Params } from '../sql-target.js';
import { IdempotencyInFlightError, IdempotencyMismatchError, IdempotencyNotMigratedError, IdempotentFailureError } from './errors.js';
import { FINGERPRINT_VERSION } from './fingerprint.js';
import { checkOptions, type IdempotencyOptions, sleep, toBuffer } from './run.js';

/**
 * The idempotency key of a one-statement update (`guardedUpdate`, `updateVersioned`): `scope`,
 * `key` and `request` are checked and fingerprinted as {@link idempotent} does, and the outcome is
 * stored in the same idempotency table (`table`), kept `retentionMs` (default 24 h).
 */
export type UpdateIdempotency = Pick<
  IdempotencyOptions,
  'scope' | 'unscoped' | 'key' | 'request' | 'fingerprint' | 'retentionMs' | 'waitMs' | 'table'
>;

/**
 * What an idempotent one-statement update did. `replayed: true`: this call wrote nothing; the
 * status is the one stored by the first call with this key (which alone returns the new row).
 */
export type IdempotentUpdateResult<R = Row> =
  | { status: 'applied'; replayed: false; row: R }
  | { status: 'applied'; replayed: true; row?: undefined }
  | { status: 'guard-failed' | 'not-found'; replayed: boolean; row?: undefined };

/** A checked {@link UpdateIdempotency}. */
export interface KeyedCheck {
  scope: string;
  key: string;
  fingerprint: Buffer;
  retentionMs: number;
  waitMs: number;
  /** The idempotency table, quoted: `"pgcoord"."idempotency_keys"`. */
  keys: string;
  /** The idempotency table for messages: `pgcoord.idempotency_keys`. */
  label: string;
}

const quotedTables = new Map<string, string>();

/**
 * Check an update's idempotency option (typed errors, before any statement is sent): the same
 * checks as {@link idempotent}'s (scope, key, request fingerprint, retention, table names).
 */
export function checkUpdateIdempotency(o: unknown): KeyedCheck {
  if (o === null || typeof o !== 'object' || Array.isArray(o))
    throw new InvalidOptionError('idempotency must be an object: { scope, key, request? }');
  const { scope, unscoped, key, request, fingerprint, retentionMs, waitMs, table } = o as UpdateIdempotency;
  const c = checkOptions({ scope, unscoped, key, request, fingerprint, retentionMs, waitMs, table });
  const label = c.sql.label; // schema.table, both checked identifiers ([a-z0-9_]): one dot
  let keys = quotedTables.get(label);
  if (keys === undefined) {
    keys = `"${label.replace('.', '"."')}"`;
    quotedTables.set(label, keys);
  }
  return { scope: c.scope, key: c.key, fingerprint: c.fingerprint, retentionMs: c.retentionMs, waitMs: c.waitMs, keys, label };
}

/** A marker for the shape caches: the keyed form of a statement. */
export const KEYED = Symbol('pgcoord.keyed');

/** The values the keyed statement adds, in the order {@link keyedParams} numbers them. */
export function keyedValues(k: KeyedCheck, values: unknown[]): void {
  values.push(k.scope, k.key, k.fingerprint, FINGERPRINT_VERSION, k.retentionMs);
}

/** The keyed statement's placeholders, numbered after the update's own. */
export interface KeyedPlaceholders {
  scope: string;
  key: string;
  fingerprint: string;
  version: string;
  retention: string;
}

export function keyedParams(k: KeyedCheck, params: Params): KeyedPlaceholders {
  return {
    scope: params.add(k.scope),
    key: params.add(k.key),
    fingerprint: params.add(k.fingerprint),
    version: params.add(FINGERPRINT_VERSION),
    retention: params.add(k.retentionMs),
  };
}

/** The update's parts, compiled and checked by its own module. */
export interface KeyedParts {
  /** Quoted target table. */
  table: string;
  /** The target's condition (key columns, where fragment). */
  where: string;
  /** The write applies exactly when it is true (on the row's newest version). */
  guard: string;
  /** The SET list. */
  set: string;
  /** `insert ... select ... from pgcoord_u`, or undefined. */
  insert: string | undefined;
  /**
   * `updateVersioned`: an expression read from the row (its version), reported when the guard
   * fails. Its refusals are not stored: a version conflict claims nothing, so a retry with the
   * same key (after a re-read) can still apply.
   */
  current?: string;
  keys: string;
  p: KeyedPlaceholders;
}

const BODY = {
  applied: '{"status":"applied"}',
  'guard-failed': '{"status":"guard-failed"}',
  'not-found': '{"status":"not-found"}',
} as const;

type Status = keyof typeof BODY;

// The text the check fails with (22P02, in the message) when the write did not apply as predicted.
const CHANGED = 'pgcoord: the guarded row changed under the claim, run again';

const CLAIM = 'on conflict (scope, key) do nothing';

// The takeover variant's conflict clause: the same rule as idempotent()'s claim (run.ts), the row
// reset as a claim resets it, already completed with this statement's outcome.
const TAKEOVER = `on conflict (scope, key) do update set
    state = excluded.state, lease_token = null, lease_expires_at = null,
    fingerprint = excluded.fingerprint, fingerprint_version = excluded.fingerprint_version,
    recovery_point = case when t.expires_at <= statement_timestamp() then 'started' else t.recovery_point end,
    recovery_data = case when t.expires_at <= statement_timestamp() then '{}'::jsonb else t.recovery_data end,
    attempts = case when t.expires_at <= statement_timestamp() then 1 else t.attempts + 1 end,
    created_at = case when t.expires_at <= statement_timestamp() then clock_timestamp() else t.created_at end,
    response_status = excluded.response_status, response_headers = null, response_body = excluded.response_body,
    updated_at = clock_timestamp(), expires_at = excluded.expires_at
  where t.expires_at <= statement_timestamp()
     or ((t.fingerprint_version <> excluded.fingerprint_version or t.fingerprint = excluded.fingerprint)
         and (t.state = 'failed_retryable' or (t.state = 'running' and t.lease_expires_at <= clock_timestamp())))`;

/** The keyed statement (see the top of this file for its parts and why it is safe). */
export function keyedText(x: KeyedParts): string {
  const { p } = x;
  const versioned = x.current !== undefined;
  return `with pgcoord_r as (select true as pgcoord_found, (${x.guard}) as pgcoord_ok${versioned ? `, ${x.current} as pgcoord_v` : ''} from ${x.table} where ${x.where}),
pgcoord_k as (insert into ${x.keys} as t (scope, key, fingerprint, fingerprint_version, state, response_status, response_body, expires_at)
  select ${p.scope}, ${p.key}, ${p.fingerprint}::bytea, ${p.version}::int2, 'completed', 200,
    case when pgcoord_r.pgcoord_found is null then '${BODY['not-found']}'::bytea when pgcoord_r.pgcoord_ok then '${BODY.applied}'::bytea else '${BODY['guard-failed']}'::bytea end,
    clock_timestamp() + ${p.retention}::int8 * interval '1 millisecond'
  from (values (1)) as pgcoord_d (x) left join pgcoord_r on true${versioned ? '\n  where pgcoord_r.pgcoord_found is null or pgcoord_r.pgcoord_ok' : ''}
  ${CLAIM}
  returning case response_body when '${BODY.applied}'::bytea then 1 when '${BODY['guard-failed']}'::bytea then 2 else 3 end as pgcoord_claim),
pgcoord_u as (update ${x.table} set ${x.set} from pgcoord_k where ${x.where} and (${x.guard}) and pgcoord_k.pgcoord_claim = 1 returning ${x.table}.*, true as pgcoord_applied)${x.insert === undefined ? '' : `, pgcoord_i as (${x.insert})`}
select pgcoord_u.*, (case when pgcoord_k.pgcoord_claim = 1 and pgcoord_u.pgcoord_applied is null then '${CHANGED}' else '0' end)::int as pgcoord_check,
  pgcoord_k.pgcoord_claim as pgcoord_claimed,${versioned ? ' (pgcoord_r.pgcoord_found and pgcoord_r.pgcoord_ok is not true) as pgcoord_refused, pgcoord_r.pgcoord_v as pgcoord_current,' : ''} pgcoord_s.*
from (values (1)) as pgcoord_d (x) left join pgcoord_k on true left join pgcoord_u on true${versioned ? ' left join pgcoord_r on true' : ''}
  left join lateral (select state as pgcoord_state, fingerprint as pgcoord_fingerprint, fingerprint_version as pgcoord_fpv,
    response_status as pgcoord_status, response_body as pgcoord_body, expires_at <= statement_timestamp() as pgcoord_expired,
    extract(epoch from lease_expires_at - clock_timestamp()) * 1000 as pgcoord_lease_left
    from ${x.keys} where pgcoord_k.pgcoord_claim is null and scope = ${p.scope} and key = ${p.key}) as pgcoord_s on true`;
}

const takeovers = new Map<string, string>();

/** The takeover variant of a keyed statement: the same text, ON CONFLICT DO UPDATE where allowed. */
function takeoverOf(text: string): string {
  let t = takeovers.get(text);
  if (t === undefined) {
    t = text.replace(CLAIM, TAKEOVER);
    if (takeovers.size >= 1000) takeovers.clear(); // shapes made from data must not grow it without bound
    takeovers.set(text, t);
  }
  return t;
}

// The columns pgcoord adds after the updated row's, in order (removed from an applied row in
// reverse order: deleting the properties an object got last keeps it a fast object in V8).
const ADDED = [
  'pgcoord_applied',
  'pgcoord_check',
  'pgcoord_claimed',
  'pgcoord_refused',
  'pgcoord_current',
  'pgcoord_state',
  'pgcoord_fingerprint',
  'pgcoord_fpv',
  'pgcoord_status',
  'pgcoord_body',
  'pgcoord_expired',
  'pgcoord_lease_left',
];

/** What one run of the keyed statement said. */
export type KeyedStep =
  | { kind: 'first'; status: 'applied'; row: Row }
  | { kind: 'first'; status: 'guard-failed' | 'not-found' }
  | { kind: 'replay'; status: Status }
  /** `updateVersioned`: the version moved; nothing was claimed or written. */
  | { kind: 'refused'; current: unknown }
  | { kind: 'inflight'; retryAfterMs: number }
  /** The key's row may be taken over: run the takeover variant. */
  | { kind: 'takeover' }
  | { kind: 'miss' };

function storedStatus(row: Row, k: KeyedCheck): Status {
  const body = toBuffer(row.pgcoord_body).toString('utf8');
  const status = Number(row.pgcoord_status);
  if (status >= 400) {
    // a final failure stored by idempotent() under the same key and request
    let value: unknown = body;
    try {
      value = body.length === 0 ? null : JSON.parse(body);
    } catch {}
    throw new IdempotentFailureError(k.key, status, value, true);
  }
  if (body === BODY.applied) return 'applied';
  if (body === BODY['guard-failed']) return 'guard-failed';
  if (body === BODY['not-found']) return 'not-found';
  // the same key and request stored something else (an idempotent() handler's result): the key
  // means another operation
  throw new IdempotencyMismatchError(k.scope, k.key);
}

/** Read the keyed statement's one row. */
export function readKeyed(row: Row | undefined, k: KeyedCheck): KeyedStep {
  if (!row) return { kind: 'miss' };
  const claimed = row.pgcoord_claimed; // 1 applied, 2 guard-failed, 3 not-found, null: nothing claimed
  if (claimed === 1) {
    if (row.pgcoord_applied !== true) throw new Error('pgcoord internal error: a claimed write did not apply and the check passed');
    for (let i = ADDED.length - 1; i >= 0; i--) delete row[ADDED[i] as string];
    return { kind: 'first', status: 'applied', row };
  }
  if (claimed === 2) return { kind: 'first', status: 'guard-failed' };
  if (claimed === 3) return { kind: 'first', status: 'not-found' };
  const state = row.pgcoord_state;
  if (typeof state === 'string') {
    // The key's row, as idempotent()'s claim judges it: may a claim take it over?
    const sameRequest = Number(row.pgcoord_fpv) !== FINGERPRINT_VERSION || toBuffer(row.pgcoord_fingerprint).equals(k.fingerprint);
    const leaseOver = row.pgcoord_lease_left === null || Number(row.pgcoord_lease_left) <= 0;
    const free = row.pgcoord_expired === true || (sameRequest && (state === 'failed_retryable' || (state === 'running' && leaseOver)));
    if (!free) {
      // Rows of another fingerprint version cannot be compared (the claim treats them the same way).
      if (!sameRequest) throw new IdempotencyMismatchError(k.scope, k.key);
      if (state === 'completed') return { kind: 'replay', status: storedStatus(row, k) };
      if (state === 'running') return { kind: 'inflight', retryAfterMs: Math.max(1, Number(row.pgcoord_lease_left)) };
      return { kind: 'miss' };
    }
    if (row.pgcoord_refused === true) return { kind: 'refused', current: row.pgcoord_current };
    return { kind: 'takeover' };
  }
  // Nothing claimed and no row for the key in the snapshot: a version conflict (updateVersioned),
  // or another copy's row committed after this statement's snapshot (run it again).
  if (row.pgcoord_refused === true) return { kind: 'refused', current: row.pgcoord_current };
  return { kind: 'miss' };
}

/**
 * Run the keyed statement until it answers: a first call, a replay, or (updateVersioned) a
 * refusal. A key held by an attempt of `idempotent()` still running is waited for up to `waitMs`
 * (then {@link IdempotencyInFlightError}); a row committed after the statement's snapshot, or a
 * target row whose guard changed after it, makes it run again (a new snapshot); a key's row that
 * a claim may take over makes it run in its takeover variant.
 */
export async function runKeyed(
  runner: Runner,
  statement: { text: string; params: unknown[] },
  options: TransactionOptions & { signal?: AbortSignal },
  k: KeyedCheck,
): Promise<Exclude<KeyedStep, { kind: 'inflight' | 'miss' | 'takeover' }>> {
  let deadline = -1;
  let again = 0;
  let pause = 10;
  let current = statement;
  for (;;) {
    let rows: Row[] | undefined;
    try {
      rows = await runStatement(runner, current, options);
    } catch (err) {
      if (sqlState(err) === '42P01' && err instanceof Error && err.message.includes(k.label))
        throw new IdempotencyNotMigratedError(k.label, { cause: err });
      if (!(sqlState(err) === '22P02' && err instanceof Error && err.message.includes(CHANGED))) throw err;
    }
    const step: KeyedStep = rows === undefined ? { kind: 'miss' } : readKeyed(rows[0], k);
    if (step.kind === 'miss' || step.kind === 'takeover') {
      if (++again > 20)
        throw new PgcoordError(
          'PGCOORD_IDEMPOTENCY_UNSTABLE',
          `idempotency key ${JSON.stringify(k.key)} kept changing under the claim; retry`,
        );
      current = step.kind === 'takeover' ? { text: takeoverOf(statement.text), params: statement.params } : statement;
      continue;
    }
    if (step.kind !== 'inflight') return step;
    current = statement;
    const now = performance.now();
    if (deadline < 0) deadline = now + k.waitMs;
    if (now >= deadline) throw new IdempotencyInFlightError(k.scope, k.key, Math.max(1000, step.retryAfterMs));
    await sleep(Math.max(1, Math.min(pause, deadline - now, step.retryAfterMs + 5)), options.signal);
    pause = Math.min(pause * 2, 250);
  }
}

/** The public result of a first call or a replay (a refusal is the caller's to report). */
export function keyedResult<R>(step: Exclude<KeyedStep, { kind: 'inflight' | 'miss' | 'takeover' }>): IdempotentUpdateResult<R> {
  if (step.kind === 'first')
    return step.status === 'applied'
      ? { status: 'applied', replayed: false, row: step.row as R }
      : { status: step.status, replayed: false };
  if (step.kind === 'replay') return { status: step.status, replayed: true } as IdempotentUpdateResult<R>;
  throw new Error('pgcoord internal error: a refusal reached keyedResult');
}
