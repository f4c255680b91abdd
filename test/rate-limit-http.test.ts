// The rate-limit middleware on real HTTP ports: 429 with Retry-After past the limit, the IETF
// RateLimit fields, hostile keys answered 400, requests without a key not limited.
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import express from 'express';
import Fastify from 'fastify';
import { Hono } from 'hono';
import { afterAll, describe, expect, it } from 'vitest';
import { InvalidOptionError, migrateLimits, rateLimitExpress, rateLimitFastify, rateLimitHono } from '../src/index.js';
import { useTestDb } from './helpers.js';

const db = await useTestDb(4);
await migrateLimits(db.sql);
const closers: (() => Promise<unknown>)[] = [];
afterAll(() => Promise.all(closers.map((c) => c())));
const limits = { rate: 2, per: 60_000, burst: 2 };

const apps: { name: string; start(prefix: string): Promise<string> }[] = [
  {
    name: 'express',
    async start(prefix) {
      const app = express();
      app.use(rateLimitExpress(db.sql, { ...limits, key: (req) => (req.query.k === undefined ? undefined : `${prefix}${req.query.k}`) }));
      app.get('/', (_req, res) => void res.send('ok'));
      const server = app.listen(0, '127.0.0.1');
      await new Promise((r) => server.once('listening', r));
      closers.push(() => new Promise((r) => server.close(r)));
      return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    },
  },
  {
    name: 'fastify',
    async start(prefix) {
      const app = Fastify();
      app.addHook(
        'onRequest',
        rateLimitFastify(db.pool, {
          ...limits,
          key: (req) => ((req.query as { k?: string }).k === undefined ? undefined : `${prefix}${(req.query as { k: string }).k}`),
        }),
      );
      app.get('/', async () => 'ok');
      await app.listen({ port: 0, host: '127.0.0.1' });
      closers.push(() => app.close());
      return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
    },
  },
  {
    name: 'hono',
    async start(prefix) {
      const app = new Hono();
      app.use(
        '*',
        rateLimitHono(db.sql, { ...limits, key: (c) => (c.req.query('k') === undefined ? undefined : `${prefix}${c.req.query('k')}`) }),
      );
      app.get('/', (c) => c.text('ok'));
      const server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' });
      await new Promise((r) => server.once('listening', r));
      closers.push(() => new Promise((r) => server.close(r)));
      return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    },
  },
];

describe('rate-limit middleware', () => {
  for (const app of apps) {
    it(`${app.name}: two pass with RateLimit fields, the third gets 429 + Retry-After; no key, no limit; a hostile key 400`, async () => {
      const url = await app.start(`${app.name}:`);
      const first = await fetch(`${url}/?k=client`);
      expect(first.status).toBe(200);
      expect(first.headers.get('ratelimit-policy')).toBe('"default";q=2;w=60');
      expect(first.headers.get('ratelimit')).toMatch(/^"default";r=1;t=\d+$/);
      expect((await fetch(`${url}/?k=client`)).status).toBe(200);
      const denied = await fetch(`${url}/?k=client`);
      expect(denied.status).toBe(429);
      expect(Number(denied.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
      expect(denied.headers.get('content-type')).toContain('application/problem+json');
      expect(await denied.json()).toMatchObject({ status: 429, type: 'urn:pgcoord:problem:rate-limited' });
      expect(denied.headers.get('ratelimit')).toMatch(/^"default";r=0;t=\d+$/);
      // another key has its own quota; no key is not limited
      expect((await fetch(`${url}/?k=other`)).status).toBe(200);
      for (let i = 0; i < 4; i++) expect((await fetch(`${url}/`)).status).toBe(200);
      // keys a client controls: too long, a lone surrogate (percent-encoded), NUL
      expect((await fetch(`${url}/?k=${'x'.repeat(300)}`)).status).toBe(400);
      expect((await fetch(`${url}/?k=%00`)).status).toBe(400);
    });
  }

  it('bad options are refused when the middleware is made', () => {
    expect(() => rateLimitExpress(db.sql, { rate: 0, per: 1000, key: () => 'k' })).toThrow(InvalidOptionError);
    expect(() => rateLimitFastify(db.sql, { rate: 1, per: 1000 } as never)).toThrow(InvalidOptionError);
    expect(() => rateLimitHono(db.sql, { rate: 1, per: 1000, key: () => 'k', policy: 'bad policy' })).toThrow(InvalidOptionError);
  });
});
