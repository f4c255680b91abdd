// Clock skew (issue #19): app servers whose wall clocks are minutes apart change no lease, rate-limit
// or retention decision, because the database clock decides every expiry. Each scenario races OS
// processes whose clocks are off by −10 min, 0 and +10 min (./fixtures/skew-clock.mjs, preloaded:
// Date.now(), new Date(), Date(), Intl.DateTimeFormat and performance.timeOrigin) on the same keys
// of one real PostgreSQL. Every process first checks that its clock really is off by its skew
// against the database's (./fixtures/skew-common.ts), and this file checks the offsets it reports.
// The verdicts come from the history the database recorded (audit triggers on pgcoord's tables and
// the fixtures' own rows, all stamped with clock_timestamp() or statement_timestamp()), not from
// what the processes say.
//
// The monotonic clocks (performance.now(), timers) are not skewed: they are not wall clocks, and
// pgcoord uses them only for local windows (a lease's trust window counted from when its statement
// was sent, a wait's deadline), never to decide an expiry.
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { migrate as migrateIdempotency } from '../src/idempotency/migrate.js';
import { idempotent } from '../src/idempotency/run.js';
import { migrateLeases } from '../src/lease/migrate.js';
import { migrateLimits } from '../src/limit/migrate.js';
import { bundleFixtures } from './fixtures/bundle.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(2);
await migrateLeases(db.sql);
await migrateLimits(db.sql);
await migrateIdempotency(db.sql);

const MIN = 60_000;
const SKEWS = [-10 * MIN, 0, 10 * MIN];
const app = `current_setting('application_name')`;

// Every state of every lease row (leases, permits, the leader's and the flight's), and of every
// single-flight value, and every allowed rate-limit decision, and every change of an idempotency
// row: written by the database in the statement that made it.
await db.sql.unsafe(`
create table lease_audit (seq bigserial primary key, name text not null, fence bigint not null, holder uuid,
  acquired_at timestamptz not null, expires_at timestamptz not null, app text not null default ${app});
create function lease_audit() returns trigger language plpgsql as $$ begin
  insert into lease_audit (name, fence, holder, acquired_at, expires_at) values (new.name, new.fence, new.holder, new.acquired_at, new.expires_at);
  return null; end $$;
create trigger lease_audit after insert or update on pgcoord.leases for each row execute function lease_audit();
create table fenced_log (id bigserial primary key, name text not null, fence bigint not null, pid int not null, skew int not null,
  started timestamptz not null, ended timestamptz);
create table flight_log (id bigserial primary key, pid int not null, skew int not null, at timestamptz not null);
create table flight_audit (seq bigserial primary key, fence bigint not null, computed_at timestamptz not null, fresh_until timestamptz not null);
create function flight_audit() returns trigger language plpgsql as $$ begin
  insert into flight_audit (fence, computed_at, fresh_until) values (new.fence, new.computed_at, new.fresh_until);
  return null; end $$;
create trigger flight_audit after insert or update on pgcoord.flight_values for each row execute function flight_audit();
create table rate_log (seq bigserial primary key, key text not null, st timestamptz not null default statement_timestamp(),
  ct timestamptz not null default clock_timestamp(), tat timestamptz not null, app text not null default ${app});
create function rate_log() returns trigger language plpgsql as $$ begin
  insert into rate_log (key, tat) values (new.key, new.tat); return null; end $$;
create trigger rate_log after insert or update on pgcoord.rate_limits for each row execute function rate_log();
create table idem_audit (seq bigserial primary key, op text not null, key text not null, state text, expires_at timestamptz not null,
  body text, ct timestamptz not null default clock_timestamp(), app text not null default ${app});
create function idem_audit() returns trigger language plpgsql as $$ begin
  if tg_op = 'DELETE' then insert into idem_audit (op, key, state, expires_at) values (tg_op, old.key, old.state, old.expires_at);
  else insert into idem_audit (op, key, state, expires_at, body)
    values (tg_op, new.key, new.state, new.expires_at, convert_from(new.response_body, 'UTF8'));
  end if; return null; end $$;
create trigger idem_audit after insert or update or delete on pgcoord.idempotency_keys for each row execute function idem_audit();
create table idem_runs (call_id uuid primary key, key text not null, pid int not null, skew int not null, at timestamptz not null);
create table idem_calls (call_id uuid primary key, key text not null, pid int not null, skew int not null,
  t0 timestamptz not null, t1 timestamptz not null, replayed boolean not null, stored_call uuid not null);
create table idem_purges (pid int not null, skew int not null, t0 timestamptz not null, t1 timestamptz not null, deleted int not null);
`);

