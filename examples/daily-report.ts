// The daily report that must run on one of five instances: every instance calls this at the
// scheduled time; one builds the report, the others wait and get its result (or skip at once with
// `--skip`). A slot is a day: a report that finished early is not built again by a late instance,
// and a builder that crashes or pauses past its lease is replaced, its writes refused.
//
//   DATABASE_URL=postgres://... npx tsx examples/daily-report.ts            # today's slot
//   DATABASE_URL=postgres://... npx tsx examples/daily-report.ts 2026-12-04 --skip

import { pathToFileURL } from 'node:url';
import postgres from 'postgres';
import { type Lease, migrateLeases, runSingleton, type SingletonResult, withFence } from '../src/index.js';

/** The lease tables (a deploy step in a real app) and the demo's tables. */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await migrateLeases(sql);
  await sql.unsafe(`
    create table if not exists sales (day date not null, amount_cents int not null);
    create table if not exists daily_reports (day date primary key, total_cents bigint not null, fence bigint not null)`);
}

/** The heavy part: sum the day's sales and store the report, fenced by the builder's lease. */
async function buildReport(sql: postgres.Sql, day: string, lease: Lease): Promise<{ day: string; totalCents: number }> {
  const [row] = await sql`select coalesce(sum(amount_cents), 0)::int as total from sales where day = ${day}`;
  const total = Number(row?.total);
  // Refused by Postgres (LeaseLostError) if this builder's lease was taken over meanwhile.
  await withFence(
    sql,
    lease,
    (tx: postgres.TransactionSql) =>
      tx`insert into daily_reports (day, total_cents, fence) values (${day}, ${total}, ${String(lease.fence)})
       on conflict (day) do update set total_cents = excluded.total_cents, fence = excluded.fence`,
  );
  return { day, totalCents: total };
}

/** Run the day's report once across every instance. */
export function dailyReport(
  sql: postgres.Sql,
  day: string,
  onBusy: 'wait' | 'skip' = 'wait',
): Promise<SingletonResult<{ day: string; totalCents: number }>> {
  return runSingleton(sql, { job: 'daily-report', slot: day, ttlMs: 30_000, onBusy }, (lease) => buildReport(sql, day, lease));
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres', { max: 2, onnotice: () => {} });
  const args = process.argv.slice(2);
  const day = args.find((a) => !a.startsWith('--')) ?? new Date().toISOString().slice(0, 10);
  try {
    await setUp(sql);
    const out = await dailyReport(sql, day, args.includes('--skip') ? 'skip' : 'wait');
    process.stdout.write(`${JSON.stringify({ pid: process.pid, status: out.status, value: 'value' in out ? out.value : null })}\n`);
  } finally {
    await sql.end({ timeout: 5 });
  }
}
