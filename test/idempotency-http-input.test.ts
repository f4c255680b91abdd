// Client input at the HTTP edge, through a real HTTP client against real listening express,
// fastify and hono servers over a real PostgreSQL: identities that would collide on the server,
// bodies whose fingerprints must differ, client errors that must be 4xx problem+json (never a
// framework 500), and a response destroyed by its handler (the attempt must still end).
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import express from 'express';
import Fastify from 'fastify';
import { Hono } from 'hono';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type HttpIdempotencyOptions,
  type IdempotentContext,
  idempotencyExpress,
  idempotencyFastify,
  idempotencyHono,
  migrate,
} from '../src/idempotency/index.js';
import { q, sleep, useTestDb } from './helpers.js';

const db = await useTestDb(12);
const table = { schema: 'idem_http_input', table: 'keys' };
await migrate(db.sql, table);

interface Server {
  url: string;
  close(): Promise<void>;
}

// The scope: the x-tenant header, else the `tenant` claim of a JSON token in x-claims (base64url
// JSON, as a JWT payload): the way a tenant id with a lone surrogate reaches the middleware.
function tenantOf(header: (name: string) => string | undefined): string | undefined {
  const tenant = header('x-tenant');
  if (tenant !== undefined) return tenant;
  const claims = header('x-claims');
  return claims ? (JSON.parse(Buffer.from(claims, 'base64url').toString('utf8')) as { tenant?: string }).tenant : undefined;
}

type Opts = Omit<HttpIdempotencyOptions<unknown>, 'scope'> & {
  /**
   * express only: the app's body parser before the middleware. Default none (the middleware reads
   * the body); `json-v1` adds what body-parser 1.x (express 4) does: `req.body = req.body || {}`.
   */
  parser?: 'none' | 'json' | 'json-v1';
  runner?: object;
};

let runs = 0;
async function work(ctx: IdempotentContext<unknown>) {
  runs++;
  await q(ctx.tx, 'select 1');
  return { n: runs };
}

async function listen(server: import('node:http').Server): Promise<Server> {
  if (!server.listening) await new Promise((r) => server.once('listening', r));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () =>
      new Promise((r) => {
        server.closeAllConnections?.();
        server.close(() => r());
      }),
  };
}

const frameworks: { name: string; start(opts: Opts): Promise<Server> }[] = [
  {
    name: 'express',
    async start({ parser = 'none', runner = db.sql, ...opts }) {
      const app = express();
      if (parser !== 'none') app.use(express.json());
      if (parser === 'json-v1')
        app.use((req, _res, next) => {
          req.body = req.body || {}; // what body-parser 1.x (express 4) does for a body it does not parse
          next();
        });
      app.use(idempotencyExpress(runner as never, { ...opts, scope: (req) => tenantOf((n) => req.get(n)) }));
      app.post('/echo', async (req, res) => void res.status(201).json(await work(req.idempotency!)));
      app.post('/destroy', async (req, res) => {
        await q(req.idempotency!.tx, 'select 1');
        res.destroy();
      });
      return listen(app.listen(0, '127.0.0.1'));
    },
  },
  {
    name: 'fastify',
    async start({ parser: _, runner = db.sql, ...opts }) {
      const app = Fastify();
      await app.register(idempotencyFastify(runner as never, { ...opts, scope: (req) => tenantOf((n) => req.headers[n] as string) }));
      app.post('/echo', async (req, reply) => reply.code(201).send(await work(req.idempotency!)));
      app.post('/destroy', async (req, reply) => {
        await q(req.idempotency!.tx, 'select 1');
        reply.raw.destroy();
        return reply; // fastify never calls onSend nor onResponse for it
      });
      await app.listen({ port: 0, host: '127.0.0.1' });
      return listen(app.server);
    },
  },
  {
    name: 'hono',
    async start({ parser: _, runner = db.sql, ...opts }) {
      const app = new Hono();
      app.use('*', idempotencyHono(runner as never, { ...opts, scope: (c) => tenantOf((n) => c.req.header(n)) }));
      app.post('/echo', async (c) => c.json(await work(c.get('idempotency' as never) as IdempotentContext<unknown>), 201));
      return listen(serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }) as import('node:http').Server);
    },
  },
];

