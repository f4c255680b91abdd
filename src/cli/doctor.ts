// `pgcoord doctor`: known hazards in the installed drivers and the connected server, each with
// what to do. Hazards make the command exit 1; warnings and infos do not.

import { getTableConfig } from 'drizzle-orm/pg-core';
import { type Conn, inTransaction, type PinnedConn, pinConnection, type Row, type Runner } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { idempotencyMigrations } from '../idempotency/migrate.js';
import { DEFAULT_SCHEMA, DEFAULT_TABLE, idempotencyTable } from '../idempotency/schema.js';
import {
  FIXED_POSTGRES_MAJOR,
  findPackage,
  hasConnectionFaultBugs,
  type InstalledPackage,
  majorVersion,
  PATCHED_POSTGRES_VERSIONS,
  shippedPatch,
  unpatchedFiles,
} from './drivers.js';
import { checkName } from './generate.js';

/** How serious a finding is: only `hazard` fails the check. */
export type Severity = 'hazard' | 'warning' | 'info' | 'ok' | 'skipped';

/** One thing doctor checked. */
export interface DoctorFinding {
  /** Stable id: `postgres-js-unpatched`, `standby`, `cockroachdb`, `transaction-pooler`, `idempotency-table`, ... */
  id: string;
  severity: Severity;
  /** One line: what was found. */
  message: string;
  /** What to do about it. */
  fix?: string;
}

/** Options of {@link doctor}. */
export interface DoctorOptions {
  /** The app's folder, where its drivers are resolved from. Default `process.cwd()`. */
  project?: string;
  /** A pool on the database to check (postgres.js `sql`, pg `Pool`, drizzle db). Server checks are skipped without it. */
  runner?: Runner;
  /** Where the idempotency table should be. Defaults `pgcoord` / `idempotency_keys`. */
  schema?: string;
  table?: string;
}

/** What {@link doctor} found. */
export interface DoctorReport {
  findings: DoctorFinding[];
  hazards: number;
  warnings: number;
}

/**
 * True when a `version()` string is CockroachDB's. Pure; CockroachDB cannot run in pgcoord's tests,
 * so this is what the tests cover (with a faked string).
 *
 * @example
 * isCockroachVersion('CockroachDB CCL v23.1.11 (x86_64-pc-linux-gnu, built 2023/09/27)') // true
 */
export function isCockroachVersion(version: string): boolean {
  return /cockroach/i.test(version);
}

/**
 * The finding for an installed postgres.js: every 3.x has connection-fault bugs (porsager/postgres
 * #1066, #1154, #1208, #1216) that pgcoord's patch fixes, a hazard unless the patch is applied; 4.x
 * has the fixes upstream.
 */
export function checkPostgresJs(pgjs: InstalledPackage): DoctorFinding {
  const version = pgjs.version || '(unknown version)';
  const major = majorVersion(pgjs.version);
  if (!hasConnectionFaultBugs(pgjs.version)) {
    if (major !== undefined && major > FIXED_POSTGRES_MAJOR)
      return {
        id: 'postgres-js',
        severity: 'warning',
        message: `postgres.js ${version}: newer than pgcoord is tested with (peer range >=3.4 <5)`,
        fix: 'use postgres.js 4.x, or check the pgcoord release notes for this major',
      };
    return {
      id: 'postgres-js',
      severity: 'ok',
      message: `postgres.js ${version}: no patch needed (${FIXED_POSTGRES_MAJOR}.x has the fixes)`,
    };
  }
  const missing = unpatchedFiles(pgjs);
  if (missing.length === 0) return { id: 'postgres-js', severity: 'ok', message: `postgres.js ${version} with the pgcoord patch` };
  const patch = shippedPatch(pgjs.version);
  const upgrade = `upgrade to postgres.js ${FIXED_POSTGRES_MAJOR}.x (recommended: the bugs are fixed there, no patch needed)`;
  const apply = (file: string) =>
    `copy ${file} into your app's patches/ folder, npm install -D patch-package, add "postinstall": "patch-package" to package.json and run npm install`;
  const last = PATCHED_POSTGRES_VERSIONS.at(-1) ?? '';
  return {
    id: 'postgres-js-unpatched',
    severity: 'hazard',
    message: `postgres.js ${version} (${pgjs.dir}) has known connection-fault bugs (porsager/postgres #1066, #1154, #1208, #1216; fixed in ${FIXED_POSTGRES_MAJOR}.x): a killed backend can crash the process, and a statement of a failed transaction can commit; the pgcoord patch is not applied (${missing.join(', ')})`,
    fix: patch
      ? `${upgrade}; or ${apply(patch)} (or use node-postgres)`
      : `${upgrade}; or pin postgres.js ${last} and ${apply(shippedPatch(last) ?? `postgres+${last}.patch`)} (pgcoord ships patches for ${PATCHED_POSTGRES_VERSIONS.join(' and ')} only; or use node-postgres)`,
  };
}

