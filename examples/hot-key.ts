// A hot cache key expires and a thousand requests arrive within milliseconds. Without
// coordination each runs the heavy query; with singleFlight the first refills the value and the
// rest, in this process and in every other instance, wait briefly and get it.
//
//   DATABASE_URL=postgres://... npx tsx examples/hot-key.ts

import { pathToFileURL } from 'node:url';
import postgres from 'postgres';
import { migrateLeases, type Runner, singleFlight } from '../src/index.js';

/** The product page: the heavy query runs at most once per minute across every instance. */
export function productPage(runner: Runner, id: number, heavyQuery: () => Promise<unknown>, signal?: AbortSignal) {
  return singleFlight(runner, `product-page:${id}`, heavyQuery, { ttlMs: 60_000, waitMs: 5000, signal });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres', { max: 4, onnotice: () => {} });
  try {
    await migrateLeases(sql); // a deploy step in a real app
    let heavy = 0;
    const load = async () => {
      heavy++;
      const [row] = await sql`select count(*)::int as n from pg_class, pg_class c2 where c2.oid < 100`;
      return { id: 1, related: row?.n };
    };
    const pages = await Promise.all(Array.from({ length: 1000 }, () => productPage(sql, 1, load)));
    console.log(
      `${pages.length} requests, heavy query run ${heavy} time(s) here; sources:`,
      pages.map((p) => p.source).filter((s, i, a) => a.indexOf(s) === i),
    );
  } finally {
    await sql.end({ timeout: 5 });
  }
}
