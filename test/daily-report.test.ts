// examples/daily-report.ts as the seed describes it: five instances started at once, each a
// process of its own, for the same day.
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import * as dailyReportExample from '../examples/daily-report.js';
import { runTs, useTestDb } from './helpers.js';

// small pools: five child processes connect too, beside the other test file running at once
const db = await useTestDb(2);
type PgjsSql = Parameters<typeof dailyReportExample.setUp>[0];

// Five instances of the daily-report program, each a process of its own, started at once.
function runInstances(args: string[], n = 5): Promise<{ status: string; value: unknown }[]> {
  const script = fileURLToPath(new URL('../examples/daily-report.ts', import.meta.url));
  return Promise.all(
    Array.from({ length: n }, () => runTs<{ status: string; value: unknown }>(script, args, { env: { DATABASE_URL: db.url } })),
  );
}

describe('examples/daily-report.ts', () => {
  it('five processes, one day: one builds the report, the others receive its result; a late one too', async () => {
    await dailyReportExample.setUp(db.sql as unknown as PgjsSql);
    await db.sql`insert into sales values ('2026-12-04', 1500), ('2026-12-04', 2500), ('2026-12-05', 700)`;
    const out = await runInstances(['2026-12-04']);
    expect(out.map((o) => o.status).sort()).toEqual(['done', 'done', 'done', 'done', 'ran']);
    for (const o of out) expect(o.value).toEqual({ day: '2026-12-04', totalCents: 4000 });
    expect(await db.sql`select total_cents::int as total from daily_reports`).toEqual([{ total: 4000 }]);
    const [late] = await runInstances(['2026-12-04'], 1);
    expect(late).toMatchObject({ status: 'done', value: { day: '2026-12-04', totalCents: 4000 } });

    const skipping = await runInstances(['2026-12-05', '--skip']);
    const statuses = skipping.map((o) => o.status);
    expect(statuses.filter((s) => s === 'ran')).toHaveLength(1);
    expect(statuses.every((s) => s === 'ran' || s === 'skipped' || s === 'done')).toBe(true);
    expect(await db.sql`select total_cents::int as total from daily_reports where day = '2026-12-05'`).toEqual([{ total: 700 }]);
  });
});
