// The database connection of a `pgcoord` command: `--url` or `DATABASE_URL`, through whichever
// driver the project has installed (postgres.js first, then node-postgres).

import type { Runner } from '../driver/index.js';
import { CliUsageError } from './errors.js';

/** An open connection pool for one command. */
export interface CliConnection {
  runner: Runner;
  driver: 'postgres' | 'pg';
  close(): Promise<void>;
}

/** The URL from `--url`, else `DATABASE_URL`; a usage error when neither is set or it is not a postgres URL. */
export function connectionUrl(url: string | undefined, env: NodeJS.ProcessEnv = process.env): string {
  const value = url ?? env.DATABASE_URL;
  if (!value) throw new CliUsageError('no database: pass --url postgres://... or set DATABASE_URL');
  let parsed: URL;
  try {
    parsed = new URL(value);
  } catch {
    throw new CliUsageError('the database URL is not a valid URL (expected postgres://user@host:port/database)');
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:')
    throw new CliUsageError(`the database URL must start with postgres:// or postgresql://, got ${parsed.protocol}//`);
  return value;
}

/**
 * Open a small pool on `url`. Statements are never prepared (safe behind PgBouncer-like poolers),
 * notices are dropped, and `application_name` is `pgcoord-cli` unless the URL sets one.
 */
export async function openConnection(url: string, max = 3): Promise<CliConnection> {
  const params = new URL(url).searchParams;
  const application = params.has('application_name') ? {} : { application_name: 'pgcoord-cli' };
  // the URL's connect_timeout (seconds) wins; 10 s otherwise
  const given = Number(params.get('connect_timeout'));
  const connectTimeoutS = params.has('connect_timeout') && Number.isFinite(given) && given > 0 ? given : 10;
  try {
    const { default: postgres } = await import('postgres');
    const sql = postgres(url, { max, prepare: false, onnotice: () => {}, connect_timeout: connectTimeoutS, connection: application });
    return { runner: sql, driver: 'postgres', close: () => sql.end({ timeout: 2 }) };
  } catch (err) {
    if (!isMissing(err)) throw err;
  }
  try {
    const { default: pg } = await import('pg');
    const pool = new pg.Pool({ connectionString: url, max, connectionTimeoutMillis: connectTimeoutS * 1000, ...application });
    pool.on('error', () => {});
    return { runner: pool, driver: 'pg', close: () => pool.end() };
  } catch (err) {
    if (!isMissing(err)) throw err;
  }
  throw new CliUsageError('no PostgreSQL driver installed: npm install postgres (or pg)');
}

function isMissing(err: unknown): boolean {
  return (err as { code?: string })?.code === 'ERR_MODULE_NOT_FOUND';
}