// The fixtures bundled once (test/fixtures/bundle.ts: tsx start-ups are slow on 2 cores).
const fixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url));
const bundle = await bundleFixtures('clock-skew', ['skew-lease', 'skew-limit', 'skew-idempotency']);
afterAll(() => bundle.remove());
const preload = pathToFileURL(fixture('skew-clock.mjs')).href;

const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of live) c.kill('SIGKILL');
});
afterAll(() => {
  for (const c of live) {
    c.kill('SIGCONT');
    c.kill('SIGKILL');
  }
});

type Ev = { ev: string; pid: number } & Record<string, unknown>;
interface Child {
  child: ChildProcess;
  skewMs: number;
  events: Ev[];
  /** Resolves with the `done` event; rejects when the process fails, or after `timeoutMs`. */
  done: Promise<Ev>;
  ready: Promise<Ev>;
}

/** Start a bundled fixture with its wall clock off by `skewMs`. */
function start(script: string, skewMs: number, config: object, timeoutMs = 40_000): Child {
  const child = spawn(process.execPath, ['--import', preload, bundle.script(script), JSON.stringify({ url: db.url, skewMs, ...config })], {
    env: { ...process.env, PGCOORD_FAKE_SKEW_MS: String(skewMs) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  const events: Ev[] = [];
  let out = '';
  let err = '';
  const seen = (ev: string) =>
    new Promise<Ev>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`${script} (skew ${skewMs}) gave no ${ev} within ${timeoutMs} ms: ${err}`));
      }, timeoutMs);
      const check = () => {
        const found = events.find((e) => e.ev === ev);
        if (found) {
          clearTimeout(timer);
          resolve(found);
        }
      };
      child.stdout!.on('data', check);
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        check();
        reject(new Error(`${script} (skew ${skewMs}) exited ${code ?? signal} before ${ev}: ${err}`));
      });
    });
  child.stdout!.on('data', (d) => {
    out += d;
    for (let i = out.indexOf('\n'); i >= 0; i = out.indexOf('\n')) {
      const line = out.slice(0, i);
      out = out.slice(i + 1);
      if (line.startsWith('{')) events.push(JSON.parse(line) as Ev);
    }
  });
  child.stderr!.on('data', (d) => {
    err += d;
  });
  child.once('exit', () => live.delete(child));
  // (after the line parser: a chunk is parsed before seen() looks at the events)
  const ready = seen('ready');
  const done = seen('done');
  ready.catch(() => {});
  done.catch(() => {});
  return { child, skewMs, events, ready, done };
}

// The database clock minus this process's wall clock (same method as the fixtures').
async function ownOffset(): Promise<number> {
  const before = Date.now();
  const [row] = await db.sql`select (extract(epoch from clock_timestamp()) * 1000)::float8 as db`;
  return (before + Date.now()) / 2 - Number(row?.db);
}

/** Every child's wall clock is off the database's by its skew (relative to ours: the host may be off too). */
async function expectSkewed(children: Child[]): Promise<void> {
  const ours = await ownOffset();
  for (const c of children) {
    const offsets = (await c.ready).offsets as Record<string, number>;
    for (const [clock, off] of Object.entries(offsets)) {
      expect(Math.abs(off - ours - c.skewMs), `${clock} of the ${c.skewMs} ms process is ${off} ms off`).toBeLessThan(2000);
    }
  }
}

