// Round trips of idempotent() on postgres.js, counted on the wire, plus a connection killed while
// `complete` + COMMIT is in flight.
//
// What is counted: the pool has one connection, whose socket (postgres.js's `socket` option) is
// wrapped. The protocol messages written and read are parsed: each Sync or Query message sent is
// one statement (postgres.js ends every statement with its own Sync) and each ReadyForQuery read
// answers one. A round trip is a write made while no statement is awaiting its answer: the client
// had nothing in flight, so it waited for (or was answered by) the server before sending again.
// Statements written back to back in one pipeline are one round trip. Counts are taken once
// every statement has been run on the connection (warm-up), because postgres.js's first run of a
// parameterized statement adds a Parse/Describe round trip of its own.
//
// "answered": trips made when the call resolved. "total": trips made until pgcoord released the
// connection (a query queued behind it on the one-connection pool runs only then; its own trip is
// subtracted), so work sent after the answer (a replay's COMMIT) is counted too.
import net from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { inTransaction } from '../src/driver/index.js';
import { IdempotencyLeaseLostError, idempotent, migrate } from '../src/idempotency/index.js';
import { CommitUnknownError } from '../src/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(4);
const table = { schema: 'idem_rt', table: 'keys' };
const T = '"idem_rt"."keys"';
await migrate(db.sql, table);
await db.sql`create table idem_rt_ledger (id int primary key, n int not null default 0)`;
await db.sql`insert into idem_rt_ledger values (1, 0)`;
await db.sql`create table idem_rt_notes (key text, note text)`;

interface Wire {
  armed: boolean;
  trips: number;
  statements: number;
  /** Statement texts sent while armed (postgres.js `debug`), to show in a failed assertion. */
  texts: string[];
  /** Destroy the socket right after its next write (that write still goes out). */
  killAfterNextWrite: boolean;
}

function countedPool() {
  const url = new URL(db.url);
  const wire: Wire = { armed: false, trips: 0, statements: 0, texts: [], killAfterNextWrite: false };
  const socket = () =>
    new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(Number(url.port || 5432), url.hostname);
      let outstanding = 0;
      let incoming = Buffer.alloc(0);
      s.on('data', (data: Buffer) => {
        incoming = Buffer.concat([incoming, data]);
        while (incoming.length >= 5) {
          const len = incoming.readInt32BE(1);
          if (incoming.length < 1 + len) break;
          if (incoming[0] === 0x5a /* Z: ReadyForQuery */ && outstanding > 0) outstanding--;
          incoming = incoming.subarray(1 + len);
        }
      });
      const write = s.write.bind(s) as (chunk: Buffer, ...rest: unknown[]) => boolean;
      s.write = ((chunk: Buffer, ...rest: unknown[]) => {
        // Only typed messages are written once armed (the untyped startup message comes first).
        if (wire.armed) {
          if (outstanding === 0) wire.trips++;
          for (let i = 0; i + 5 <= chunk.length; i += 1 + chunk.readInt32BE(i + 1)) {
            if (chunk[i] === 0x53 /* S: Sync */ || chunk[i] === 0x51 /* Q: Query */) {
              outstanding++;
              wire.statements++;
            }
          }
        }
        const ok = write(chunk, ...rest);
        if (wire.killAfterNextWrite) {
          wire.killAfterNextWrite = false;
          s.destroy();
        }
        return ok;
      }) as typeof s.write;
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
  const sql = db.newSql({
    max: 1,
    debug: (_connection: number, text: string) => {
      if (wire.armed) wire.texts.push(text.replace(/\s+/g, ' ').slice(0, 40));
    },
    socket,
  } as Parameters<typeof db.newSql>[0]);
  return { sql, wire };
}

const { sql, wire } = countedPool();

interface Count<T> {
  value: T;
  answered: number;
  total: number;
  statements: number;
  texts: string[];
}

async function count<T>(fn: () => Promise<T>): Promise<Count<T>> {
  await sql`select 1 as idle`; // nothing left over from earlier calls
  Object.assign(wire, { trips: 0, statements: 0, texts: [], armed: true });
  const value = await fn();
  const answered = wire.trips;
  await sql`select 1 as idle`; // queued until pgcoord gives the connection back
  wire.armed = false;
  return { value, answered, total: wire.trips - 1, statements: wire.statements - 1, texts: wire.texts.slice(0, -1) };
}

// The handler: one statement of its own, written as postgres.js users write it (a tagged template,
// which postgres.js prepares: after the warm-up it is one Bind/Execute/Sync).
const handler = async (ctx: { tx: unknown }) => {
  await (ctx.tx as typeof sql)`update idem_rt_ledger set n = n + 1 where id = ${1}`;
  return { ok: true };
};

