// The refund storm: a seeded stream of refund requests racing on a set of orders, the simulated
// payment gateway, the fresh table state each strategy starts from, and the correctness audit.
import type postgres from 'postgres';
import { SCHEMA } from './sql.js';

/** One refund request as a client sends it. A duplicate delivery reuses `requestId`. */
export interface RefundRequest {
  requestId: string;
  orderId: number;
  amount: number;
  /** True for the second delivery of the same request (a retrying client). */
  duplicate: boolean;
}

/** The knobs of one scenario (one contention level). */
export interface Scenario {
  /** Number of orders the requests spread over: 1 = one hot order. */
  orders: number;
  /** Unique refund requests (duplicates come on top). */
  requests: number;
  clients: number;
  /** Simulated gateway latency in ms (0 = no wait at all). */
  gatewayMs: number;
  /** Fraction of requests delivered twice. */
  duplicates: number;
  /** Stop a strategy after this many seconds even if requests are left. */
  maxSeconds: number;
  seed: number;
}

/** The requests and the order totals of a scenario; the same for every strategy of a run. */
export interface Workload {
  scenario: Scenario;
  requests: RefundRequest[];
  /** Requests used to warm connections and prepared statements before the measured run. */
  warmup: RefundRequest[];
  totals: Map<number, number>;
}

/** mulberry32: a tiny seeded PRNG, so a seed gives the same stream on every machine. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Largest single refund amount (amounts are uniform in 1..MAX_AMOUNT). */
export const MAX_AMOUNT = 100;

/** Share of the requested money an order can actually refund: the last ~10 % must be refused. */
const SUPPLY = 0.9;

/**
 * Build the request stream of a scenario. Each order's total is 90 % of the money its unique
 * requests ask for (but at least its largest request), so every busy order runs dry near the end
 * and a strategy whose check races pays out more than the total. Duplicates are inserted a few
 * places after the original, so the two deliveries are in flight at the same time.
 */
export function makeWorkload(scenario: Scenario): Workload {
  const random = rng(scenario.seed * 7919 + scenario.orders);
  const unique: RefundRequest[] = [];
  const demand = new Map<number, { sum: number; max: number }>();
  for (let i = 0; i < scenario.requests; i++) {
    const orderId = 1 + Math.floor(random() * scenario.orders);
    const amount = 1 + Math.floor(random() * MAX_AMOUNT);
    unique.push({ requestId: `r${scenario.seed}-${i}`, orderId, amount, duplicate: false });
    const d = demand.get(orderId) ?? { sum: 0, max: 0 };
    d.sum += amount;
    d.max = Math.max(d.max, amount);
    demand.set(orderId, d);
  }
  const requests: RefundRequest[] = [];
  const later = new Map<number, RefundRequest[]>();
  unique.forEach((r, i) => {
    requests.push(r, ...(later.get(i) ?? []));
    later.delete(i);
    if (random() < scenario.duplicates) {
      const at = i + 1 + Math.floor(random() * scenario.clients);
      later.set(at, [...(later.get(at) ?? []), { ...r, duplicate: true }]);
    }
  });
  for (const rest of later.values()) requests.push(...rest);
  const totals = new Map<number, number>();
  for (let id = 1; id <= scenario.orders; id++) {
    const d = demand.get(id);
    totals.set(id, d ? Math.max(d.max, Math.floor(d.sum * SUPPLY)) : MAX_AMOUNT);
  }
  const warmup = Array.from({ length: 2 * scenario.clients }, (_, i) => ({
    requestId: `w${i}`,
    orderId: 1 + (i % scenario.orders),
    amount: 1,
    duplicate: false,
  }));
  return { scenario, requests, warmup, totals };
}

/** Create the tables (idempotent). */
export async function createSchema(sql: postgres.Sql): Promise<void> {
  await sql.unsafe(SCHEMA);
}

/**
 * Give a strategy a fresh table state: no refunds, no keys, every order back to its total.
 * `analyze` refreshes the planner's statistics (once per level is enough: the rows are the same).
 */