/** The driver findings for the app at `project`. */
export function checkDrivers(project: string): DoctorFinding[] {
  const findings: DoctorFinding[] = [];
  const pgjs = findPackage(project, 'postgres');
  if (pgjs) findings.push(checkPostgresJs(pgjs));
  const pg = findPackage(project, 'pg');
  if (pg)
    findings.push({
      id: 'node-postgres',
      severity: 'info',
      message: `node-postgres ${pg.version}: attach pool.on('error', ...) on your Pool (pgcoord handles the clients it checks out)`,
    });
  if (!pgjs && !pg) findings.push({ id: 'drivers', severity: 'info', message: `no postgres or pg package found from ${project}` });
  return findings;
}

async function one(runner: Runner, text: string): Promise<Row | undefined> {
  return inTransaction(runner, { readOnly: true }, async (scope) => (await scope.conn.send([{ text }]))[0]?.[0]);
}

async function pidOf(conn: Conn): Promise<number> {
  const [rows] = await conn.send([{ text: 'select pg_backend_pid()::int as pid' }]);
  return Number(rows?.[0]?.pid);
}

const timeout = (ms: number) => new Promise<'timeout'>((r) => setTimeout(r, ms, 'timeout').unref());

/**
 * Whether statements on one client connection reach different backends (a transaction-mode pooler).
 * Connection A runs several statements (each its own transaction) and notes its backend pid; in
 * the middle, connection B opens a transaction, which a pooler must give a server of its own (often
 * the one A just used), and A runs another statement. Without a pooler A's pid never changes and
 * B's differs from A's. Returns the reason when a pooler shows itself.
 */
export async function probeTransactionPooler(runner: Runner, waitMs = 3000): Promise<string | undefined> {
  const a = await pinConnection(runner);
  let b: PinnedConn | undefined;
  let dirty = true;
  try {
    const seen = [a.pid];
    for (let i = 0; i < 3; i++) seen.push(await pidOf(a.conn));
    b = await pinConnection(runner);
    const [, rows] = await b.conn.send([{ text: 'begin' }, { text: 'select pg_backend_pid()::int as pid' }]);
    const pidB = Number(rows?.[0]?.pid);
    const during = await Promise.race([pidOf(a.conn), timeout(waitMs)]);
    if (during === 'timeout')
      return `a statement on one connection waited ${waitMs} ms while another connection held a transaction open: they share backends`;
    seen.push(during);
    await b.conn.send([{ text: 'commit' }]);
    for (let i = 0; i < 3; i++) seen.push(await pidOf(a.conn));
    dirty = false;
    const distinct = [...new Set(seen)];
    if (distinct.length > 1) return `one connection's statements ran on backends ${distinct.join(', ')}`;
    if (pidB === a.pid) return `two client connections were served by the same backend (pid ${pidB})`;
    return undefined;
  } finally {
    // Clean connections go back to the pool; after a timeout A still has a statement in flight.
    a.release(dirty);
    b?.release(dirty);
  }
}

