// A self-contained HTML report: inline SVG charts (throughput and p99 vs contention, one line per
// strategy), the result tables, the ratios and the fault scenario. No script, font or stylesheet
// is loaded from anywhere: it opens without a network.
import { type FaultResult, faultNote } from './fault.js';
import { type LeaseBench, leaseTables } from './lease.js';
import type { Environment } from './machine.js';
import { type Ratio, targetText, valueText } from './ratios.js';
import type { StrategyResult } from './result.js';

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
const PALETTE = [
  '#d62728',
  '#1f77b4',
  '#2ca02c',
  '#17becf',
  '#9467bd',
  '#8c564b',
  '#e377c2',
  '#ff7f0e',
  '#7f7f7f',
  '#bcbd22',
  '#393b79',
  '#637939',
  '#8c6d31',
  '#843c39',
  '#7b4173',
  '#3182bd',
  '#31a354',
  '#756bb1',
  '#636363',
  '#e6550d',
];

function niceMax(v: number): number {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return ([1, 2, 2.5, 5, 10].find((m) => m * p >= v) ?? 10) * p;
}

/** One line chart: x = contention levels (categorical, hottest first), y = `value(result)`. */
export function lineChart(
  title: string,
  unit: string,
  levels: readonly number[],
  results: readonly StrategyResult[],
  value: (r: StrategyResult) => number,
): string {
  const W = 760;
  const H = 380;
  const L = 70;
  const R = 250;
  const T = 30;
  const B = 50;
  const ids = [...new Set(results.map((r) => r.id))];
  const vals = results
    .filter((r) => r.verdict !== 'SKIPPED')
    .map(value)
    .filter(Number.isFinite);
  const ymax = niceMax(Math.max(0, ...vals));
  const x = (i: number) => L + (levels.length === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (levels.length - 1));
  const y = (v: number) => T + (H - T - B) * (1 - v / ymax);
  const parts: string[] = [];
  parts.push(`<text x="${L}" y="18" font-weight="bold">${esc(title)}</text>`);
  for (let k = 0; k <= 5; k++) {
    const v = (ymax * k) / 5;
    parts.push(
      `<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/><text x="${L - 6}" y="${y(v) + 4}" text-anchor="end" font-size="11">${Math.round(v * 100) / 100}</text>`,
    );
  }
  levels.forEach((o, i) => {
    parts.push(`<text x="${x(i)}" y="${H - B + 18}" text-anchor="middle" font-size="11">${o === 1 ? '1 (hot)' : o}</text>`);
  });
  parts.push(`<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle" font-size="12">orders (fewer = more contention)</text>`);
  parts.push(
    `<text x="14" y="${(T + H - B) / 2}" transform="rotate(-90 14 ${(T + H - B) / 2})" text-anchor="middle" font-size="12">${esc(unit)}</text>`,
  );
  ids.forEach((id, n) => {
    const color = PALETTE[n % PALETTE.length];
    const pts = levels
      .map((o, i) => {
        const r = results.find((q) => q.id === id && q.orders === o && q.verdict !== 'SKIPPED');
        return r && Number.isFinite(value(r)) ? `${x(i).toFixed(1)},${y(value(r)).toFixed(1)}` : undefined;
      })
      .filter(Boolean);
    const r0 = results.find((q) => q.id === id);
    const dash = r0?.impl.startsWith('pgbench') ? ' stroke-dasharray="5 3"' : r0?.expectCorrect === false ? ' stroke-dasharray="2 2"' : '';
    parts.push(
      `<polyline fill="none" stroke="${color}" stroke-width="${r0?.impl === 'pgcoord' ? 3 : 1.5}"${dash} points="${pts.join(' ')}"/>`,
    );
    for (const p of pts) {
      const [px, py] = (p as string).split(',');
      parts.push(`<circle cx="${px}" cy="${py}" r="2.5" fill="${color}"/>`);
    }
    const ly = T + n * 16;
    parts.push(
      `<line x1="${W - R + 12}" x2="${W - R + 32}" y1="${ly}" y2="${ly}" stroke="${color}" stroke-width="2"${dash}/><text x="${W - R + 36}" y="${ly + 4}" font-size="11">${esc(r0?.label ?? id)}</text>`,
    );
  });
  const height = Math.max(H, T + ids.length * 16 + 10);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${height}" font-family="sans-serif">${parts.join('')}</svg>`;
}

function htmlTable(header: string[], rows: string[][]): string {
  return `<table><tr>${header.map((h) => `<th>${esc(h)}</th>`).join('')}</tr>${rows
    .map(
      (r) =>
        `<tr>${r.map((c) => `<td class="${/^(WRONG|MISS)$/.test(c) ? 'bad' : /^(OK|PASS)$/.test(c) ? 'good' : ''}">${esc(c)}</td>`).join('')}</tr>`,
    )
    .join('')}</table>`;
}

