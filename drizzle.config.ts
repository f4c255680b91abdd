import { defineConfig } from 'drizzle-kit';

// Generates the idempotency table's migrations (pgcoord.idempotency_keys) into drizzle/.
// `npx drizzle-kit generate` after changing src/idempotency/schema.ts; `npx drizzle-kit check`
// verifies the folder. pgcoord applies them itself with `migrate()` (src/idempotency/migrate.ts).
export default defineConfig({
  dialect: 'postgresql',
  schema: './src/idempotency/schema.ts',
  out: './drizzle',
  schemaFilter: ['pgcoord'],
});
