// `pgcoord locks`: the advisory locks held and awaited in the current database, decoded back to
// pgcoord's string keys where possible, with holders, waiters and who blocks whom.

import { type Conn, inTransaction, type Row, type Runner } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { candidateKeys, type DecodedKey, decodeLockRow, type KeyCandidate } from '../keys.js';
import { describe } from '../text.js';
import { duration, table } from './output.js';

/** A candidate string key for decoding: the name and, when pgcoord was given one, its namespace. */
export type { KeyCandidate };

/** Options of {@link listLocks}. */
export interface ListLocksOptions {
  /** Strings the keys may have been made from (keys this process hashed are always recognised). */
  names?: Iterable<KeyCandidate>;
}

/** One advisory lock, held or awaited. */
export interface AdvisoryLockInfo {
  /** The key: `int8` keys carry `name` (and `namespace`) when decoded. */
  key: DecodedKey;
  /** Display form: `"refunds":"order:42"`, `"order:42"`, the raw int8, or `[a,b]` for a pair. */
  label: string;
  /** `exclusive` or `shared`. */
  mode: 'exclusive' | 'shared';
  /** `held` (granted) or `waiting`. */
  status: 'held' | 'waiting';
  pid: number;
  applicationName: string | null;
  user: string | null;
  clientAddr: string | null;
  /** The session's state (`active`, `idle`, `idle in transaction`, ...). */
  state: string | null;
  /**
   * Since when (ISO time): for a waiter, when it started waiting (`pg_locks.waitstart`, PG ≥ 14;
   * else its statement's start); for a holder, the start of its open transaction, else the moment
   * its session went idle (a session lock held since at least then), else its statement's start.
   */
  since: string | null;
  /** Milliseconds from `since` to the server's `now()`. */
  forMs: number | null;
  /** Which clock `since` is: `waitstart`, `query_start`, `xact_start` or `state_change`. */
  sinceBasis: 'waitstart' | 'query_start' | 'xact_start' | 'state_change' | null;
  /** Pids this one waits for (`pg_blocking_pids`). Empty for holders. */
  blockedBy: number[];
  /** The session's current or last statement, shortened. */
  query: string | null;
}

const SQL = (waitstart: boolean) => `
select l.classid::text as classid, l.objid::text as objid, l.objsubid::int as objsubid, l.mode, l.granted, l.pid,
  ${waitstart ? 'l.waitstart' : 'null::timestamptz as waitstart'}, a.application_name, a.usename::text as usename,
  host(a.client_addr) as client_addr, a.state, a.xact_start, a.state_change, a.query_start,
  left(a.query, 200) as query, case when l.granted then '{}'::int[] else pg_blocking_pids(l.pid) end as blocked_by,
  now() as now
from pg_locks l left join pg_stat_activity a on a.pid = l.pid
where l.locktype = 'advisory' and l.database = (select oid from pg_database where datname = current_database())
order by l.granted desc, l.classid, l.objid, l.objsubid, l.pid`;

function time(v: unknown): Date | null {
  if (v === null || v === undefined) return null;
  const d = v instanceof Date ? v : new Date(String(v));
  return Number.isNaN(d.getTime()) ? null : d;
}

function labelOf(key: DecodedKey): string {
  if (key.space === 'pair') return `[${key.a},${key.b}]`;
  if (key.name === undefined) return String(key.id);
  return key.namespace ? `${JSON.stringify(key.namespace)}:${JSON.stringify(key.name)}` : JSON.stringify(key.name);
}

function pids(v: unknown): number[] {
  if (Array.isArray(v)) return v.map(Number);
  if (typeof v === 'string') return v.replace(/[{}]/g, '').split(',').filter(Boolean).map(Number); // '{1,2}' from a text array
  return [];
}

// A key this process did not hash, named from the candidates (hashed once for all rows).
function named(key: DecodedKey, known: Map<bigint, KeyCandidate> | undefined): DecodedKey {
  if (key.space !== 'int8' || key.name !== undefined) return key;
  const candidate = known?.get(key.id);
  return candidate ? { space: 'int8', id: key.id, namespace: candidate.namespace, name: candidate.name } : key;
}

