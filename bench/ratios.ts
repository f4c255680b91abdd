// Ratios inside one run (the only figures that mean anything on a shared, noisy machine) and the
// speed targets of ../shared/TARGETS.md, shown as PASS / MISS. A miss never fails the run.
import { OVERHEAD_PAIRS, type Overhead } from './overhead.js';
import type { StrategyResult } from './result.js';

/** One ratio: a / b of successful refunds per second. */
export interface Ratio {
  group:
    | 'vs guarded'
    | 'pgcoord vs hand-written'
    | 'pgcoord overhead, interleaved'
    | 'pgcoord vs hand-written, interleaved'
    | 'round trips'
    | 'advisory vs Redis'
    | 'vs pgbench'
    | 'hot vs spread';
  label: string;
  orders: number | string;
  a: string;
  b: string;
  value: number;
  /** Quartiles of the per-pair ratios (interleaved overhead only). */
  q1?: number;
  q3?: number;
  /** The target the ratio must reach, when there is one. */
  target?: number;
  /**
   * `'RT'`: not a ratio but a difference in Postgres round trips per request (a − b), and the
   * target is the most it may be.
   */
  unit?: 'RT';
  status?: 'PASS' | 'MISS' | 'n/a';
}

const find = (rs: readonly StrategyResult[], id: string, orders: number) =>
  rs.find((r) => r.id === id && r.orders === orders && r.verdict !== 'SKIPPED' && r.refundsPerSec > 0);

function ratio(
  group: Ratio['group'],
  label: string,
  orders: number | string,
  a: StrategyResult | undefined,
  b: StrategyResult | undefined,
  target?: number,
): Ratio | undefined {
  if (!a) return undefined;
  if (!b)
    return target === undefined ? undefined : { group, label, orders, a: a.id, b: 'missing', value: Number.NaN, target, status: 'n/a' };
  const value = a.refundsPerSec / b.refundsPerSec;
  return {
    group,
    label,
    orders,
    a: a.id,
    b: b.id,
    value,
    ...(target !== undefined ? { target, status: value >= target ? 'PASS' : 'MISS' } : {}),
  };
}

/** pgcoord may be at most this much slower than the same SQL hand-written (3 %). */
export const OVERHEAD_TARGET = 0.97;

/** A ratio's value as shown: `0.98×`, or `+0.02 RT` for a round-trip difference. */
export function valueText(r: Ratio): string {
  if (!Number.isFinite(r.value)) return '-';
  return r.unit === 'RT' ? `${r.value >= 0 ? '+' : ''}${r.value.toFixed(2)} RT` : `${r.value.toFixed(2)}×`;
}

/** A ratio's target as shown: `≥ 0.97×`, or `≤ +1 RT`. */
export function targetText(r: Ratio): string {
  if (r.target === undefined) return '';
  return r.unit === 'RT' ? `≤ +${r.target} RT` : `≥ ${r.target.toFixed(2)}×`;
}

/** pgcoord's idempotent plan may cost at most this many round trips more than the same plan without a key. */
export const PLAN_RT_TARGET = 1;

/**
 * Every ratio of the run. `levels` are the contention levels (orders), hottest first. The overhead
 * target is judged on the interleaved comparisons (see overhead.ts); the one-shot ratios of
 * pgcoord vs hand-written are shown beside them, without a verdict (one short run each is noise).
 */
