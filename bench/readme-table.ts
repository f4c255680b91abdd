// Print the results table of bench/README.md (Markdown) from a run's JSON: `tsx bench/readme-table.ts <file.json>`.
import { readFileSync } from 'node:fs';
import type { Environment } from './machine.js';
import { type Ratio, targetText, valueText } from './ratios.js';
import type { StrategyResult } from './result.js';

/** Markdown table: per strategy, refunds/s, p99 and round trips at the hottest and the most spread level. */
export function markdownTable(results: readonly StrategyResult[], levels: readonly number[]): string {
  const hot = Math.min(...levels);
  const spread = Math.max(...levels);
  const ids = [...new Set(results.map((r) => r.id))];
  const cell = (r: StrategyResult | undefined) => (r ? `${Math.round(r.refundsPerSec)} / ${r.latency.p99.toFixed(0)}` : '-');
  const lines = [
    `| strategy | verdict | RT/request | ${hot === 1 ? '1 hot order' : `${hot} orders`}: refunds/s / p99 ms | ${spread} orders: refunds/s / p99 ms | attempts/answer (hot) |`,
    '|---|---|---|---|---|---|',
  ];
  for (const id of ids) {
    const h = results.find((r) => r.id === id && r.orders === hot);
    const s = results.find((r) => r.id === id && r.orders === spread);
    const any = h ?? s!;
    const verdicts = [...new Set([h?.verdict, s?.verdict].filter(Boolean))].join(' / ');
    const errors = Object.keys({ ...h?.errors, ...s?.errors });
    lines.push(
      `| ${any.label} | ${verdicts}${errors.length ? ` (errors: ${errors.join(', ')})` : ''} | ${(s ?? any).roundTripsPerRequest.toFixed(1)}${any.redisTripsPerRequest !== undefined ? ' + Redis' : ''} | ${cell(h)} | ${cell(s)} | ${h ? h.attemptsPerSuccess.toFixed(1) : '-'} |`,
    );
  }
  return lines.join('\n');
}

if (process.argv[2]) {
  const j = JSON.parse(readFileSync(process.argv[2], 'utf8')) as {
    environment: Environment;
    options: { orders: number[] };
    results: StrategyResult[];
    ratios: Ratio[];
    seconds: number;
  };
  const e = j.environment;
  console.log(
    `Run of ${e.date.slice(0, 10)}, ${e.machine.cpu} (${e.machine.cores} cores, ${e.machine.memoryGiB} GiB), ${e.machine.os}, Node ${e.node}, ${e.postgres.version.split(' on ')[0]} (${e.postgres.source}; fsync=${e.postgres.settings.fsync}, synchronous_commit=${e.postgres.settings.synchronous_commit}), ${j.seconds.toFixed(0)} s.\n`,
  );
  console.log(markdownTable(j.results, j.options.orders));
  console.log('\n| target | orders | value | status |\n|---|---|---|---|');
  for (const r of j.ratios.filter((x) => x.target !== undefined))
    console.log(`| ${r.label} ${targetText(r)} | ${r.orders} | ${valueText(r)} | ${r.status} |`);
}