const skewOf = (label: string) => Number(label.split(':')[1]);
const ms = (v: unknown) => Number(v); // epoch ms (float8 from the database)

describe('clock skew: leases, permits, leader election and single-flight', () => {
  it('processes at −10 min, 0 and +10 min: takeovers only after the term ended on the database clock, fences grow, fenced writes never overlap', async () => {
    const RUN_MS = 9000;
    const TTL = 500;
    const drivers = ['pgjs', 'pg', 'pgjs'];
    const children = SKEWS.map((skewMs, i) => start('skew-lease', skewMs, { driver: drivers[i], runMs: RUN_MS }));
    await Promise.all(children.map((c) => c.ready));
    await expectSkewed(children);

    // Pause the leader's process past its TTL twice: its leader term (and whatever else it holds)
    // can end only by expiry, and a process with another clock takes over.
    const pauses: { skewMs: number }[] = [];
    const began = Date.now();
    for (const at of [2500, 5500]) {
      await sleep(Math.max(0, began + at - Date.now()));
      const [held] = await db.sql`select holder_label from pgcoord.leases where name = 'skew:leader' and expires_at > clock_timestamp()`;
      const pid = held ? Number(String(held.holder_label).split(':')[2]) : undefined;
      const victim = children.find((c) => c.child.pid === pid);
      if (!victim) continue;
      victim.child.kill('SIGSTOP');
      await sleep(3 * TTL);
      victim.child.kill('SIGCONT');
      pauses.push({ skewMs: victim.skewMs });
    }
    const done = await Promise.all(children.map((c) => c.done));
    for (const d of done) expect(d.errors, `errors of process ${d.pid}`).toEqual([]);
    const stats = done.map(({ ev, errors, ...s }) => s);

    // The terms of each name, in the order the database granted them (the audit's sequence is
    // drawn under the lease row's lock): first state = acquisition, last state = how it ended.
    const audit = await db.sql`select seq, name, fence::text as fence, holder is null as released, app,
        extract(epoch from acquired_at) * 1000 as acquired, extract(epoch from expires_at) * 1000 as expires
      from lease_audit order by seq`;
    type Term = { name: string; fence: bigint; skew: number; acquired: number; end: number; released: boolean };
    const terms = new Map<string, Term[]>();
    const byFence = new Map<string, Term>();
    for (const r of audit) {
      const key = `${r.name}/${r.fence}`;
      let t = byFence.get(key);
      if (!t) {
        t = { name: r.name, fence: BigInt(r.fence), skew: skewOf(r.app), acquired: ms(r.acquired), end: 0, released: false };
        byFence.set(key, t);
        terms.set(r.name, [...(terms.get(r.name) ?? []), t]);
      }
      t.end = ms(r.expires);
      t.released = r.released;
    }
    const fences = [...byFence.values()].map((t) => t.fence);
    expect(new Set(fences).size).toBe(fences.length); // every fence handed out once

    const expiredTakeovers: { name: string; from: number; to: number; delayMs: number }[] = [];
    let takeovers = 0;
    for (const [name, list] of terms) {
      for (let i = 1; i < list.length; i++) {
        const prev = list[i - 1] as Term;
        const next = list[i] as Term;
        expect(next.fence, `${name}: fences grow`).toBeGreaterThan(prev.fence);
        // the next term began no earlier than the previous one ended, on the database clock
        expect(
          next.acquired,
          `${name}: fence ${next.fence} (skew ${next.skew}) took over fence ${prev.fence} (skew ${prev.skew})`,
        ).toBeGreaterThanOrEqual(prev.end);
        takeovers++;
        if (!prev.released) expiredTakeovers.push({ name, from: prev.skew, to: next.skew, delayMs: next.acquired - prev.end });
      }
    }

    // Fenced writes: each inside its own term (began after it was granted and, for a term that
    // expired, before it expired), and over before the next term of the name began (so no two
    // terms' writes overlap).
    const writes = await db.sql`select name, fence::text as fence, pid, extract(epoch from started) * 1000 as started,
        extract(epoch from ended) * 1000 as ended from fenced_log order by started`;
    for (const w of writes) {
      const list = terms.get(w.name) ?? [];
      const i = list.findIndex((t) => t.fence === BigInt(w.fence));
      const term = list[i];
      expect(term, `write of ${w.name} fence ${w.fence} has a term`).toBeDefined();
      expect(ms(w.started)).toBeGreaterThanOrEqual((term as Term).acquired);
      // (a term that expired: while it was unexpired. A released one's end is the release's
      // clock_timestamp(), read before the release waited for the fenced transaction's share lock:
      // a write may look later than that, and still ends before the next term begins, below)
      if (!(term as Term).released)
        expect(ms(w.started), `write of ${w.name} fence ${w.fence} began before its term expired`).toBeLessThan((term as Term).end);
      const next = list[i + 1];
      if (next)
        expect(ms(w.ended), `write of ${w.name} fence ${w.fence} ended before fence ${next.fence} began`).toBeLessThanOrEqual(
          next.acquired,
        );
    }
    // the semaphore: never more than 2 at work, from the resource's own records
    const edges = writes
      .filter((w) => w.name.startsWith('semaphore'))
      .flatMap((w) => [
        { t: ms(w.started), d: 1 },
        { t: ms(w.ended), d: -1 },
      ])
      .sort((a, b) => a.t - b.t || a.d - b.d);
    let atOnce = 0;
    let mostAtOnce = 0;
    for (const e of edges) {
      atOnce += e.d;
      mostAtOnce = Math.max(mostAtOnce, atOnce);
    }
    expect(mostAtOnce).toBeLessThanOrEqual(2);

    // Single-flight: a computation runs only once every stored value has gone stale on the
    // database clock (a process that trusted its own clock would recompute fresh values, or serve
    // stale ones for minutes).
    const stores =
      await db.sql`select extract(epoch from computed_at) * 1000 as at, extract(epoch from fresh_until) * 1000 as until from flight_audit order by seq`;
    const computations = await db.sql`select skew, extract(epoch from at) * 1000 as at from flight_log order by at`;
    for (const c of computations) {
      const freshUntil = Math.max(0, ...stores.filter((s) => ms(s.at) < ms(c.at)).map((s) => ms(s.until)));
      expect(ms(c.at), 'a computation while a stored value was fresh').toBeGreaterThanOrEqual(freshUntil);
    }

    const delays = expiredTakeovers.map((t) => t.delayMs).sort((a, b) => a - b);
    const median = delays[Math.floor(delays.length / 2)] ?? Number.NaN;
    const pairs = new Map<string, number>();
    for (const t of expiredTakeovers) pairs.set(`${t.from / MIN}→${t.to / MIN}`, (pairs.get(`${t.from / MIN}→${t.to / MIN}`) ?? 0) + 1);
    console.log(
      `clock skew, leases: ${takeovers} takeovers, ${expiredTakeovers.length} after an expiry (delay after the end: median ${Math.round(median)} ms, max ${Math.round(delays.at(-1) ?? 0)} ms; from→to skew in min: ${JSON.stringify(Object.fromEntries(pairs))}); ${writes.length} fenced writes; ${computations.length} flight computations; leader paused: ${JSON.stringify(pauses)}; ${JSON.stringify(stats)}`,
    );

    // Not vacuous, and not starved: terms of every skew taken over by processes whose clocks are
    // ahead and behind, soon after they expired, the leader's among them; the zombies refused.
    expect(expiredTakeovers.some((t) => t.from < t.to)).toBe(true);
    expect(expiredTakeovers.some((t) => t.from > t.to)).toBe(true);
    expect(median).toBeLessThan(600); // ms, not the minutes a process trusting its own clock would wait
    expect(terms.get('skew:leader')?.length ?? 0).toBeGreaterThanOrEqual(4);
    expect(computations.length).toBeGreaterThanOrEqual(RUN_MS / 1000);
    for (const s of stats) expect((s.zombies as { accepted: number }).accepted).toBe(0);
    expect(stats.reduce((n, s) => n + (s.zombies as { refused: number }).refused, 0)).toBeGreaterThan(0);
  }, 60_000);
});