/** Turn one row of the query into an {@link AdvisoryLockInfo}. */
function toInfo(row: Row, known: Map<bigint, KeyCandidate> | undefined): AdvisoryLockInfo {
  const key = named(decodeLockRow({ classid: String(row.classid), objid: String(row.objid), objsubid: Number(row.objsubid) }), known);
  const granted = row.granted === true || row.granted === 't';
  const [sinceDate, basis] = granted
    ? row.xact_start
      ? [time(row.xact_start), 'xact_start' as const]
      : row.state !== 'active' && row.state_change
        ? [time(row.state_change), 'state_change' as const]
        : [time(row.query_start), 'query_start' as const]
    : row.waitstart
      ? [time(row.waitstart), 'waitstart' as const]
      : [time(row.query_start), 'query_start' as const];
  const now = time(row.now);
  return {
    key,
    label: labelOf(key),
    mode: String(row.mode) === 'ShareLock' ? 'shared' : 'exclusive',
    status: granted ? 'held' : 'waiting',
    pid: Number(row.pid),
    applicationName: (row.application_name as string | null) ?? null,
    user: (row.usename as string | null) ?? null,
    clientAddr: (row.client_addr as string | null) ?? null,
    state: (row.state as string | null) ?? null,
    since: sinceDate?.toISOString() ?? null,
    forMs: sinceDate && now ? now.getTime() - sinceDate.getTime() : null,
    sinceBasis: sinceDate ? basis : null,
    blockedBy: pids(row.blocked_by),
    query: (row.query as string | null) ?? null,
  };
}

/**
 * The advisory locks held and awaited in the runner's current database (advisory locks are per
 * database), holders first. Keys made by pgcoord from strings are decoded when this process hashed
 * them or when they are among `names`.
 *
 * @throws {@link InvalidOptionError} when `options` or `names` is not what it should be, and
 * {@link InvalidKeyError} for a candidate that is not a valid key, before any statement is sent.
 *
 * @example
 * const locks = await listLocks(sql, { names: [{ namespace: 'refunds', name: 'order:42' }] });
 * for (const l of locks) console.log(l.label, l.status, l.pid, l.blockedBy);
 */
export async function listLocks(runner: Runner, options: ListLocksOptions = {}): Promise<AdvisoryLockInfo[]> {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError(`options must be an object, got ${describe(options)}`);
  const { names } = options;
  if (names !== undefined && (names === null || typeof names !== 'object' || typeof names[Symbol.iterator] !== 'function'))
    throw new InvalidOptionError(`names must be an iterable of { namespace?, name }, got ${describe(names)}`);
  const known = names === undefined ? undefined : candidateKeys(names);
  const rows = await inTransaction(runner, { readOnly: true }, async (scope) => {
    const [[v]] = (await scope.conn.send([{ text: VERSION_SQL }])) as [Row[]];
    const [found] = await scope.conn.send([{ text: SQL(Number(v?.v) >= 140000) }]);
    return found ?? [];
  });
  return rows.map((r) => toInfo(r, known));
}

const VERSION_SQL = `select current_setting('server_version_num')::int as v`;

/** One refresh of `pgcoord locks --watch`: the database, its clock, and {@link listLocks}'s rows. */
export interface LockSnapshot {
  database: string;
  /** The database's `now()` when the locks were read (ISO time). */
  at: string;
  locks: AdvisoryLockInfo[];
}

/**
 * A reader of {@link LockSnapshot}s on one connection (a watch's): what {@link listLocks} reads,
 * plus the database's name and clock, in one statement (one round trip, autocommit: one statement
 * is its own snapshot of pg_locks, no BEGIN/COMMIT needed). The server version is asked once, here.
 */
export async function lockSnapshots(
  conn: Conn,
  names: Iterable<KeyCandidate> = [],
): Promise<(signal?: AbortSignal) => Promise<LockSnapshot>> {
  const known = candidateKeys(names);
  const [[v]] = (await conn.send([{ text: VERSION_SQL }])) as [Row[]];
  // The left join keeps one row (with null lock columns) when there is no lock, for the clock.
  const text = `select s.database, s.at, l.* from (select current_database()::text as database, now() as at) s
left join (${SQL(Number(v?.v) >= 140000)}) l on true
order by l.granted desc nulls last, l.classid, l.objid, l.objsubid, l.pid`;
  return async (signal) => {
    const [rows = []] = await conn.send([{ text }], signal);
    const first = rows[0];
    return {
      database: String(first?.database ?? ''),
      at: time(first?.at)?.toISOString() ?? new Date().toISOString(),
      locks: rows.filter((r) => r.pid !== null && r.pid !== undefined).map((r) => toInfo(r, known)),
    };
  };
}