/** POST with x-tenant: acme and a JSON content type unless told otherwise (`undefined` drops a header). */
function post(url: string, key: string, body: string | undefined, headers: Record<string, string | undefined> = {}, path = '/echo') {
  const all: Record<string, string | undefined> = {
    'x-tenant': 'acme',
    'idempotency-key': key,
    ...(body === undefined ? {} : { 'content-type': 'application/json' }),
    ...headers,
  };
  return fetch(`${url}${path}`, {
    method: 'POST',
    headers: Object.fromEntries(Object.entries(all).filter((e): e is [string, string] => e[1] !== undefined)),
    body,
  });
}

async function expectProblem(r: Response, status: number, code: string) {
  expect(r.status).toBe(status);
  expect(r.headers.get('content-type')).toContain('application/problem+json');
  expect(await r.json()).toMatchObject({ status, code });
}

const claims = (tenant: string) => Buffer.from(JSON.stringify({ tenant }), 'utf8').toString('base64url');

for (const fw of frameworks) {
  describe(fw.name, () => {
    let server: Server;
    beforeAll(async () => {
      server = await fw.start({ table, waitMs: 5000 });
    });
    afterAll(() => server.close());
    const k = (name: string) => `${name}-${fw.name}`;

    it('a tenant claim with a lone surrogate → 400 problem+json, not the U+FFFD tenant’s replay', async () => {
      const key = k('surrogate');
      const first = await post(server.url, key, '{"amount":1}', { 'x-tenant': undefined, 'x-claims': claims('acme\uFFFD') });
      expect(first.status).toBe(201);
      // JSON.stringify keeps a lone surrogate as the escape \ud800: the claim decodes to 'acme\uD800'
      const other = await post(server.url, key, '{"amount":1}', { 'x-tenant': undefined, 'x-claims': claims('acme\uD800') });
      expect(other.headers.get('idempotent-replayed')).toBeNull();
      await expectProblem(other, 400, 'PGCOORD_IDEMPOTENCY_SCOPE_INVALID');
    });

    it('raw text "hello" and the JSON {"$bytes":"aGVsbG8="} are different requests (422)', async () => {
      const key = k('bytes');
      expect((await post(server.url, key, 'hello', { 'content-type': 'text/plain' })).status).toBe(201);
      await expectProblem(await post(server.url, key, '{"$bytes":"aGVsbG8="}'), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
      await expectProblem(await post(server.url, key, '"hello"'), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
      const same = await post(server.url, key, 'hello', { 'content-type': 'text/plain' });
      expect(same.status).toBe(201);
      expect(same.headers.get('idempotent-replayed')).toBe('true');
    });

    it('no body and a JSON null are different requests (422)', async () => {
      const key = k('null');
      expect((await post(server.url, key, undefined)).status).toBe(201);
      await expectProblem(await post(server.url, key, 'null'), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
    });

    it('two different text bodies are different requests (422)', async () => {
      const key = k('text');
      expect((await post(server.url, key, 'hello', { 'content-type': 'text/plain' })).status).toBe(201);
      await expectProblem(await post(server.url, key, 'world', { 'content-type': 'text/plain' }), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
    });

    it('no tenant → 400 problem+json (SCOPE_REQUIRED), not a 5xx a client would retry', async () => {
      await expectProblem(
        await post(server.url, k('no-tenant'), '{}', { 'x-tenant': undefined }),
        400,
        'PGCOORD_IDEMPOTENCY_SCOPE_REQUIRED',
      );
    });

    it('an x-tenant over 255 characters → 400 problem+json', async () => {
      await expectProblem(
        await post(server.url, k('long-tenant'), '{}', { 'x-tenant': 't'.repeat(256) }),
        400,
        'PGCOORD_IDEMPOTENCY_SCOPE_INVALID',
      );
    });

    it('a 100 kB JSON body nested 50 000 deep is fingerprinted (no stack overflow, no 500)', async () => {
      const deep = `${'['.repeat(50_000)}${']'.repeat(50_000)}`;
      const r = await post(server.url, k('deep'), deep);
      expect(r.status).toBe(201);
      const again = await post(server.url, k('deep'), deep);
      expect(again.headers.get('idempotent-replayed')).toBe('true');
      await expectProblem(await post(server.url, k('deep'), `[${deep}]`), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
    });

    it('invalid JSON → 400 problem+json', async () => {
      await expectProblem(await post(server.url, k('bad-json'), '{"amount":'), 400, 'PGCOORD_IDEMPOTENCY_BODY_INVALID');
    });

    it('a body over 1 MiB (the default maxBodyBytes) → 413 problem+json, declared or streamed', async () => {
      const big = JSON.stringify({ pad: 'x'.repeat(1024 * 1024) });
      await expectProblem(await post(server.url, k('huge'), big), 413, 'PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE');
      const streamed = await fetch(`${server.url}/echo`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': k('huge2'), 'x-tenant': 'acme' },
        body: new ReadableStream({
          start(controller) {
            for (let i = 0; i < big.length; i += 64 * 1024) controller.enqueue(new TextEncoder().encode(big.slice(i, i + 64 * 1024)));
            controller.close();
          },
        }),
        duplex: 'half',
      } as RequestInit);
      await expectProblem(streamed, 413, 'PGCOORD_IDEMPOTENCY_BODY_TOO_LARGE');
    });
  });
}

describe('express: the app’s body parser', () => {
  for (const parser of ['json', 'json-v1', 'none'] as const) {
    it(`non-JSON bodies keep distinct fingerprints (parser: ${parser})`, async () => {
      const server = await frameworks[0]!.start({ table, parser });
      try {
        const key = `parser-${parser}`;
        expect((await post(server.url, key, 'hello', { 'content-type': 'text/plain' })).status).toBe(201);
        await expectProblem(await post(server.url, key, 'world', { 'content-type': 'text/plain' }), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
        await expectProblem(await post(server.url, key, '{}'), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
        const same = await post(server.url, key, 'hello', { 'content-type': 'text/plain' });
        expect(same.headers.get('idempotent-replayed')).toBe('true');
        // no body is not the JSON {} (express.json() reads a declared empty body as {})
        expect((await post(server.url, `${key}-empty`, undefined, { 'content-type': 'application/json' })).status).toBe(201);
        await expectProblem(await post(server.url, `${key}-empty`, '{}'), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
        // parsed by express.json() when there is one: still no stack overflow on deep nesting
        const deep = `${'['.repeat(50_000)}${']'.repeat(50_000)}`;
        expect((await post(server.url, `${key}-deep`, deep)).status).toBe(201);
        await expectProblem(await post(server.url, `${key}-deep`, `[${deep}]`), 422, 'PGCOORD_IDEMPOTENCY_MISMATCH');
      } finally {
        await server.close();
      }
    });
  }
});

for (const fw of frameworks.filter((f) => f.name !== 'hono')) {
  describe(`${fw.name}: a response destroyed by its handler`, () => {
    it('ends the attempt: no connection left idle in transaction, a max: 2 pool keeps serving, the key is retryable', async () => {
      const sql = db.newSql({ max: 2 });
      const server = await fw.start({ table, runner: sql, waitMs: 0 });
      try {
        const destroyed = await Promise.allSettled([
          post(server.url, `destroy-1-${fw.name}`, '{}', {}, '/destroy'),
          post(server.url, `destroy-2-${fw.name}`, '{}', {}, '/destroy'),
        ]);
        expect(destroyed.map((d) => d.status)).toEqual(['rejected', 'rejected']); // the socket was destroyed
        let idle = -1;
        for (let i = 0; i < 40 && idle !== 0; i++) {
          if (i > 0) await sleep(50);
          const [row] = await db.sql`select count(*)::int as n from pg_stat_activity
            where datname = current_database() and state like 'idle in transaction%'`;
          idle = row!.n as number;
        }
        expect(idle).toBe(0);
        // The same key again (nothing was committed: a new attempt), within 5 s: not 409, not a hang.
        const retry = await fetch(`${server.url}/echo`, {
          method: 'POST',
          headers: { 'x-tenant': 'acme', 'idempotency-key': `destroy-1-${fw.name}`, 'content-type': 'application/json' },
          body: '{}',
          signal: AbortSignal.timeout(5000),
        });
        expect(retry.status).toBe(201);
      } finally {
        await server.close();
      }
    });
  });
}
