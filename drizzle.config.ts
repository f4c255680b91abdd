import { defineConfig } from 'drizzle-kit';

// Generates the migrations of pgcoord's tables (pgcoord.idempotency_keys, pgcoord.leases,
// pgcoord.singleton_runs, pgcoord.rate_limits, the queue tables) into drizzle/.
// `npx drizzle-kit generate` after changing src/idempotency/schema.ts; `npx drizzle-kit check`
// verifies the folder. pgcoord applies them itself with `migrate()` (src/idempotency/migrate.ts).
export default defineConfig({
  dialect: 'postgresql',
  schema: ['./src/idempotency/schema.ts', './src/lease/schema.ts', './src/limit/schema.ts', './src/queue/schema.ts'],
  out: './drizzle',
  schemaFilter: ['pgcoord'],
});