const alone = (runner: object) => () => inTransaction(runner, {}, (scope) => scope.call((tx) => handler({ tx })));
const transactional = (runner: object, key: string) => () => idempotent(runner, { scope: 'rt', key, request: { n: 1 }, table }, handler);
const phased =
  (runner: object, key: string, fail = false) =>
  () =>
    idempotent(runner, { scope: 'rt', key, request: { n: 1 }, table, mode: 'phased' }, async (ctx) => {
      const v = await ctx.phase('one', (tx) => handler({ tx }));
      if (fail) throw new Error('retry me');
      return v;
    }).catch((e: Error) => (fail ? e.message : Promise.reject(e)));

const show = (c: Count<unknown>) => c.texts.join(' | ');

describe('round trips on postgres.js (one connection, statements already prepared on it)', () => {
  it('warms up every statement on the connection', async () => {
    await alone(sql)();
    await transactional(sql, 'warm-t')();
    await transactional(sql, 'warm-t')();
    await phased(sql, 'warm-p', true)();
    await phased(sql, 'warm-p')();
    await phased(sql, 'warm-p')();
  });

  it('transactional: a first call costs one round trip more than the handler alone, a replay one', async () => {
    // The handler alone in pgcoord's own transaction: BEGIN rides with its statement, then COMMIT.
    const base = await count(alone(sql));
    expect(base, show(base)).toMatchObject({ answered: 2, total: 2, statements: 3 });

    const first = await count(transactional(sql, 'tp-1'));
    expect(first.value).toEqual({ value: { ok: true }, replayed: false });
    // begin + set lock_timeout + claim + reset lock_timeout | update | complete + commit
    expect(first, show(first)).toMatchObject({ answered: 3, total: 3, statements: 7 });
    expect(first.total - base.total).toBe(1);

    const replay = await count(transactional(sql, 'tp-1'));
    expect(replay.value).toEqual({ value: { ok: true }, replayed: true });
    // begin + set + claim + reset, answered; then the COMMIT of this write-free transaction, which
    // the caller does not wait for
    expect(replay, show(replay)).toMatchObject({ answered: 1, total: 2, statements: 5 });
  });

  it('phased: the claim, each phase, complete and release are one round trip each', async () => {
    const first = await count(phased(sql, 'pp-1'));
    expect(first.value).toEqual({ value: { ok: true }, replayed: false });
    // begin + set + claim + reset + commit | begin + update | recovery point + commit | begin + complete + commit
    expect(first, show(first)).toMatchObject({ answered: 4, total: 4, statements: 12 });

    const replay = await count(phased(sql, 'pp-1'));
    expect(replay.value).toEqual({ value: { ok: true }, replayed: true });
    expect(replay, show(replay)).toMatchObject({ answered: 1, total: 1, statements: 5 });

    const failed = await count(phased(sql, 'pp-2', true));
    expect(failed.value).toBe('retry me');
    // claim | begin + update | recovery point + commit | begin + release + commit
    expect(failed, show(failed)).toMatchObject({ answered: 4, total: 4, statements: 12 });
  });
});

// ---------------------------------------------------------------- killed during complete + COMMIT

const killTable = { schema: 'idem_rt_kill', table: 'keys' };
const K = '"idem_rt_kill"."keys"';
await migrate(db.sql, killTable);
// `complete` waits on advisory lock 4242 while the test holds it: the backend is killed mid-batch.
await db.sql.unsafe(`create function idem_rt_kill_block() returns trigger language plpgsql as $$
begin
  if new.state = 'completed' then perform pg_advisory_xact_lock(4242); end if;
  return new;
end $$`);
await db.sql.unsafe(`create trigger block_complete before update on ${K} for each row execute function idem_rt_kill_block()`);

const holder = await db.sql.reserve();
// The killed calls run on a pool of their own: postgres.js 3.4.9 (unpatched) can carry a killed
// backend's FATAL error into the next statement of the reconnected slot (see runner.ts).
const victim = db.newSql({ max: 2 });
afterAll(() => holder.release());

async function killWaiter(): Promise<void> {
  for (let i = 0; i < 1000; i++) {
    const [row] = await db.sql`select pid from pg_locks where locktype = 'advisory' and objid = 4242 and not granted`;
    if (row) {
      await db.sql`select pg_terminate_backend(${row.pid as number})`;
      return;
    }
    await sleep(10);
  }
  throw new Error('complete never waited on the lock');
}

const note = (key: string) => async (ctx: { tx: unknown; attempt: number }) => {
  await q(ctx.tx, 'insert into idem_rt_notes values ($1, $2)', [key, `attempt ${ctx.attempt}`]);
  return { key, attempt: ctx.attempt };
};
const notes = async (key: string) => (await db.sql`select note from idem_rt_notes where key = ${key}`).map((r) => r.note);

