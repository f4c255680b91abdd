// The machine and server the figures come from.
import os from 'node:os';
import type postgres from 'postgres';

/** Machine, runtime and PostgreSQL facts recorded with every run. */
export interface Environment {
  date: string;
  machine: { cpu: string; cores: number; memoryGiB: number; os: string };
  node: string;
  postgres: { version: string; source: string; settings: Record<string, string> };
  redis?: string;
  pgbench?: string;
}

const SETTINGS = ['fsync', 'synchronous_commit', 'max_connections', 'shared_buffers', 'wal_sync_method', 'max_locks_per_transaction'];

/** Collect the machine's CPU, cores, memory and OS, Node's version and the server's version and settings. */
export async function environment(sql: postgres.Sql, source: string): Promise<Environment> {
  const [v] = await sql.unsafe<{ v: string }[]>('select version() as v');
  const rows = await sql.unsafe<{ name: string; setting: string }[]>(
    "select name, case when unit = '8kB' then pg_size_pretty(setting::bigint * 8192) else setting end as setting from pg_settings where name = any($1::text[])",
    [SETTINGS],
  );
  return {
    date: new Date().toISOString(),
    machine: {
      cpu: os.cpus()[0]?.model.trim() ?? 'unknown',
      cores: os.availableParallelism?.() ?? os.cpus().length,
      memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
      os: `${os.type()} ${os.release()} ${os.arch()}`,
    },
    node: process.version,
    postgres: { version: v?.v ?? 'unknown', source, settings: Object.fromEntries(rows.map((r) => [r.name, r.setting])) },
  };
}
