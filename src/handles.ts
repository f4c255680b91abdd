import type { PgDatabase, PgQueryResultHKT, PgTransaction } from 'drizzle-orm/pg-core';
import type { Client, Pool, PoolClient } from 'pg';
import type { Sql, TransactionSql } from 'postgres';

/**
 * The transaction handle a callback receives for a runner of type `R`: a postgres.js transaction
 * for `sql`, a `PoolClient` for a pg `Pool`, the `Client` itself, a drizzle `tx` for a drizzle db;
 * a caller's transaction is passed through as it is.
 */
export type HandleOf<R> =
  R extends PgTransaction<PgQueryResultHKT, infer F, infer S>
    ? PgTransaction<PgQueryResultHKT, F, S>
    : R extends PgDatabase<infer Q, infer F, infer S>
      ? PgTransaction<Q, F, S>
      : R extends TransactionSql<infer T>
        ? TransactionSql<T>
        : R extends Sql<infer T>
          ? TransactionSql<T>
          : R extends Pool
            ? PoolClient
            : R extends PoolClient
              ? PoolClient
              : R extends Client
                ? Client
                : unknown;