function setting(name: string, value: string, off: string, on: string): DoctorFinding {
  const isOff = value === '0' || value === '0ms';
  return { id: name, severity: 'info', message: `${name} = ${value}${isOff ? ' (off)' : ''}: ${isOff ? off : on}` };
}

/** The server findings for the database behind `runner`. */
export async function checkServer(runner: Runner, schema: string, table: string): Promise<DoctorFinding[]> {
  const findings: DoctorFinding[] = [];
  const version = String((await one(runner, 'select version() as v'))?.v ?? '');
  if (isCockroachVersion(version)) {
    findings.push({
      id: 'cockroachdb',
      severity: 'hazard',
      message: `the server is CockroachDB (${version.slice(0, 60)}): its advisory lock functions are stubs that grant every lock, so pgcoord's advisory and session locks exclude nothing`,
      fix: 'use row locks (withRowLock, claim), optimistic updates or SERIALIZABLE transactions with retry instead of advisory locks',
    });
    return findings;
  }
  findings.push({ id: 'server', severity: 'ok', message: version.split(' on ')[0] ?? version });
  const state = await one(
    runner,
    `select pg_is_in_recovery() as standby, current_setting('idle_in_transaction_session_timeout') as idle,
       current_setting('lock_timeout') as lock, current_setting('statement_timeout') as stmt,
       to_regclass('"${schema}"."${table}"')::text as idem, to_regclass('pgcoord.__migrations')::text as migrations`,
  );
  if (state?.standby === true || state?.standby === 't')
    findings.push({
      id: 'standby',
      severity: 'hazard',
      message: 'the server is a standby (pg_is_in_recovery() is true): it is read-only and its advisory locks are not seen by the primary',
      fix: 'point the app (and DATABASE_URL) at the primary; a failover target must be promoted before pgcoord runs on it',
    });
  findings.push(...(await checkTable(runner, schema, table, state)));
  findings.push(
    setting(
      'idle_in_transaction_session_timeout',
      String(state?.idle),
      'a client that dies inside a transaction keeps its locks until TCP notices; consider e.g. 60s for the app role',
      'a pgcoord transaction idle that long is ended by the server; pgcoord reports ConnectionLostError and nothing of it commits',
    ),
    setting(
      'lock_timeout',
      String(state?.lock),
      'lock waits are bounded only by the timeoutMs you pass to pgcoord',
      'lock waits longer than this fail (LockTimeoutError) even without timeoutMs',
    ),
    setting('statement_timeout', String(state?.stmt), 'no limit', 'statements (including lock waits) longer than this are cancelled'),
  );
  // Last: after a timed-out probe a connection is dropped, and nothing else needs the pool.
  const pooler = await probeTransactionPooler(runner).catch((err: Error) => `the pooler probe failed: ${err.message}`);
  if (pooler)
    findings.push({
      id: 'transaction-pooler',
      severity: 'hazard',
      message: `session locks behind a transaction-mode pooler: ${pooler}; a session lock taken on one backend is not held for the next statement`,
      fix: 'connect session locks (acquireSessionLock) directly or through a session-mode pool, or use transaction-scoped locks (withLock)',
    });
  else
    findings.push({ id: 'transaction-pooler', severity: 'ok', message: 'one connection keeps its backend (no transaction-mode pooler)' });
  return findings;
}