describe('clock skew: rate limits', () => {
  it('processes at −10 min, 0 and +10 min share one quota: never exceeded in any window of the database clock, and used', async () => {
    const RUN_MS = 6000;
    const rate = 20;
    const per = 1000;
    const drivers = ['pg', 'pgjs', 'pg'];
    const children = SKEWS.map((skewMs, i) => start('skew-limit', skewMs, { driver: drivers[i], runMs: RUN_MS, rate, per }));
    await Promise.all(children.map((c) => c.ready));
    await expectSkewed(children);
    const done = await Promise.all(children.map((c) => c.done));
    for (const d of done) expect(d.errors).toEqual([]);

    const allowed =
      await db.sql`select app, extract(epoch from st) * 1000 as st, extract(epoch from ct) * 1000 as ct from rate_log order by seq`;
    expect(allowed.length).toBe(done.reduce((n, d) => n + (d.allowed as number), 0));
    // In the order the database decided (under the key's row lock), each allowed decision came at
    // least one emission interval after the one before, by the time its statement arrived.
    const T = per / rate;
    for (let i = 1; i < allowed.length; i++) expect(ms(allowed[i]?.st) - ms(allowed[i - 1]?.st)).toBeGreaterThanOrEqual(T - 0.001);
    const most = (times: number[]) => {
      const sorted = [...times].sort((a, b) => a - b);
      let best = 0;
      for (let i = 0, j = 0; i < sorted.length; i++) {
        while ((sorted[i] as number) - (sorted[j] as number) >= per) j++;
        best = Math.max(best, i - j + 1);
      }
      return best;
    };
    const byStatement = most(allowed.map((r) => ms(r.st)));
    const byClock = most(allowed.map((r) => ms(r.ct)));
    const span = ms(allowed.at(-1)?.st) - ms(allowed[0]?.st);
    const utilisation = allowed.length / (span / T + 1);
    const shares = SKEWS.map((s) => allowed.filter((r) => skewOf(r.app) === s).length / allowed.length);
    console.log(
      `clock skew, rate limit: ${allowed.length} allowed in ${Math.round(span)} ms; most in any ${per} ms window: ${byStatement} by statement time, ${byClock} by commit-side clock_timestamp() (quota ${rate}); utilisation ${(100 * utilisation).toFixed(1)} %; shares by skew ${shares.map((s) => (100 * s).toFixed(0)).join('/')} %`,
    );
    expect(byStatement).toBeLessThanOrEqual(rate);
    // the row's clock_timestamp() is read a moment after the statement's: a slow statement may
    // bunch two neighbours by that moment, never by a whole interval
    expect(byClock).toBeLessThanOrEqual(rate + 1);
    expect(utilisation).toBeGreaterThan(0.7);
    for (const s of shares) expect(s).toBeGreaterThan(0.15);
  }, 60_000);
});

