import { describe, expect, it } from 'vitest';
import { withLock } from '../src/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb();

describe('runners', () => {
  for (const kind of db.runners) {
    it(`runs a locked callback through ${kind.name}`, async () => {
      const rows = await kind.use((runner) => withLock(runner, 'smoke', (tx) => q(tx, 'select $1::int + 1 as x', [41])));
      expect(rows[0]?.x).toBe(42);
    });
  }
});