async function checkTable(runner: Runner, schema: string, table: string, state: Row | undefined): Promise<DoctorFinding[]> {
  const name = `${schema}.${table}`;
  if (!state?.idem)
    return [
      {
        id: 'idempotency-table',
        severity: 'warning',
        message: `the idempotency table ${name} does not exist (needed only by idempotent() and the HTTP middleware)`,
        fix: `add it to your migrations with \`pgcoord generate --schema ${schema} --table ${table}\`, or call migrateIdempotency() at deploy time`,
      },
    ];
  const expected = getTableConfig(idempotencyTable({ schema, table })).columns.map((c) => c.name);
  const rows = await inTransaction(runner, { readOnly: true }, async (scope) => {
    const [found] = await scope.conn.send([
      {
        text: 'select column_name::text as name from information_schema.columns where table_schema = $1 and table_name = $2',
        params: [schema, table],
      },
    ]);
    let applied: Row[] = [];
    if (state.migrations) {
      const [got] = await scope.conn.send([
        { text: 'select id from pgcoord.__migrations where target = $1', params: [`idempotency:${name}`] },
      ]);
      applied = got ?? [];
    }
    return { columns: (found ?? []).map((r) => String(r.name)), applied: applied.map((r) => String(r.id)) };
  });
  const missing = expected.filter((c) => !rows.columns.includes(c));
  const pending =
    rows.applied.length > 0
      ? idempotencyMigrations({ schema, table })
          .map((m) => m.id)
          .filter((id) => !rows.applied.includes(id))
      : [];
  if (missing.length > 0 || pending.length > 0)
    return [
      {
        id: 'idempotency-table',
        severity: 'warning',
        message: `the idempotency table ${name} needs a pending migration (${[...pending, ...missing.map((c) => `missing column ${c}`)].join(', ')})`,
        fix: 'run `pgcoord generate` again and apply the new migration, or call migrateIdempotency() at deploy time',
      },
    ];
  return [{ id: 'idempotency-table', severity: 'ok', message: `the idempotency table ${name} is up to date` }];
}

/**
 * Check the installed drivers (from `project`) and, with a `runner`, the connected server for known
 * hazards: postgres.js 3.x without the pgcoord patch (4.x needs none), a standby, CockroachDB, session locks
 * behind a transaction-mode pooler; warns about a missing or outdated idempotency table; reports
 * lock-related settings.
 *
 * @example
 * const report = await doctor({ runner: sql });
 * if (report.hazards > 0) console.error(formatDoctor(report));
 */
export async function doctor(options: DoctorOptions = {}): Promise<DoctorReport> {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('doctor options must be an object');
  if (options.project !== undefined && (typeof options.project !== 'string' || options.project === ''))
    throw new InvalidOptionError(
      `project must be a folder path, got ${typeof options.project === 'string' ? 'an empty string' : typeof options.project}`,
    );
  const schema = checkName(options.schema ?? DEFAULT_SCHEMA, 'schema');
  const table = checkName(options.table ?? DEFAULT_TABLE, 'table');
  const findings = checkDrivers(options.project ?? process.cwd());
  if (options.runner) findings.push(...(await checkServer(options.runner, schema, table)));
  else findings.push({ id: 'server', severity: 'skipped', message: 'no database (--url or DATABASE_URL): server checks skipped' });
  return {
    findings,
    hazards: findings.filter((f) => f.severity === 'hazard').length,
    warnings: findings.filter((f) => f.severity === 'warning').length,
  };
}

const MARK: Record<Severity, string> = { hazard: 'HAZARD', warning: 'WARN  ', info: 'INFO  ', ok: 'OK    ', skipped: 'SKIP  ' };

/** The report as lines for people: one per finding, with its fix indented below. */
export function formatDoctor(report: DoctorReport): string {
  const lines = report.findings.flatMap((f) => [`${MARK[f.severity]} ${f.message}`, ...(f.fix ? [`       fix: ${f.fix}`] : [])]);
  lines.push(
    report.hazards > 0
      ? `${report.hazards} hazard${report.hazards === 1 ? '' : 's'} found`
      : `no hazards found${report.warnings ? ` (${report.warnings} warning${report.warnings === 1 ? '' : 's'})` : ''}`,
  );
  return lines.join('\n');
}
