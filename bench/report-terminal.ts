// The terminal report: one table per contention level, then the ratios with PASS / MISS.
import { type FaultResult, faultNote } from './fault.js';
import { type LeaseBench, leaseTables } from './lease.js';
import type { Environment } from './machine.js';
import type { Overhead } from './overhead.js';
import { type Ratio, targetText, valueText } from './ratios.js';
import type { StrategyResult } from './result.js';

const f0 = (n: number) => (Number.isFinite(n) ? Math.round(n).toString() : '-');
const f1 = (n: number) => (Number.isFinite(n) ? n.toFixed(1) : '-');
const f2 = (n: number) => (Number.isFinite(n) ? n.toFixed(2) : '-');

/** Render rows as an aligned text table (numbers right-aligned). */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === 0 || Number.isNaN(Number(c.replace(/[×%,]/g, ''))) ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join('  ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

const errorsText = (e: Record<string, number>) =>
  Object.entries(e)
    .map(([k, v]) => `${k}:${v}`)
    .join(' ') || '-';

/** The per-level result table. */
export function resultTable(rows: readonly StrategyResult[]): string {
  const guarded = rows.find((r) => r.id === 'guarded/plain')?.refundsPerSec;
  return table(
    [
      'strategy',
      'verdict',
      'refunds/s',
      'p50 ms',
      'p95 ms',
      'p99 ms',
      'max ms',
      'att/ans',
      'RT/req',
      'errors',
      'over-refund',
      'dup paid',
      'acked-missing',
      'vs guarded',
    ],
    rows.map((r) => [
      r.label,
      r.verdict,
      f0(r.refundsPerSec),
      f2(r.latency.p50),
      f2(r.latency.p95),
      f2(r.latency.p99),
      f1(r.latency.max),
      f2(r.attemptsPerSuccess),
      r.redisTripsPerRequest !== undefined ? `${f2(r.roundTripsPerRequest)}+${f2(r.redisTripsPerRequest)}R` : f2(r.roundTripsPerRequest),
      errorsText(r.errors),
      f0(r.audit.overRefund),
      r.impl.startsWith('pgbench') ? 'n/a' : f0(r.audit.duplicateCalls),
      r.impl.startsWith('pgbench') ? 'n/a' : f0(r.audit.ackedMissing),
      guarded ? `${f2(r.refundsPerSec / guarded)}×` : '-',
    ]),
  );
}

/** The ratios with their targets. */
export function ratioTable(rs: readonly Ratio[], groups?: readonly Ratio['group'][]): string {
  const shown = rs.filter((r) => !groups || groups.includes(r.group));
  return table(
    ['ratio', 'orders', 'value', 'target', 'status'],
    shown.map((r) => [r.label, String(r.orders), valueText(r), targetText(r) || '-', r.status ?? '']),
  );
}

/** The whole terminal report. */
export function terminalReport(
  env: Environment,
  levels: readonly number[],
  results: readonly StrategyResult[],
  rs: readonly Ratio[],
  fault: FaultResult | undefined,
  notes: readonly string[],
  overheads: readonly Overhead[] = [],
  lease?: LeaseBench,
): string {
  const out: string[] = [];
  out.push(
    `pgcoord refund storm — ${env.date}`,
    `${env.machine.cpu}, ${env.machine.cores} cores, ${env.machine.memoryGiB} GiB, ${env.machine.os}; Node ${env.node}`,
    `${env.postgres.version.split(' on ')[0]} (${env.postgres.source}); ${Object.entries(env.postgres.settings)
      .map(([k, v]) => `${k}=${v}`)
      .join(', ')}`,
    '',
  );
  for (const orders of levels) {
    out.push(`== ${orders === 1 ? '1 hot order' : `${orders} orders`}`, resultTable(results.filter((r) => r.orders === orders)), '');
  }
  out.push(
    'verdict: OK = no money beyond totals, every acknowledged refund in the table, no duplicate payout; WRONG = over-refund or a lost acknowledgement;',
    '         DUP-PAID = correct under concurrency but pays a duplicate delivery twice (no idempotency key).',
    'att/ans = attempts (first tries + conflict retries + lock polls) per answered request; RT/req = Postgres round trips per request (+ Redis).',
    '',
    '== targets',
    ratioTable(
      rs.filter((r) => r.target !== undefined),
      undefined,
    ),
    '',
    ...(overheads.length
      ? [
          `== pgcoord overhead: interleaved pairs vs the same SQL hand-written, ${overheads[0]!.orders} orders`,
          table(
            ['pgcoord / hand-written twin', 'pairs', 'median', 'q1', 'q3', 'client CPU µs/req', 'correct'],
            overheads.map((o) => [
              o.label,
              String(o.pairs),
              `${f2(o.median)}×`,
              `${f2(o.q1)}×`,
              `${f2(o.q3)}×`,
              `${f0(o.cpuUs.pgcoord)} vs ${f0(o.cpuUs.twin)}`,
              o.correct ? 'yes' : 'NO',
            ]),
          ),
          '',
        ]
      : []),
    '== ratios (refunds/s)',
    ratioTable(rs.filter((r) => r.target === undefined && r.group !== 'vs guarded')),
    '',
  );
  if (fault) {
    out.push(
      `== fault: the first holder pauses ${fault.pauseMs} ms after its check; Redis lock and lease TTL ${fault.ttlMs} ms; order total ${fault.orderTotal}`,
    );
    out.push(
      table(
        ['lock', 'payouts', 'over-refund', 'verdict', 'note'],
        fault.outcomes.map((o) => [o.lock, String(o.payouts), String(o.overRefund), o.verdict, faultNote(o)]),
      ),
      '',
    );
  }
  if (lease) for (const t of leaseTables(lease)) out.push(`== ${t.title}`, table(t.header, t.rows), '');
  for (const n of notes) out.push(`note: ${n}`);
  return out.join('\n');
}