describe('clock skew: idempotency retention and purge', () => {
  it('processes at −10 min, 0 and +10 min: a stored result is replayed exactly while the database clock says it is retained; purge removes only what expired', async () => {
    const RUN_MS = 5000;
    const SHORT = 1200;
    const LONG = 5 * MIN; // shorter than the skew: a +10 min clock would see it expired, a −10 min one 15 min ahead
    const keys = [
      ...['short-0', 'short-1', 'short-2'].map((key) => ({ key, retentionMs: SHORT })),
      ...['long-0', 'long-1'].map((key) => ({ key, retentionMs: LONG })),
    ];
    const retention = new Map(keys.map((k) => [k.key, k.retentionMs]));
    const drivers = ['pgjs', 'pg', 'pgjs'];
    const children = SKEWS.map((skewMs, i) => start('skew-idempotency', skewMs, { driver: drivers[i], runMs: RUN_MS, mode: 'race', keys }));
    await Promise.all(children.map((c) => c.ready));
    await expectSkewed(children);
    const done = await Promise.all(children.map((c) => c.done));

    // Each stored result: retained from when it completed, on the database clock.
    const completions = await db.sql`select key, body, extract(epoch from expires_at) * 1000 as expires, extract(epoch from ct) * 1000 as at
      from idem_audit where op = 'UPDATE' and state = 'completed' order by seq`;
    type Gen = { key: string; callId: string; completed: number; expires: number };
    const gens = new Map<string, Gen>();
    for (const r of completions) {
      const left = ms(r.expires) - ms(r.at);
      const R = retention.get(r.key) as number;
      expect(left, `${r.key}: retained ${left} ms from completion, ${R} asked`).toBeLessThanOrEqual(R);
      expect(left).toBeGreaterThan(R - 200);
      const callId = (JSON.parse(r.body) as { callId: string }).callId;
      gens.set(callId, { key: r.key, callId, completed: ms(r.at), expires: ms(r.expires) });
    }
    const calls = await db.sql`select c.call_id, c.key, c.skew, c.replayed, c.stored_call, extract(epoch from c.t0) * 1000 as t0,
        extract(epoch from c.t1) * 1000 as t1, r.skew as stored_skew, extract(epoch from run.at) * 1000 as ran
      from idem_calls c join idem_runs r on r.call_id = c.stored_call left join idem_runs run on run.call_id = c.call_id order by c.t0`;
    expect(calls.length).toBe(done.reduce((n, d) => n + (d.calls as number), 0));
    const crossReplays = new Set<string>();
    let reruns = 0;
    let lateReplays = 0;
    for (const c of calls) {
      const gen = gens.get(c.stored_call);
      expect(gen, `call ${c.call_id} got a stored result`).toBeDefined();
      const g = gen as Gen;
      if (c.replayed) {
        // not kept late: the call began before that result expired; and it had completed by its end
        expect(g.completed).toBeLessThanOrEqual(ms(c.t1));
        // never a result that had expired before the call began (see the last test of this file)
        if (ms(c.t0) >= g.expires) lateReplays++;
        if (c.skew !== c.stored_skew) crossReplays.add(`${c.stored_skew / MIN}→${c.skew / MIN}`);
      } else {
        expect(c.stored_call).toBe(c.call_id);
        // not expired early: no result of this key completed before the call began and was still
        // retained when it ended; and its handler ran only after every earlier result expired
        for (const other of gens.values()) {
          if (other.key !== c.key || other.callId === c.call_id) continue;
          expect(other.completed < ms(c.t0) && other.expires > ms(c.t1), `${c.key}: ran again while ${other.callId} was retained`).toBe(
            false,
          );
          if (other.completed < ms(c.ran)) expect(ms(c.ran)).toBeGreaterThanOrEqual(other.expires);
        }
        if (retention.get(c.key) === SHORT && [...gens.values()].some((o) => o.key === c.key && o.completed < ms(c.t0))) reruns++;
      }
    }
    console.log(
      `clock skew, idempotency: ${calls.length} calls, ${calls.filter((c) => c.replayed).length} replayed, ${gens.size} results stored, ${reruns} re-runs after retention, ${lateReplays} expired results replayed; replays across skews (stored→replayed, min): ${[...crossReplays].sort().join(' ')}`,
    );
    expect(lateReplays, 'results replayed after they had expired').toBe(0);
    // results stored by one skew are replayed by another (which directions: the race decides)
    expect(crossReplays.size, [...crossReplays].join(' ')).toBeGreaterThanOrEqual(2);
    expect(reruns).toBeGreaterThan(0);
    for (const k of keys.filter((k) => k.retentionMs === LONG)) expect([...gens.values()].filter((g) => g.key === k.key)).toHaveLength(1);

    // Purge, from the −10 min and the +10 min processes at once, once the short results expired:
    // only rows past expires_at on the database clock go, every one of them goes.
    await sleep(SHORT + 100);
    const purgers = [SKEWS[0], SKEWS[2]].map((skewMs) =>
      start('skew-idempotency', skewMs as number, { driver: 'pg', runMs: 0, mode: 'purge', keys }),
    );
    await Promise.all(purgers.map((c) => c.ready));
    await expectSkewed(purgers);
    await Promise.all(purgers.map((c) => c.done));
    const deleted =
      await db.sql`select key, extract(epoch from expires_at) * 1000 as expires, extract(epoch from ct) * 1000 as at from idem_audit where op = 'DELETE'`;
    for (const d of deleted) expect(ms(d.expires), `${d.key} purged before it expired`).toBeLessThanOrEqual(ms(d.at));
    expect(deleted.map((d) => d.key).sort()).toEqual(['short-0', 'short-1', 'short-2']);
    const [{ begun }] = (await db.sql`select extract(epoch from max(t0)) * 1000 as begun from idem_purges`) as unknown as [
      { begun: number },
    ];
    const left = await db.sql`select key, extract(epoch from expires_at) * 1000 as expires from pgcoord.idempotency_keys order by key`;
    expect(left.map((r) => r.key)).toEqual(['long-0', 'long-1']);
    for (const r of left) expect(ms(r.expires)).toBeGreaterThan(ms(begun));
  }, 60_000);
});