describe('connection killed while complete + COMMIT is in flight', () => {
  it('transactional: CommitUnknownError, nothing stored, and the key runs again', async () => {
    await holder`select pg_advisory_lock(4242)`;
    let err: unknown;
    try {
      const call = idempotent(victim, { scope: 'kill', key: 'kill-t', table: killTable }, note('kill-t')).catch((e) => e);
      await killWaiter();
      err = await call;
    } finally {
      await holder`select pg_advisory_unlock(4242)`;
    }
    expect(err).toBeInstanceOf(CommitUnknownError);
    expect((err as CommitUnknownError).code).toBe('PGCOORD_COMMIT_UNKNOWN');
    // Killed before COMMIT ran: the claim, the handler's write and the result went together.
    expect(await db.sql.unsafe(`select * from ${K} where key = 'kill-t'`)).toHaveLength(0);
    expect(await notes('kill-t')).toEqual([]);
    const again = await idempotent(db.sql, { scope: 'kill', key: 'kill-t', table: killTable }, note('kill-t'));
    expect(again).toEqual({ value: { key: 'kill-t', attempt: 1 }, replayed: false });
    expect(await notes('kill-t')).toEqual(['attempt 1']);
  });

  it('phased: CommitUnknownError; the row keeps its last recovery point and is taken over once the lease runs out', async () => {
    const job = (runner: object, phases: string[]) =>
      idempotent(runner, { scope: 'kill', key: 'kill-p', table: killTable, mode: 'phased', leaseMs: 300 }, async (ctx) => {
        const a = await ctx.phase('a', async (tx) => {
          phases.push(`a${ctx.attempt}`);
          await q(tx, 'insert into idem_rt_notes values ($1, $2)', ['kill-p', `a ${ctx.attempt}`]);
          return 1;
        });
        return { a, attempt: ctx.attempt };
      });
    const phases: string[] = [];
    await holder`select pg_advisory_lock(4242)`;
    let err: unknown;
    try {
      const call = job(victim, phases).catch((e) => e);
      await killWaiter();
      err = await call;
    } finally {
      await holder`select pg_advisory_unlock(4242)`;
    }
    expect(err).toBeInstanceOf(CommitUnknownError);
    const [row] = await db.sql.unsafe(`select state, recovery_point, response_body from ${K} where key = 'kill-p'`);
    expect(row).toMatchObject({ state: 'running', recovery_point: 'a', response_body: null });
    const again = await job(db.sql, phases);
    expect(again).toEqual({ value: { a: 1, attempt: 2 }, replayed: false });
    expect(phases).toEqual(['a1']); // phase a committed once and is not run again
    expect(await notes('kill-p')).toEqual(['a 1']);
  });

  it('transactional, socket gone right after the batch is written: CommitUnknownError, and the row is all or nothing', async () => {
    // Prepare this table's statements on the connection first, so that complete + COMMIT go out
    // in one write (a first run would write only complete's Parse/Describe before the kill).
    await idempotent(sql, { scope: 'kill', key: 'kill-s-warm', table: killTable }, note('kill-s-warm'));
    let pid = 0;
    const err = await idempotent(sql, { scope: 'kill', key: 'kill-s', table: killTable }, async (ctx) => {
      const value = await note('kill-s')(ctx);
      const [r] = await q(ctx.tx, 'select pg_backend_pid() as pid');
      pid = Number(r?.pid);
      wire.killAfterNextWrite = true; // the next write is complete + COMMIT
      return value;
    }).catch((e) => e);
    expect(err).toBeInstanceOf(CommitUnknownError);
    // Let the server finish whatever it received before judging the row.
    for (let i = 0; i < 500; i++) {
      if ((await db.sql`select 1 from pg_stat_activity where pid = ${pid}`).length === 0) break;
      await sleep(10);
    }
    const rows = await db.sql.unsafe(`select state from ${K} where key = 'kill-s'`);
    const written = await notes('kill-s');
    const again = await idempotent(db.sql, { scope: 'kill', key: 'kill-s', table: killTable }, note('kill-s'));
    if (rows.length === 1) {
      // COMMIT ran, only its answer was lost: the result is stored with the handler's write.
      expect(rows[0]?.state).toBe('completed');
      expect(written).toEqual(['attempt 1']);
      expect(again).toEqual({ value: { key: 'kill-s', attempt: 1 }, replayed: true });
    } else {
      expect(written).toEqual([]);
      expect(again).toEqual({ value: { key: 'kill-s', attempt: 1 }, replayed: false });
    }
    expect(await notes('kill-s')).toEqual(['attempt 1']);
  });
});

describe('a lost lease with COMMIT pipelined behind the fenced write', () => {
  it('rolls back the phase: its write and recovery point are not committed', async () => {
    const err = await idempotent(db.sql, { scope: 'rt', key: 'fence-1', table, mode: 'phased' }, async (ctx) => {
      await ctx.phase('one', async (tx) => {
        await q(tx, 'insert into idem_rt_notes values ($1, $2)', ['fence-1', 'one']);
        // another attempt takes the key over while this phase runs
        await db.sql.unsafe(`update ${T} set lease_token = gen_random_uuid() where key = 'fence-1'`);
      });
      return 'unreachable';
    }).catch((e) => e);
    expect(err).toBeInstanceOf(IdempotencyLeaseLostError);
    expect(await notes('fence-1')).toEqual([]);
    const [row] = await db.sql.unsafe(`select recovery_point from ${T} where key = 'fence-1'`);
    expect(row?.recovery_point).toBe('started');
  });
});
