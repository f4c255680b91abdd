// The three HTTP middlewares on real servers (loopback) over a real PostgreSQL: exactly-once under
// 50 parallel requests, replay fidelity, 409 / 422 / 400 / 413 answers, scoping, retryable 5xx.
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { drizzle as drizzlePgjs } from 'drizzle-orm/postgres-js';
import express from 'express';
import Fastify from 'fastify';
import { Hono } from 'hono';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type HttpIdempotencyOptions,
  IdempotencyScopeRequiredError,
  type IdempotentContext,
  idempotencyExpress,
  idempotencyFastify,
  idempotencyHono,
  migrate,
  parseIdempotencyKey,
} from '../src/idempotency/index.js';
import { q, useTestDb } from './helpers.js';

const db = await useTestDb(16);
const table = { schema: 'idem_http', table: 'keys' };
await migrate(db.sql, table);
await db.sql`create table charges (id serial primary key, key text, amount int)`;

type Opts = Omit<HttpIdempotencyOptions<unknown>, 'scope'> & { scope?: (tenant: string | undefined) => string | undefined };

interface Server {
  url: string;
  close(): Promise<void>;
}

// The same route in each framework: insert a charge in the request's transaction, answer 201 with
// Location, ETag, Set-Cookie and a JSON body. `?fail=1` answers 500 (not stored), `?stream=1` a
// streamed body.
let runs = 0;
async function work(ctx: IdempotentContext<unknown>, amount: number) {
  runs++;
  const [row] = await q(ctx.tx, 'insert into charges (key, amount) values ($1, $2) returning id', [ctx.key, amount]);
  await q(ctx.tx, 'select pg_sleep(0.05)');
  return { id: Number(row!.id), amount, attempt: ctx.attempt, at: Math.random() };
}

const frameworks: { name: string; start(opts: Opts): Promise<Server> }[] = [
  {
    name: 'express (postgres.js)',
    async start(opts) {
      const app = express();
      const { scope, ...rest } = opts;
      app.use(idempotencyExpress(db.sql, { ...rest, scope: scope ? (req) => scope(req.get('x-tenant')) : undefined }));
      app.post('/charges', async (req, res) => {
        if (req.query.fail) return void res.status(500).json({ error: 'down' });
        const out = await work(req.idempotency!, (req.body as { amount: number }).amount);
        res.status(201).location(`/charges/${out.id}`).set('etag', `"${out.id}"`).cookie('session', 'secret').json(out);
      });
      const server = app.listen(0, '127.0.0.1');
      await new Promise((r) => server.once('listening', r));
      return {
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        close: () => new Promise((r) => server.close(() => r())),
      };
    },
  },
  {
    name: 'fastify (drizzle postgres-js)',
    async start(opts) {
      const app = Fastify();
      const { scope, ...rest } = opts;
      await app.register(
        idempotencyFastify(drizzlePgjs(db.sql), { ...rest, scope: scope ? (req) => scope(req.headers['x-tenant'] as string) : undefined }),
      );
      app.post('/charges', async (req, reply) => {
        if ((req.query as { fail?: string }).fail) return reply.code(500).send({ error: 'down' });
        const out = await work(req.idempotency!, (req.body as { amount: number }).amount);
        return reply
          .code(201)
          .header('location', `/charges/${out.id}`)
          .header('etag', `"${out.id}"`)
          .header('set-cookie', 'session=secret')
          .send(out);
      });
      await app.listen({ port: 0, host: '127.0.0.1' });
      return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, close: () => app.close() };
    },
  },
  {
    name: 'hono (drizzle node-postgres)',
    async start(opts) {
      const app = new Hono();
      const { scope, ...rest } = opts;
      app.use('*', idempotencyHono(drizzlePg(db.pool), { ...rest, scope: scope ? (c) => scope(c.req.header('x-tenant')) : undefined }));
      app.post('/charges', async (c) => {
        if (c.req.query('fail')) return c.json({ error: 'down' }, 500);
        const body = (await c.req.json()) as { amount: number };
        const out = await work(c.get('idempotency' as never) as IdempotentContext<unknown>, body.amount);
        c.header('location', `/charges/${out.id}`);
        c.header('etag', `"${out.id}"`);
        c.header('set-cookie', 'session=secret');
        return c.json(out, 201);
      });
      const server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' });
      await new Promise((r) => server.once('listening', r));
      return {
        url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
        close: () => new Promise((r) => server.close(() => r())),
      };
    },
  },
];

