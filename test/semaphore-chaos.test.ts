// The semaphore across 8 OS processes with faults: holders SIGKILLed (and replaced), paused past
// their TTL, their backends terminated. The protected resource is a table written only in
// transactions fenced by the permit: from its own records (start and end of each piece of work,
// on the database clock) no two holders of one permit ever overlap, so never more than N work at
// once. PGCOORD_CHAOS_SECONDS sets the run time (default 10).
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { migrateLeases } from '../src/index.js';
import { sleep, useTestDb } from './helpers.js';

const db = await useTestDb(2);
await migrateLeases(db.sql);
await db.sql`create table work_log (id bigserial primary key, slot text not null, fence bigint not null, pid int not null, started timestamptz not null, ended timestamptz)`;
const RUN_MS = Math.max(6, Number(process.env.PGCOORD_CHAOS_SECONDS ?? 10)) * 1000;
const worker = fileURLToPath(new URL('./fixtures/permit-worker.ts', import.meta.url));

describe('semaphore under faults', () => {
  it('8 processes on 3 permits, killed, paused and cut off: never more than 3 at work, per the resource', async () => {
    const children = new Set<ChildProcess>();
    const results: { works: number; refused: number; lost: number }[] = [];
    const start = (i: number, ms: number) => {
      const child = spawn(process.execPath, ['--import', 'tsx', worker, db.url, i % 2 ? 'pg' : 'pgjs', String(ms)], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      children.add(child);
      let out = '';
      child.stdout?.on('data', (d) => {
        out += d;
      });
      child.on('exit', (code) => {
        children.delete(child);
        if (code === 0) results.push(JSON.parse(out.trim().split('\n').pop() as string));
      });
      return child;
    };
    const faults = { killed: 0, paused: 0, cut: 0 };
    try {
      const began = Date.now();
      for (let i = 0; i < 8; i++) start(i, RUN_MS);
      await sleep(1500);
      for (let round = 0; Date.now() - began < RUN_MS - 1500; round++) {
        const list = [...children];
        const victim = list[round % list.length];
        if (victim?.pid) {
          if (round % 3 === 0) {
            victim.kill('SIGKILL');
            faults.killed++;
            start(round, Math.max(2000, RUN_MS - (Date.now() - began)));
          } else if (round % 3 === 1) {
            victim.kill('SIGSTOP');
            faults.paused++;
            await sleep(700); // past the 400 ms TTL: its permits go to others
            victim.kill('SIGCONT');
          } else {
            const cut = await db.sql`select pg_terminate_backend(pid) from pg_stat_activity
              where datname = current_database() and application_name = 'permit-worker' order by state = 'idle' limit 1`;
            faults.cut += cut.length;
          }
        }
        await sleep(400);
      }
      while (children.size > 0) await sleep(100);
    } finally {
      for (const c of children) c.kill('SIGKILL');
    }
    const rows =
      await db.sql`select slot, fence::text as fence, extract(epoch from started) * 1000 as s, extract(epoch from ended) * 1000 as e
      from work_log where ended is not null order by started`;
    // the most pieces of work at once, from the resource's own records
    const events = rows.flatMap((r) => [
      { t: Number(r.s), d: 1 },
      { t: Number(r.e), d: -1 },
    ]);
    events.sort((a, b) => a.t - b.t || a.d - b.d);
    let now = 0;
    let most = 0;
    for (const e of events) {
      now += e.d;
      most = Math.max(most, now);
    }
    // and per permit, never two holders at once
    const bySlot = new Map<string, { s: number; e: number; fence: string }[]>();
    for (const r of rows)
      bySlot.set(r.slot as string, [...(bySlot.get(r.slot as string) ?? []), { s: Number(r.s), e: Number(r.e), fence: r.fence as string }]);
    let overlaps = 0;
    for (const list of bySlot.values())
      for (let i = 1; i < list.length; i++) if ((list[i] as { s: number }).s < (list[i - 1] as { e: number }).e) overlaps++;
    const works = rows.length;
    const refused = results.reduce((n, r) => n + r.refused, 0);
    console.log(
      `semaphore chaos: ${works} fenced pieces of work by ${results.length} surviving workers; faults ${JSON.stringify(faults)}; most at once ${most} (3 permits); stale writes refused ${refused}`,
    );
    expect(works).toBeGreaterThan(50);
    expect(bySlot.size).toBeLessThanOrEqual(3);
    expect(overlaps).toBe(0);
    expect(most).toBeLessThanOrEqual(3);
  }, 120_000);
});
