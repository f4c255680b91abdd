// Hand-written transactions on a reserved postgres.js connection, with plain BEGIN/COMMIT
// statements (the reserved handle has no `.begin`), so statements can be pipelined.
import type postgres from 'postgres';
import type { OrderRow } from './types.js';

type Stmt = readonly [text: string, params?: readonly unknown[], options?: { prepare: boolean }];
type Rows = Record<string, unknown>[];

/**
 * postgres.js prepares tagged-template queries, but `sql.unsafe(text, params)` only with
 * `{ prepare: true }`: without it every parameterized statement is sent as Parse + Describe, the
 * client waits for the parameter types, then sends Bind + Execute (two round trips, and the
 * statements queued behind it are not pipelined). Every hand-written strategy passes this.
 */
export const PREPARED = { prepare: true } as const;

/**
 * Run `fn` on a reserved connection. On error a ROLLBACK is sent (harmless when a pipelined COMMIT
 * already ended the transaction) and the connection goes back to the pool.
 */
export async function onReserved<T>(sql: postgres.Sql, fn: (c: postgres.ReservedSql) => Promise<T>): Promise<T> {
  const c = await sql.reserve();
  try {
    return await fn(c);
  } catch (err) {
    await c.unsafe('rollback').catch(() => {});
    throw err;
  } finally {
    c.release();
  }
}

/**
 * Send statements back to back without awaiting in between: postgres.js flushes them in one
 * socket write, and the server answers them in order (one round trip). If one fails, the server
 * skips the rest of the transaction's statements, and a pipelined COMMIT after it acts as ROLLBACK.
 */
export async function pipeline(c: postgres.ReservedSql, statements: readonly Stmt[]): Promise<Rows[]> {
  const queries = statements.map(([text, params, options]) =>
    c.unsafe(text, (params ?? []) as postgres.ParameterOrJSON<never>[], options ?? PREPARED).execute(),
  );
  return (await Promise.all(queries)) as unknown as Rows[];
}

/** The first row of a result as an order. */
export function order(rows: Rows | undefined): OrderRow | undefined {
  return rows?.[0] as OrderRow | undefined;
}
