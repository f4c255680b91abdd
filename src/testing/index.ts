import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { startEmbeddedPostgres } from './embedded.js';

export { type EmbeddedServer, startEmbeddedPostgres } from './embedded.js';

/** A running PostgreSQL for tests, and how it was obtained. */
export interface TestServer {
  url: string;
  source: 'env' | 'container' | 'embedded';
  stop(): Promise<void>;
}

function dockerMayAnswer(): boolean {
  return Boolean(process.env.DOCKER_HOST) || existsSync('/var/run/docker.sock');
}

async function startContainer(): Promise<TestServer | undefined> {
  if (!dockerMayAnswer()) return undefined;
  try {
    const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
    const container = await new PostgreSqlContainer('postgres:18-alpine').start();
    return { url: container.getConnectionUri(), source: 'container', stop: async () => void (await container.stop()) };
  } catch {
    return undefined; // no engine answering, or the package is not installed: fall through
  }
}

/**
 * Get a real PostgreSQL: `DATABASE_URL` if set; else a testcontainers PostgreSQL when a Docker
 * engine answers; else an embedded PostgreSQL from npm binaries (no install needed).
 *
 * @example
 * const server = await startTestServer();
 * // ... run tests against server.url
 * await server.stop();
 */
export async function startTestServer(): Promise<TestServer> {
  const env = process.env.DATABASE_URL;
  if (env) return { url: env, source: 'env', stop: async () => {} };
  const container = await startContainer();
  if (container) return container;
  const embedded = await startEmbeddedPostgres();
  return { url: embedded.url, source: 'embedded', stop: embedded.stop };
}

/**
 * vitest globalSetup: start one server for the whole run, `provide('databaseUrl')` it and set
 * `process.env.DATABASE_URL` so child processes and nested setups reuse it.
 *
 * @example
 * // vitest.config.ts
 * export default defineConfig({ test: { globalSetup: ['pgcoord/testing/global-setup'] } });
 */
export async function setupTestServer(project?: { provide(key: string, value: unknown): void }) {
  const server = await startTestServer();
  process.env.DATABASE_URL = server.url;
  project?.provide('databaseUrl', server.url);
  return async () => {
    await server.stop();
  };
}

// What the global setup provides: `inject('databaseUrl')` in a test file is typed.
declare module 'vitest' {
  export interface ProvidedContext {
    /** The URL of the server the run uses (DATABASE_URL, a container or the embedded one). */
    databaseUrl: string;
  }
}

/** A database of its own for one test file. */
export interface TestDatabase {
  url: string;
  name: string;
  drop(): Promise<void>;
}

/**
 * Create an empty database on the server at `serverUrl` (default `DATABASE_URL`, which the global
 * setup sets for every test file) — one per test file, so files never see each other's rows or
 * advisory locks (advisory locks are per database). `drop()` removes it, terminating any
 * connection left open: call it after the file (`afterAll(() => db.drop())`), or the database
 * stays on a server of yours (an embedded one goes away with its server anyway).
 *
 * @example
 * const db = await createTestDatabase();
 * afterAll(() => db.drop());
 */
export async function createTestDatabase(serverUrl = process.env.DATABASE_URL, prefix = 'pgcoord_test'): Promise<TestDatabase> {
  if (!serverUrl)
    throw new Error(
      "createTestDatabase needs a server: pass its URL, set DATABASE_URL, or use globalSetup: ['pgcoord/testing/global-setup']",
    );
  const { default: postgres } = await import('postgres');
  const name = `${prefix}_${randomBytes(6).toString('hex')}`.toLowerCase();
  if (!/^[a-z_][a-z0-9_]{0,62}$/.test(name)) throw new Error(`invalid test database prefix: ${prefix}`);
  const admin = postgres(serverUrl, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`create database ${name}`);
  } finally {
    await admin.end();
  }
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    name,
    async drop() {
      const sql = postgres(serverUrl, { max: 1, onnotice: () => {} });
      try {
        await sql.unsafe(`drop database if exists ${name} with (force)`);
      } finally {
        await sql.end();
      }
    },
  };
}
