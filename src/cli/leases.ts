// `pgcoord leases`: the rows of pgcoord.leases, with who holds each lease, its fence, whether it is
// held or free, and when its term ends, all on the database clock (the clock leases run on).

import { type Row, type Runner, runStatement } from '../driver/index.js';
import { sqlState } from '../errors.js';
import { LeasesNotMigratedError } from '../lease/errors.js';
import { LEASES } from '../lease/schema.js';
import { duration, table } from './output.js';

/** One lease, as {@link listLeases} reports it. */
export interface LeaseInfo {
  /** The lease's name, e.g. `report:daily`. */
  name: string;
  /** `held`: its term has not ended (database clock); `free`: expired or released, anyone may take it. */
  state: 'held' | 'free';
  /** The holder's label (the `holder` option, else host:pid); for a free lease, the last holder's. Null if never set. */
  holder: string | null;
  /** The fence of the current term (held) or of the last one (free). */
  fence: bigint;
  /**
   * Milliseconds from now until the term ends, both on the database clock
   * (`expires_at - clock_timestamp()`): positive while held, zero or negative (ended that long
   * ago) when free. A holder renews before then, so it moves forward while the lease is in use.
   */
  expiresInMs: number;
  /** When the term ends (or ended), ISO time. */
  expiresAt: string;
  /** When the current (or last) term began, ISO time. */
  acquiredAt: string;
  /** The term's last renewal (or its acquisition), ISO time. */
  renewedAt: string;
}

// One instant for every row (clock_timestamp() moves during the statement); times as epoch
// milliseconds, so every driver (and drizzle's string timestamps) reads them the same way.
const SQL = `select l.name, l.fence::text as fence, l.holder_label, (l.expires_at > n.t) as held,
  (extract(epoch from l.expires_at - n.t) * 1000)::float8 as expires_in_ms,
  (extract(epoch from l.expires_at) * 1000)::float8 as expires_at,
  (extract(epoch from l.acquired_at) * 1000)::float8 as acquired_at,
  (extract(epoch from l.renewed_at) * 1000)::float8 as renewed_at
from ${LEASES} l cross join (select clock_timestamp() as t) n
order by l.name`;

const iso = (ms: unknown) => new Date(Math.round(Number(ms))).toISOString();

function toInfo(row: Row): LeaseInfo {
  const held = row.held === true || row.held === 't';
  return {
    name: String(row.name),
    state: held ? 'held' : 'free',
    holder: row.holder_label === null || row.holder_label === undefined ? null : String(row.holder_label),
    fence: BigInt(String(row.fence)),
    expiresInMs: Math.round(Number(row.expires_in_ms)),
    expiresAt: iso(row.expires_at),
    acquiredAt: iso(row.acquired_at),
    renewedAt: iso(row.renewed_at),
  };
}

/**
 * The leases in pgcoord.leases, by name: held ones and free ones (a lease's row stays once
 * created). One read statement; in a caller's transaction it joins it.
 *
 * @throws {@link LeasesNotMigratedError} when pgcoord.leases does not exist (run `migrateLeases()`).
 * @example
 * for (const l of await listLeases(sql)) console.log(l.name, l.state, l.holder, l.fence, l.expiresInMs);
 */
export async function listLeases(runner: Runner): Promise<LeaseInfo[]> {
  try {
    const rows = await runStatement(runner, { text: SQL }, {}, true);
    return rows.map(toInfo);
  } catch (err) {
    const state = sqlState(err);
    if (state === '42P01' || state === '3F000') throw new LeasesNotMigratedError({ cause: err });
    throw err;
  }
}

/** {@link listLeases}'s result as JSON text: fences as decimal strings (they may exceed 2^53). */
export function leasesJson(list: readonly LeaseInfo[]): string {
  return JSON.stringify(
    list.map((l) => ({ ...l, fence: String(l.fence) })),
    null,
    2,
  );
}

// A name or label written by hand may hold line breaks or other control characters: shown quoted.
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it looks for
const printable = (text: string) => (/[\u0000-\u001f\u007f]/.test(text) ? JSON.stringify(text) : text);

/** A readable table of {@link listLeases}'s result (one line per lease), or a line saying there are none. */
export function formatLeases(list: readonly LeaseInfo[]): string {
  if (list.length === 0) return `no leases in ${LEASES}`;
  return table(
    ['NAME', 'STATE', 'HOLDER', 'FENCE', 'EXPIRES IN'],
    list.map((l) => [
      printable(l.name),
      l.state,
      l.holder === null ? '-' : printable(l.holder),
      String(l.fence),
      l.state === 'held' ? duration(l.expiresInMs) : `ended ${duration(-l.expiresInMs)} ago`,
    ]),
  );
}