export function ratios(results: readonly StrategyResult[], levels: readonly number[], overheads: readonly Overhead[] = []): Ratio[] {
  const out: (Ratio | undefined)[] = [];
  const hot = Math.min(...levels);
  const spread = Math.max(...levels);
  for (const orders of levels) {
    const guarded = find(results, 'guarded/plain', orders);
    for (const r of results.filter((x) => x.orders === orders && x.id !== 'guarded/plain'))
      out.push(ratio('vs guarded', `${r.label} / guarded UPDATE`, orders, r, guarded));
  }
  const control = overheads.find((o) => o.control);
  const noise = control ? `; noise control ${control.median.toFixed(2)}× (IQR ${control.q1.toFixed(2)}–${control.q3.toFixed(2)})` : '';
  for (const o of overheads.filter((x) => x.versus)) {
    out.push({
      group: 'pgcoord vs hand-written, interleaved',
      label: `${o.label}, other SQL by design (median of ${o.pairs} pairs, IQR ${o.q1.toFixed(2)}–${o.q3.toFixed(2)}${noise})`,
      orders: o.orders,
      a: o.pgcoord,
      b: o.twin,
      value: o.median,
      q1: o.q1,
      q3: o.q3,
      target: OVERHEAD_TARGET,
      status: o.correct ? (o.median >= OVERHEAD_TARGET ? 'PASS' : 'MISS') : 'n/a',
    });
  }
  for (const o of overheads.filter((x) => !x.versus)) {
    out.push({
      group: 'pgcoord overhead, interleaved',
      label: `${o.label} (median of ${o.pairs} pairs, IQR ${o.q1.toFixed(2)}–${o.q3.toFixed(2)})`,
      orders: o.orders,
      a: o.pgcoord,
      b: o.twin,
      value: o.median,
      q1: o.q1,
      q3: o.q3,
      // the noise control has no target: it is the yardstick for the others
      ...(o.control
        ? {}
        : {
            target: OVERHEAD_TARGET,
            status: o.correct ? (o.median >= OVERHEAD_TARGET ? ('PASS' as const) : ('MISS' as const)) : ('n/a' as const),
          }),
    });
  }
  for (const orders of levels) {
    for (const p of results.filter((x) => x.orders === orders && x.impl === 'pgcoord')) {
      // the same-SQL twin is the one of the overhead pairs, where one was written
      const twin = OVERHEAD_PAIRS.find(([a]) => a === p.id)?.[1];
      const same = twin === undefined ? undefined : find(results, twin, orders);
      // a family with a single natural shape (guarded UPDATE, optimistic, idempotency) has its
      // hand-written 'plain' version as its best shape
      const best = find(results, `${p.family}/best`, orders) ?? find(results, `${p.family}/plain`, orders);
      // the same-shape twin exists only where it was written (see the registry)
      if (twin !== undefined && results.some((r) => r.id === twin))
        out.push(ratio('pgcoord vs hand-written', `${p.label} / same SQL, hand-written (one run each)`, orders, p, same));
      out.push(ratio('pgcoord vs hand-written', `${p.label} / best hand-written shape (one run each)`, orders, p, best));
      if (results.some((r) => r.id === `pgbench/${p.family}`)) {
        const bench = find(results, `pgbench/${p.family}`, orders);
        out.push(ratio('vs pgbench', `${p.label} / pgbench unpipelined, same SQL`, orders, p, bench, 1.0));
      }
    }
  }
  // the plan form of idempotent() against the same read and write without a key (withRowLock's
  // write plan): round trips per request, at every level
  for (const orders of levels) {
    const plan = find(results, 'idempotency/pgcoord-plan', orders);
    const alone = find(results, 'for-update/pgcoord', orders);
    if (!plan) continue;
    const value = alone ? plan.roundTripsPerRequest - alone.roundTripsPerRequest : Number.NaN;
    out.push({
      group: 'round trips',
      label: `${plan.label} − ${alone?.label ?? 'pgcoord withRowLock (write plan)'} (the same read and write without a key), RT/request`,
      orders,
      a: plan.id,
      b: alone?.id ?? 'missing',
      value,
      unit: 'RT',
      target: PLAN_RT_TARGET,
      status: alone ? (value <= PLAN_RT_TARGET ? 'PASS' : 'MISS') : 'n/a',
    });
  }
  const advisory = (o: number) => find(results, 'advisory/pgcoord', o);
  out.push(
    ratio('advisory vs Redis', 'pgcoord advisory / Redis lock, hot order', hot, advisory(hot), find(results, 'redis/plain', hot), 1.5),
  );
  out.push(
    ratio(
      'advisory vs Redis',
      'pgcoord advisory / Redis lock, spread',
      spread,
      advisory(spread),
      find(results, 'redis/plain', spread),
      1.0,
    ),
  );
  out.push(
    ratio(
      'advisory vs Redis',
      'best-shape advisory / Redis lock, hot order',
      hot,
      find(results, 'advisory/best', hot),
      find(results, 'redis/plain', hot),
    ),
  );
  out.push(
    ratio(
      'advisory vs Redis',
      'best-shape advisory / Redis lock, spread',
      spread,
      find(results, 'advisory/best', spread),
      find(results, 'redis/plain', spread),
    ),
  );
  if (hot !== spread) {
    const ids = [...new Set(results.map((r) => r.id))];
    for (const id of ids) {
      const h = find(results, id, hot);
      out.push(ratio('hot vs spread', `${h?.label ?? id}: ${hot} / ${spread} orders`, `${hot}/${spread}`, h, find(results, id, spread)));
    }
  }
  return out.filter((r): r is Ratio => r !== undefined);
}
