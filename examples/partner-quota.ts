// A paid partner API allows 100 calls a minute; ten stateless instances share it. Each instance
// waits its turn on the shared limit before it calls: together they never send more than the
// quota in any minute, whatever their clocks say (the database clock decides).
//
//   DATABASE_URL=postgres://... PARTNER_URL=https://partner.example/api npx tsx examples/partner-quota.ts

import { pathToFileURL } from 'node:url';
import postgres from 'postgres';
import { migrateLimits, type Runner, waitForLimit } from '../src/index.js';

/** The partner's quota. A little margin on the period absorbs network jitter on the way to the partner. */
export const QUOTA = { rate: 100, per: 60_000 + 100 };

/** Call the partner once, when the shared quota allows it. */
export async function callPartner(runner: Runner, url: string, signal?: AbortSignal, quota = QUOTA): Promise<Response> {
  await waitForLimit(runner, 'partner-api', { ...quota, signal });
  return fetch(url, { method: 'POST', signal });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres', { max: 2, onnotice: () => {} });
  try {
    await migrateLimits(sql); // a deploy step in a real app
    for (let i = 0; i < 10; i++) {
      const res = await callPartner(sql, process.env.PARTNER_URL ?? 'http://127.0.0.1:8080/');
      console.log(`call ${i + 1}: ${res.status}`);
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
}
