// The postgres.js under test: 4.x (`postgres`) by default, 3.4.x (the `postgres3` alias) with
// PGCOORD_PGJS=3. Tests, helpers and fixtures import the driver from here, never from 'postgres';
// fixtures run as child processes and see the same environment. Typed as postgres 4's default
// export (function and namespace: `postgres(url)`, `postgres.Sql`), whichever version runs.
import type Postgres from 'postgres';

/** The postgres.js major version under test. */
export const PGJS_MAJOR: 3 | 4 = process.env.PGCOORD_PGJS === '3' ? 3 : 4;

/** The package folder the driver under test is loaded from, relative to the repository root. */
export const PGJS_PACKAGE = PGJS_MAJOR === 3 ? 'node_modules/postgres3' : 'node_modules/postgres';

const postgres = (PGJS_MAJOR === 3
  ? (await import('postgres3')).default
  : (await import('postgres')).default) as unknown as typeof Postgres;

// The driver's types under the same name, so `import postgres from './pgjs.js'` serves both
// `postgres(url)` and `postgres.Sql` (what tests used from 'postgres').
declare namespace postgres {
  export type Sql<T extends Record<string, unknown> = {}> = Postgres.Sql<T>;
  export type TransactionSql<T extends Record<string, unknown> = {}> = Postgres.TransactionSql<T>;
  export type ReservedSql<T extends Record<string, unknown> = {}> = Postgres.ReservedSql<T>;
  export type Options<T extends Record<string, Postgres.PostgresType> = {}> = Postgres.Options<T>;
  export type PostgresType<T = unknown> = Postgres.PostgresType<T>;
  export type PendingQuery<T extends readonly Postgres.MaybeRow[]> = Postgres.PendingQuery<T>;
  export type RowList<T extends readonly unknown[]> = Postgres.RowList<T>;
  export type Row = Postgres.Row;
  export type MaybeRow = Postgres.MaybeRow;
  export type Fragment = Postgres.Fragment;
  export type Error = Postgres.Error;
}

export default postgres;