/** The whole report as one HTML string. */
export function htmlReport(
  env: Environment,
  levels: readonly number[],
  results: readonly StrategyResult[],
  rs: readonly Ratio[],
  fault: FaultResult | undefined,
  notes: readonly string[],
  options: Record<string, unknown>,
  lease?: LeaseBench,
): string {
  const fmt = (n: number, d = 0) => (Number.isFinite(n) ? n.toFixed(d) : '-');
  const sections = levels.map((orders) => {
    const rows = results.filter((r) => r.orders === orders);
    return `<h3>${orders === 1 ? '1 hot order' : `${orders} orders`}</h3>${htmlTable(
      [
        'strategy',
        'verdict',
        'refunds/s',
        'p50 ms',
        'p95 ms',
        'p99 ms',
        'max ms',
        'attempts/answer',
        'round trips/request',
        'errors',
        'over-refund',
        'duplicate payouts',
        'acked but missing',
      ],
      rows.map((r) => [
        r.label,
        r.verdict,
        fmt(r.refundsPerSec),
        fmt(r.latency.p50, 2),
        fmt(r.latency.p95, 2),
        fmt(r.latency.p99, 2),
        fmt(r.latency.max, 1),
        fmt(r.attemptsPerSuccess, 2),
        fmt(r.roundTripsPerRequest, 2) + (r.redisTripsPerRequest !== undefined ? ` + ${fmt(r.redisTripsPerRequest, 2)} Redis` : ''),
        Object.entries(r.errors)
          .map(([k, v]) => `${k}: ${v}`)
          .join(', ') || '-',
        fmt(r.audit.overRefund),
        r.impl.startsWith('pgbench') ? 'n/a' : fmt(r.audit.duplicateCalls),
        r.impl.startsWith('pgbench') ? 'n/a' : fmt(r.audit.ackedMissing),
      ]),
    )}`;
  });
  const ratioRows = (list: readonly Ratio[]) =>
    htmlTable(
      ['ratio', 'orders', 'value', 'target', 'status'],
      list.map((r) => [r.label, String(r.orders), valueText(r), targetText(r), r.status ?? '']),
    );
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pgcoord refund storm ${esc(env.date)}</title>
<style>body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
.bad{background:#fdd;font-weight:bold}.good{background:#dfd}code{background:#f3f3f3;padding:1px 3px}</style></head><body>
<h1>pgcoord refund storm</h1>
<p>${esc(env.date)} — ${esc(env.machine.cpu)}, ${env.machine.cores} cores, ${env.machine.memoryGiB} GiB, ${esc(env.machine.os)}; Node ${esc(env.node)}<br>
${esc(env.postgres.version)} (${esc(env.postgres.source)}); ${esc(
    Object.entries(env.postgres.settings)
      .map(([k, v]) => `${k}=${v}`)
      .join(', '),
  )}<br>options: <code>${esc(JSON.stringify(options))}</code></p>
<p>Verdict: <b>OK</b> = no money beyond totals, every acknowledged refund in the table, no duplicate payout; <b>WRONG</b> = over-refund or a lost acknowledgement;
<b>DUP-PAID</b> = correct under concurrency but pays a duplicate delivery twice (no idempotency key). Dashed lines: pgbench; dotted: the negative control; thick: pgcoord.</p>
${lineChart('Successful refunds per second vs contention', 'refunds/s', levels, results, (r) => r.refundsPerSec)}
${lineChart('p99 latency vs contention', 'p99 ms', levels, results, (r) => r.latency.p99)}
<h2>Results</h2>${sections.join('\n')}
<h2>Targets</h2>${ratioRows(rs.filter((r) => r.target !== undefined))}
<h2>Ratios</h2>${ratioRows(rs.filter((r) => r.target === undefined))}
${
  fault
    ? `<h2>Fault: a pause longer than the lock's TTL</h2><p>The first holder pauses ${fault.pauseMs} ms after its check; Redis lock and pgcoord lease TTL ${fault.ttlMs} ms; one order of ${fault.orderTotal}, two full refunds. The lease's holders refund in a transaction fenced by <code>withFence</code>: the paused holder's write carries its old fence.</p>${htmlTable(
        ['lock', 'payouts', 'over-refund', 'verdict', 'note'],
        fault.outcomes.map((o) => [o.lock, String(o.payouts), String(o.overRefund), o.verdict, faultNote(o)]),
      )}`
    : ''
}
${
  lease
    ? `<h2>Leases</h2><p>pgcoord leases beside the Redis lock: acquire + release per second (a try that finds the name held is a try, not an operation), round trips of each operation, and how fast a follower takes over from a leader that resigns or dies. RT/op: Postgres round trips per acquire + release, tries included (R: Redis commands).</p>${leaseTables(
        lease,
      )
        .map((t) => `<h3>${esc(t.title)}</h3>${htmlTable(t.header, t.rows)}`)
        .join('\n')}`
    : ''
}
${notes.map((n) => `<p>Note: ${esc(n)}</p>`).join('\n')}
</body></html>
`;
}