/** A readable table of {@link listLocks}'s result (one line per lock), or a line saying there are none. */
export function formatLocks(locks: readonly AdvisoryLockInfo[]): string {
  if (locks.length === 0) return 'no advisory locks held or awaited in this database';
  return table(
    ['KEY', 'MODE', 'STATUS', 'PID', 'APPLICATION', 'FOR', 'BLOCKED BY', 'QUERY'],
    locks.map((l) => [
      l.label,
      l.mode,
      l.status,
      String(l.pid),
      l.applicationName || '-',
      l.forMs === null ? '-' : `${duration(l.forMs)}${l.sinceBasis === 'state_change' ? '+' : ''}`,
      l.blockedBy.length ? l.blockedBy.join(',') : '-',
      (l.query ?? '').replace(/\s+/g, ' ').slice(0, 60),
    ]),
  );
}

/** Who waits behind whom: a waiter, then who blocks it, then who blocks that one, ... */
export interface BlockingChain {
  /** Pids from the waiter at the end of the chain to the session that holds up everyone in it. */
  pids: number[];
  /** What each pid but the last waits for (its key's label) and for how long. */
  waits: { pid: number; label: string; forMs: number | null }[];
}

/**
 * The blocking chains in {@link listLocks}'s result: one per path from a waiter nobody waits
 * behind, through `blockedBy`, to a session that waits for nothing here (or back into a cycle).
 */
export function blockingChains(locks: readonly AdvisoryLockInfo[]): BlockingChain[] {
  const waiting = new Map<number, AdvisoryLockInfo>();
  for (const l of locks) if (l.status === 'waiting') waiting.set(l.pid, l); // a session waits for one lock at a time
  const blocking = new Set(locks.flatMap((l) => l.blockedBy));
  const chains: BlockingChain[] = [];
  const covered = new Set<number>();
  const walk = (path: number[]) => {
    if (chains.length >= 100) return;
    const last = path[path.length - 1] as number;
    const wait = waiting.get(last);
    const next = wait?.blockedBy.filter((p) => !path.includes(p)) ?? [];
    if (next.length === 0) {
      for (const p of path) covered.add(p);
      chains.push({
        pids: path,
        waits: path.flatMap((p) => {
          const w = waiting.get(p);
          return w ? [{ pid: p, label: w.label, forMs: w.forMs }] : [];
        }),
      });
      return;
    }
    for (const p of next) walk([...path, p]);
  };
  for (const pid of waiting.keys()) if (!blocking.has(pid)) walk([pid]);
  for (const pid of waiting.keys()) if (!covered.has(pid)) walk([pid]); // a cycle: every waiter blocks another
  return chains;
}

/** {@link blockingChains} as lines `waiter ← holder ← ...`, with what each waits for; empty when nobody waits. */
export function formatChains(locks: readonly AdvisoryLockInfo[]): string {
  const chains = blockingChains(locks);
  if (chains.length === 0) return 'no blocking chains: nobody waits';
  const apps = new Map(locks.map((l) => [l.pid, l.applicationName]));
  const who = (pid: number) => (apps.get(pid) ? `${pid} (${apps.get(pid)})` : String(pid));
  return [
    'blocking chains (waiter ← holder):',
    ...chains.map(
      (c) =>
        `  ${c.pids.map(who).join(' ← ')}   ${c.waits.map((w) => `${w.pid} waits ${w.forMs === null ? '' : `${duration(w.forMs)} `}for ${w.label}`).join('; ')}`,
    ),
  ].join('\n');
}

/** Candidates from `--names` values and `--namespace` values: every name alone and under each namespace. */
export function candidates(names: readonly string[], namespaces: readonly string[]): KeyCandidate[] {
  const out: KeyCandidate[] = [];
  for (const name of names) {
    if (!name) continue;
    out.push({ name });
    for (const namespace of namespaces) if (namespace) out.push({ namespace, name });
  }
  return out;
}
