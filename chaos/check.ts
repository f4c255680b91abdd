// The checker: the history every worker wrote (./history.ts) against the database's final state.
// Anomalies, each a broken promise of pgcoord's:
//   over-refund        an order's refunds add up to more than its total
//   torn order         orders.refunded is not the sum of the order's refund rows
//   acked missing      an attempt was told "applied" and the request has no refund row
//   duplicate effect   a request id has more than one refund row (with or without a key)
//   replay disagrees   two attempts of one key were told different outcomes (applied / refused)
//   lost but committed a request has a refund row, yet every attempt of it was told it did not
//                      commit (ConnectionLostError "did not commit", refused, a lock timeout...)
//                      and none was left open (COMMIT_UNKNOWN, in flight at a kill, stuck)
//   wrong row          the row's order or amount is not the request's
//   phantom            a refund row of a request id nobody sent
//   untyped error      an error with no PGCOORD_ code that is not the caller's own read losing
//                      its connection (a raw driver error that pgcoord let through)
//   stuck              an attempt pending past the workers' bound (a hang)

import type { EndLine, Line, StartLine } from './history.js';

/** Errors that say nothing of the attempt committed. Any other error leaves it open. */
const NOTHING_COMMITTED = new Set([
  'APP_READ_LOST',
  'PGCOORD_ABORTED',
  'PGCOORD_CONNECTION_LOST',
  'PGCOORD_DEADLOCK',
  'PGCOORD_IDEMPOTENCY_IN_FLIGHT',
  'PGCOORD_IDEMPOTENCY_MISMATCH',
  'PGCOORD_LEASE_LOST',
  'PGCOORD_LEASE_NOT_ACQUIRED',
  'PGCOORD_LEASE_TIMEOUT',
  'PGCOORD_LOCK_NOT_ACQUIRED',
  'PGCOORD_LOCK_TIMEOUT',
  'PGCOORD_RETRY_EXHAUSTED',
  'PGCOORD_ROW_LOCKED',
  'PGCOORD_ROW_NOT_FOUND',
  'PGCOORD_VERSION_CONFLICT',
]);

export interface RefundRow {
  request_id: string;
  order_id: number;
  amount: number;
  strategy: string;
}
export interface OrderRow {
  id: number;
  total: number;
  refunded: number;
}

export interface Anomaly {
  kind: string;
  /** strategy × runner of the request, when the anomaly has one. */
  cell?: string;
  detail: string;
}

/** One line of the summary: a strategy on a runner. */
export interface Cell {
  strategy: string;
  runner: string;
  /** Attempts (retries and duplicate deliveries of a key count each). */
  ops: number;
  applied: number;
  refused: number;
  /** Of applied + refused: answered from a key's stored result. */
  replayed: number;
  /** Attempts with no end line: in flight when their process was killed. */
  open: number;
  errors: Record<string, number>;
  anomalies: number;
}

export interface CheckResult {
  requests: number;
  attempts: number;
  refundRows: number;
  cells: Cell[];
  anomalies: Anomaly[];
}