const base: Opts = { table, scope: (t) => t, maxBodyBytes: 1000, waitMs: 20_000 };

function post(url: string, key: string | undefined, body: unknown, headers: Record<string, string> = {}) {
  return fetch(`${url}/charges`, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      'x-tenant': 'acme',
      ...(key === undefined ? {} : { 'idempotency-key': key }),
      ...headers,
    },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

for (const fw of frameworks) {
  describe(fw.name, () => {
    const slug = fw.name.replace(/[^a-z]+/g, '-');
    let server: Server;
    let rejecting: Server;
    beforeAll(async () => {
      server = await fw.start(base);
      rejecting = await fw.start({ ...base, waitMs: 0 });
    });
    afterAll(async () => {
      await server.close();
      await rejecting.close();
    });

    it('50 parallel requests with one key: the handler runs once, all get the same status and body', async () => {
      runs = 0;
      const key = `par-${slug}`;
      const responses = await Promise.all(Array.from({ length: 50 }, () => post(server.url, key, { amount: 200 })));
      const bodies = await Promise.all(responses.map((r) => r.text()));
      expect(runs).toBe(1);
      expect(new Set(responses.map((r) => r.status))).toEqual(new Set([201]));
      expect(new Set(bodies).size).toBe(1);
      const replays = responses.filter((r) => r.headers.get('idempotent-replayed') === 'true');
      expect(replays).toHaveLength(49);
      const first = responses.find((r) => r.headers.get('idempotent-replayed') === null)!;
      expect(first.headers.get('set-cookie')).toContain('session=secret');
      for (const r of replays) {
        expect(r.headers.get('set-cookie')).toBeNull(); // never replayed to another client
        expect(r.headers.get('location')).toBe(first.headers.get('location'));
        expect(r.headers.get('etag')).toBe(first.headers.get('etag'));
        expect(r.headers.get('content-type')).toBe(first.headers.get('content-type'));
      }
      const rows = await db.sql`select count(*)::int as n from charges where key = ${key}`;
      expect(rows[0]!.n).toBe(1);
    });

    it('50 parallel requests with waitMs: 0: one 201, the rest 201 replays or 409 + Retry-After', async () => {
      runs = 0;
      const key = `rej-${slug}`;
      const responses = await Promise.all(Array.from({ length: 50 }, () => post(rejecting.url, key, { amount: 5 })));
      expect(runs).toBe(1);
      const conflicts = responses.filter((r) => r.status === 409);
      expect(conflicts.length).toBeGreaterThan(0);
      expect(responses.filter((r) => r.status !== 409).every((r) => r.status === 201)).toBe(true);
      for (const r of conflicts) {
        expect(r.headers.get('content-type')).toContain('application/problem+json');
        expect(Number(r.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
        expect(((await r.json()) as { code: string }).code).toBe('PGCOORD_IDEMPOTENCY_IN_FLIGHT');
      }
      const later = await post(rejecting.url, key, { amount: 5 });
      expect(later.status).toBe(201);
      expect(later.headers.get('idempotent-replayed')).toBe('true');
    });

    it('same key, different body → 422 problem+json; key order and spacing do not matter', async () => {
      const key = `mm-${slug}`;
      expect((await post(server.url, key, { amount: 1, note: 'x' })).status).toBe(201);
      const same = await post(server.url, key, '{ "note": "x",  "amount": 1 }');
      expect(same.status).toBe(201);
      expect(same.headers.get('idempotent-replayed')).toBe('true');
      const other = await post(server.url, key, { amount: 2, note: 'x' });
      expect(other.status).toBe(422);
      expect(other.headers.get('content-type')).toContain('application/problem+json');
      expect(await other.json()).toMatchObject({ status: 422, code: 'PGCOORD_IDEMPOTENCY_MISMATCH' });
    });

    it('another scope never replays', async () => {
      runs = 0;
      const key = `scope-${slug}`;
      const a = await post(server.url, key, { amount: 3 });
      const b = await post(server.url, key, { amount: 3 }, { 'x-tenant': 'globex' });
      expect([a.status, b.status]).toEqual([201, 201]);
      expect(b.headers.get('idempotent-replayed')).toBeNull();
      expect(runs).toBe(2);
      const noTenant = await fetch(`${server.url}/charges`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
        body: '{"amount":3}',
      });
      expect(noTenant.status).toBe(400); // the client's fault: a 5xx would be retried
      expect(((await noTenant.json()) as { code: string }).code).toBe('PGCOORD_IDEMPOTENCY_SCOPE_REQUIRED');
    });

    it('missing or bad header → 400 problem+json', async () => {
      const missing = await post(server.url, undefined, { amount: 1 });
      expect(missing.status).toBe(400);
      expect(await missing.json()).toMatchObject({ code: 'PGCOORD_IDEMPOTENCY_KEY_MISSING', status: 400 });
      for (const bad of ['has space', 'x'.repeat(256), '"unterminated', 'a,b', '""']) {
        const r = await post(server.url, bad, { amount: 1 });
        expect(r.status, bad).toBe(400);
        expect(((await r.json()) as { code: string }).code).toBe('PGCOORD_IDEMPOTENCY_KEY_INVALID');
      }
      const quoted = await post(server.url, `"sf ${slug}"`, { amount: 1 });
      expect(quoted.status).toBe(201);
    });

    it('oversized body → 413 problem+json, declared or streamed', async () => {
      const big = { amount: 1, pad: 'x'.repeat(2000) };
      const declared = await post(server.url, `big-${slug}`, big);
      expect(declared.status).toBe(413);
      expect(await declared.json()).toMatchObject({ code: 'PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE', status: 413 });
      const text = JSON.stringify(big);
      const streamed = await fetch(`${server.url}/charges`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': `big2-${slug}`, 'x-tenant': 'acme' },
        body: new ReadableStream({
          start(controller) {
            controller.enqueue(new TextEncoder().encode(text.slice(0, 900)));
            controller.enqueue(new TextEncoder().encode(text.slice(900)));
            controller.close();
          },
        }),
        duplex: 'half',
      } as RequestInit);
      expect(streamed.status).toBe(413);
      expect(((await streamed.json()) as { code: string }).code).toBe('PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE');
    });

    it('a 5xx is not stored: the key stays retryable and nothing was committed', async () => {
      runs = 0;
      const key = `fail-${slug}`;
      const failed = await fetch(`${server.url}/charges?fail=1`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key, 'x-tenant': 'acme' },
        body: '{"amount":9}',
      });
      expect(failed.status).toBe(500);
      const again = await fetch(`${server.url}/charges?fail=1`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key, 'x-tenant': 'acme' },
        body: '{"amount":9}',
      });
      expect(again.status).toBe(500);
      expect(again.headers.get('idempotent-replayed')).toBeNull();
      const rows = await db.sql.unsafe(`select count(*)::int as n from "idem_http"."keys" where key = $1`, [key]);
      expect(rows[0]!.n).toBe(0);
    });

    it('GET is passed through untouched', async () => {
      const r = await fetch(`${server.url}/charges`, { headers: { 'idempotency-key': 'bad key' } });
      expect(r.status).toBe(404);
    });
  });
}