export async function resetTables(sql: postgres.Sql, totals: Map<number, number>, analyze = false): Promise<void> {
  await sql.unsafe('truncate orders, refunds, idempotency_keys restart identity');
  // pgcoord's own idempotency table, when its migration ran (see run.ts)
  const [pg] = await sql.unsafe<{ t: string | null }[]>("select to_regclass('pgcoord.idempotency_keys')::text as t");
  if (pg?.t) await sql.unsafe('truncate pgcoord.idempotency_keys');
  const ids = [...totals.keys()];
  await sql.unsafe('insert into orders (id, total) select * from unnest($1::int[], $2::int[])', [
    `{${ids.join(',')}}`,
    `{${ids.map((id) => totals.get(id)).join(',')}}`,
  ]);
  if (analyze) await sql.unsafe('analyze orders');
}

/** One payment-gateway call as the gateway saw it. */
export interface GatewayCall {
  requestId: string;
  orderId: number;
  amount: number;
}

/** The simulated payment gateway: records every call (money out) and waits its latency. */
export class Gateway {
  readonly calls: GatewayCall[] = [];
  constructor(readonly latencyMs: number) {}

  /** Pay a refund out. With latency 0 it returns without yielding to the event loop. */
  async pay(req: RefundRequest): Promise<void> {
    this.calls.push({ requestId: req.requestId, orderId: req.orderId, amount: req.amount });
    if (this.latencyMs > 0) await new Promise((r) => setTimeout(r, this.latencyMs));
  }

  /** Calls for a request id already paid (a duplicate delivery paid twice). */
  duplicates(): number {
    const seen = new Set<string>();
    let dup = 0;
    for (const c of this.calls) {
      if (seen.has(c.requestId)) dup++;
      else seen.add(c.requestId);
    }
    return dup;
  }

  reset(): void {
    this.calls.length = 0;
  }
}

/** The correctness columns of one strategy run. */
export interface Audit {
  /** Money paid beyond order totals (the larger of what the gateway paid and what the refunds table holds). */
  overRefund: number;
  /** Orders whose refunds exceed their total. */
  ordersOver: number;
  /** Gateway calls for a request id that was already paid. */
  duplicateCalls: number;
  /** Refunds the client was told succeeded but that are not in the refunds table. */
  ackedMissing: number;
  /** Rows in the refunds table. */
  refundRows: number;
}

function excess(paid: Map<number, number>, totals: Map<number, number>): { money: number; orders: number } {
  let money = 0;
  let orders = 0;
  for (const [id, sum] of paid) {
    const over = sum - (totals.get(id) ?? 0);
    if (over > 0) {
      money += over;
      orders++;
    }
  }
  return { money, orders };
}

/**
 * Check the outcome of a run against the database: money beyond totals (by the refunds table and
 * by the gateway log), duplicate gateway calls, and every acknowledged refund id present in the
 * refunds table.
 */
export async function audit(
  sql: postgres.Sql,
  totals: Map<number, number>,
  gateway: Gateway | undefined,
  acked: Set<string>,
): Promise<Audit> {
  const rows = await sql.unsafe<{ order_id: number; sum: number; n: number }[]>(
    'select order_id, sum(amount)::int as sum, count(*)::int as n from refunds group by order_id',
  );
  const inDb = new Map(rows.map((r) => [r.order_id, r.sum]));
  const byDb = excess(inDb, totals);
  const paid = new Map<number, number>();
  for (const c of gateway?.calls ?? []) paid.set(c.orderId, (paid.get(c.orderId) ?? 0) + c.amount);
  const byGateway = excess(paid, totals);
  const ids = [...acked];
  const found = ids.length
    ? await sql.unsafe<{ n: number }[]>('select count(distinct request_id)::int as n from refunds where request_id = any($1::text[])', [
        ids,
      ])
    : [{ n: 0 }];
  return {
    overRefund: Math.max(byDb.money, byGateway.money),
    ordersOver: Math.max(byDb.orders, byGateway.orders),
    duplicateCalls: gateway?.duplicates() ?? 0,
    ackedMissing: ids.length - (found[0]?.n ?? 0),
    refundRows: rows.reduce((s, r) => s + r.n, 0),
  };
}