/** Judge the history against the final rows. */
export function check(lines: Line[], refunds: RefundRow[], orders: OrderRow[]): CheckResult {
  const starts = new Map<string, StartLine[]>();
  const ends = new Map<string, EndLine>(); // by `${req}#${att}`
  for (const l of lines) {
    if (l.k === 's') {
      const list = starts.get(l.req) ?? [];
      list.push(l);
      starts.set(l.req, list);
    } else ends.set(`${l.req}#${l.att}`, l);
  }
  const rowsOf = new Map<string, RefundRow[]>();
  for (const r of refunds) {
    const list = rowsOf.get(r.request_id) ?? [];
    list.push(r);
    rowsOf.set(r.request_id, list);
  }

  const cells = new Map<string, Cell>();
  const cellOf = (s: StartLine) => {
    const name = `${s.strategy} × ${s.runner}`;
    let c = cells.get(name);
    if (!c) {
      c = { strategy: s.strategy, runner: s.runner, ops: 0, applied: 0, refused: 0, replayed: 0, open: 0, errors: {}, anomalies: 0 };
      cells.set(name, c);
    }
    return c;
  };
  const anomalies: Anomaly[] = [];
  const flag = (kind: string, s: StartLine | undefined, detail: string) => {
    const cell = s ? cellOf(s) : undefined;
    if (cell) cell.anomalies++;
    anomalies.push({ kind, ...(s ? { cell: `${s.strategy} × ${s.runner}` } : {}), detail });
  };

  for (const [req, atts] of starts) {
    const first = atts[0]!;
    const rows = rowsOf.get(req) ?? [];
    let applied = false;
    let refused = false;
    let open = false; // an attempt may have committed without the caller knowing
    const told: string[] = [];
    for (const s of atts) {
      const cell = cellOf(s);
      cell.ops++;
      const e = ends.get(`${req}#${s.att}`);
      if (!e) {
        cell.open++;
        open = true;
        told.push(`#${s.att} open`);
        continue;
      }
      told.push(`#${s.att} ${e.out === 'error' ? e.code : e.out}${e.rep ? ' (replayed)' : ''}`);
      if (e.out === 'applied') {
        cell.applied++;
        applied = true;
      } else if (e.out === 'refused') {
        cell.refused++;
        refused = true;
      } else {
        const code = e.code ?? 'UNTYPED';
        const shown = code.startsWith('UNTYPED') ? 'UNTYPED' : code.replace(/^PGCOORD_/, '');
        cell.errors[shown] = (cell.errors[shown] ?? 0) + 1;
        if (code === 'STUCK') flag('stuck', s, `${req} attempt ${s.att} pending past the bound (${e.ms} ms)`);
        else if (!code.startsWith('PGCOORD_') && code !== 'APP_READ_LOST')
          flag('untyped error', s, `${req} attempt ${s.att}: ${code} ${e.msg ?? ''}`);
        if (!NOTHING_COMMITTED.has(code)) open = true;
      }
      if (e.rep && e.out !== 'error') cell.replayed++;
    }
    const story = `${req} (order ${first.order}, amount ${first.amount}): ${told.join(', ')}; ${rows.length} refund row(s)`;
    if (rows.length > 1) flag('duplicate effect', first, story);
    if (applied && rows.length === 0) flag('acked missing', first, story);
    if (applied && refused) flag('replay disagrees', first, story);
    if (rows.length > 0 && !applied && !open) flag(refused ? 'refused but committed' : 'lost but committed', first, story);
    for (const r of rows)
      if (r.order_id !== first.order || r.amount !== first.amount)
        flag('wrong row', first, `${story}: row has order ${r.order_id}, amount ${r.amount}`);
  }
  for (const req of rowsOf.keys()) if (!starts.has(req)) flag('phantom', undefined, `refund row for ${req}, which no worker sent`);

  const sums = new Map<number, number>();
  const by = new Map<number, Set<string>>(); // the strategies whose refunds an order has (one, unless mixed up)
  for (const r of refunds) {
    sums.set(r.order_id, (sums.get(r.order_id) ?? 0) + r.amount);
    by.set(r.order_id, (by.get(r.order_id) ?? new Set()).add(r.strategy));
  }
  for (const o of orders) {
    const whose = `order ${o.id} (${[...(by.get(o.id) ?? [])].join(', ') || 'no refunds'})`;
    if (o.refunded > o.total) flag('over-refund', undefined, `${whose}: refunded ${o.refunded} of ${o.total}`);
    if (o.refunded !== (sums.get(o.id) ?? 0))
      flag('torn order', undefined, `${whose}: refunded ${o.refunded}, its refund rows add up to ${sums.get(o.id) ?? 0}`);
  }

  return {
    requests: starts.size,
    attempts: [...cells.values()].reduce((n, c) => n + c.ops, 0),
    refundRows: refunds.length,
    cells: [...cells.values()],
    anomalies,
  };
}

/** The summary table, one line per strategy × runner, in the given orders. */
export function formatTable(cells: Cell[], strategies: readonly string[], runners: readonly string[]): string {
  const rank = (list: readonly string[], x: string) => (list.indexOf(x) + 1 || list.length + 1) * 1;
  const sorted = [...cells].sort(
    (a, b) => rank(strategies, a.strategy) - rank(strategies, b.strategy) || rank(runners, a.runner) - rank(runners, b.runner),
  );
  const head = ['strategy', 'runner', 'ops', 'applied', 'refused', 'replayed', 'open', 'errors by code', 'anomalies'];
  const rows = sorted.map((c) => [
    c.strategy,
    c.runner,
    String(c.ops),
    String(c.applied),
    String(c.refused),
    String(c.replayed),
    String(c.open),
    Object.entries(c.errors)
      .sort((a, b) => b[1] - a[1])
      .map(([code, n]) => `${code} ${n}`)
      .join(', ') || '-',
    String(c.anomalies),
  ]);
  const total = (f: (c: Cell) => number) => String(cells.reduce((n, c) => n + f(c), 0));
  const errors = cells.reduce((n, c) => n + Object.values(c.errors).reduce((a, b) => a + b, 0), 0);
  rows.push([
    'total',
    '',
    total((c) => c.ops),
    total((c) => c.applied),
    total((c) => c.refused),
    total((c) => c.replayed),
    total((c) => c.open),
    `${errors} errors`,
    total((c) => c.anomalies),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const numeric = new Set([2, 3, 4, 5, 6, 8]);
  const fmt = (r: string[]) =>
    r
      .map((v, i) => (numeric.has(i) ? v.padStart(widths[i]!) : v.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  const rule = widths.map((w) => '-'.repeat(w)).join('  ');
  return [fmt(head), rule, ...rows.slice(0, -1).map(fmt), rule, fmt(rows.at(-1)!)].join('\n');
}
