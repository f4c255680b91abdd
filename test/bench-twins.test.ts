// The benchmark reads pgcoord's overhead off pgcoord strategy / hand-written twin pairs that must
// send the same statements: this checks that they do, statement by statement, as the server sees
// them (postgres.js's debug hook), so a change to pgcoord's SQL cannot silently skew the figure.
import { beforeAll, describe, expect, it } from 'vitest';
import { OVERHEAD_PAIRS } from '../bench/overhead.js';
import { strategies } from '../bench/strategies/index.js';
import { createSchema, Gateway, resetTables } from '../bench/workload.js';
import { migrate } from '../src/idempotency/index.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb();

beforeAll(async () => {
  await createSchema(db.sql);
  await migrate(db.sql); // pgcoord's idempotency table, for the idempotency pair
  await resetTables(db.sql, new Map(OVERHEAD_PAIRS.map((_, i) => [i + 1, 1000])));
});

/** What one refund of order `orderId` sends on a fresh one-connection pool, and its outcome. */
async function statementsOf(id: string, orderId: number): Promise<{ outcome: string; statements: string[] }> {
  const strategy = strategies.find((s) => s.id === id);
  if (!strategy) throw new Error(`no strategy ${id}`);
  const statements: string[] = [];
  // (on postgres.js 4 pgcoord learns the id of a connection it meets for the first time from one
  // `select 1` marked with a unique comment: not part of the strategy's SQL)
  const sql = db.newSql({
    max: 1,
    debug: (_connection, text) => void (/ \/\* pgcoord \d+ \*\/$/.test(text) || statements.push(text)),
  });
  const outcome = await strategy.refund(
    { sql, gateway: new Gateway(0), maxAttempts: 3, retry: () => {}, redisTrip: () => {} },
    { requestId: `${id}-${orderId}`, orderId, amount: 1, duplicate: false },
  );
  return { outcome, statements };
}

describe('each overhead twin sends exactly the SQL of its pgcoord strategy', () => {
  OVERHEAD_PAIRS.forEach(([pgcoord, twin], i) => {
    it(`${twin} = ${pgcoord}`, async () => {
      const mine = await statementsOf(pgcoord, i + 1);
      const theirs = await statementsOf(twin, i + 1);
      expect(mine.outcome).toBe('refunded');
      expect(mine.statements.length).toBeGreaterThan(0);
      expect(theirs).toEqual(mine);
    });
  });
});