describe('setup and header parsing', () => {
  it('refuses to create a middleware without a scope resolver', () => {
    expect(() => idempotencyExpress(db.sql, { table })).toThrow(IdempotencyScopeRequiredError);
    expect(() => idempotencyFastify(db.sql, { table })).toThrow(IdempotencyScopeRequiredError);
    expect(() => idempotencyHono(db.sql, { table })).toThrow(IdempotencyScopeRequiredError);
    expect(() => idempotencyHono(db.sql, { table, unscoped: true })).not.toThrow();
  });

  it('refuses to replay Set-Cookie and bad options', () => {
    expect(() => idempotencyExpress(db.sql, { table, unscoped: true, replayHeaders: ['Set-Cookie'] })).toThrow(/set-cookie/);
    expect(() => idempotencyExpress(db.sql, { table, unscoped: true, maxBodyBytes: -1 })).toThrow(/maxBodyBytes/);
    expect(() => idempotencyExpress({} as never, { table, unscoped: true })).toThrow(/runner|postgres/);
  });

  it('parses the structured-field string and bare tokens', () => {
    expect(parseIdempotencyKey('"a\\"b"')).toBe('a"b');
    expect(parseIdempotencyKey('8e03978e-40d5')).toBe('8e03978e-40d5');
    expect(parseIdempotencyKey(undefined)).toBeUndefined();
    expect(() => parseIdempotencyKey(['a', 'b'])).toThrow(/more than one/);
  });
});
