// Query through whatever handle a pgcoord callback received, without vitest (child processes use it too).

/** Run a query through whatever handle a pgcoord callback received (postgres.js tx, pg client, drizzle tx). */
export async function q(handle: unknown, text: string, params: unknown[] = []): Promise<Record<string, unknown>[]> {
  const h = handle as Record<string, unknown> & ((...a: unknown[]) => unknown);
  if (typeof h === 'function' && typeof h.unsafe === 'function')
    return (await (h.unsafe as (t: string, p: unknown[]) => Promise<Record<string, unknown>[]>)(text, params)) as Record<string, unknown>[];
  if (typeof h.execute === 'function' && typeof h.select === 'function') {
    const { sql } = await import('drizzle-orm');
    // drizzle: inline $n parameters through sql.param so the driver binds them
    const parts = text.split(/\$(\d+)/);
    const chunks = parts.map((p, i) => (i % 2 === 0 ? sql.raw(p) : sql`${params[Number(p) - 1]}`));
    const res = await (h.execute as (s: unknown) => Promise<unknown>)(sql.join(chunks, sql.raw('')));
    return Array.isArray(res) ? (res as Record<string, unknown>[]) : ((res as { rows?: Record<string, unknown>[] }).rows ?? []);
  }
  if (typeof h.query === 'function')
    return (await (h.query as (t: string, p: unknown[]) => Promise<{ rows: Record<string, unknown>[] }>)(text, params)).rows;
  throw new Error('unknown handle');
}