describe('an expired key taken over while another call waits for it', () => {
  it('the waiting call never replays the expired result: it gets the new one (or runs after it)', async () => {
    // Found by the retention race above: the claim's second branch reads with the statement's
    // snapshot, so a call C whose INSERT waited for a concurrent takeover D of an expired key saw
    // the expired, completed row as it was when C began, and replayed it. The second branch now
    // answers nothing for a row past its retention: C claims again and sees D's attempt.
    const sql = db.newSql({ max: 4 });
    const watch = db.newSql({ max: 1 });
    const expiredReplays: string[] = [];
    let raced = 0;
    for (let i = 0; i < 5; i++) {
      const options = { scope: 'known-bug', key: `k${i}`, request: 1, retentionMs: 100 };
      await idempotent(sql, options, () => 'expired');
      await sleep(150); // past its retention on the database clock
      let entered!: () => void;
      let finish!: () => void;
      const inside = new Promise<void>((r) => {
        entered = r;
      });
      const release = new Promise<void>((r) => {
        finish = r;
      });
      const d = idempotent(sql, options, async () => {
        entered();
        await release;
        return 'new';
      });
      await inside; // D took the key over and holds its row lock, uncommitted
      const c = idempotent(sql, options, () => 'third');
      for (let t = 0; t < 40; t += 2) {
        const waiting = await watch`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`;
        if (waiting.length > 0) {
          raced++;
          break; // C's claim waits for D's row lock (for 50 ms at most)
        }
        await sleep(2);
      }
      finish();
      const [, got] = await Promise.all([d, c]);
      if (got.replayed && got.value === 'expired') expiredReplays.push(options.key);
    }
    expect(raced, 'the waiting call was seen waiting for the takeover').toBeGreaterThan(0);
    expect(expiredReplays, 'expired results replayed').toEqual([]);
  });
});
