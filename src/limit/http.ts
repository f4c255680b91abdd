// Rate limiting for HTTP: one decision per request (limit()), the IETF RateLimit header fields
// (draft-ietf-httpapi-ratelimit-headers-09: `RateLimit-Policy` and `RateLimit`), and a 429
// problem+json answer with `Retry-After` when denied. The framework adapters (express, fastify,
// hono) only read the request and write the answer.

import type { Response as ExpressResponse, NextFunction, Request, RequestHandler } from 'express';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Context, MiddlewareHandler } from 'hono';
import type { Runner } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import { describe, textProblem } from '../text.js';
import { limit, type RateLimitOptions } from './rate.js';

/** Options of the rate-limit middleware. */
export interface HttpRateLimitOptions<R> extends RateLimitOptions {
  /**
   * The key a request counts against (an API client, a user, an IP): a string of 1 to 255
   * characters. A request for which it returns `undefined` is not limited.
   */
  key: (req: R) => string | undefined | Promise<string | undefined>;
  /** The policy's name in the RateLimit fields (default `default`): a token of letters, digits, `_-.`. */
  policy?: string;
}

/** What to answer: the headers for every request, and a problem body when denied. */
interface Answer {
  headers: Record<string, string>;
  denied?: { status: number; body: string };
}

const POLICY = /^[A-Za-z][A-Za-z0-9_.-]{0,63}$/;

function checked<R>(options: HttpRateLimitOptions<R>): HttpRateLimitOptions<R> & { policy: string } {
  if (options === null || typeof options !== 'object') throw new InvalidOptionError('rate limit middleware options must be an object');
  if (typeof options.key !== 'function') throw new InvalidOptionError('rate limit middleware needs a key function');
  const policy = options.policy ?? 'default';
  if (typeof policy !== 'string' || !POLICY.test(policy))
    throw new InvalidOptionError(`policy must match ${POLICY}, got ${describe(policy)}`);
  // a dry check of the numbers (the key is checked per request)
  limitCheck(options);
  return { ...options, policy };
}

function limitCheck(o: RateLimitOptions): void {
  const { rate, per, burst = 1, cost = 1 } = o;
  for (const [name, v] of [
    ['rate', rate],
    ['per', per],
    ['burst', burst],
    ['cost', cost],
  ] as const)
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1)
      throw new InvalidOptionError(`${name} must be a positive integer, got ${describe(v)}`);
}

function problem(status: number, title: string, detail: string, code: string): { status: number; body: string } {
  return { status, body: JSON.stringify({ type: `urn:pgcoord:problem:${code}`, title, status, detail }) };
}

/** The decision for one request, as headers and (when denied or the key is bad) a problem. */
async function decide<R>(runner: Runner, o: HttpRateLimitOptions<R> & { policy: string }, req: R): Promise<Answer | undefined> {
  const key = await o.key(req);
  if (key === undefined) return undefined;
  if (typeof key !== 'string' || key.length === 0 || key.length > 255 || textProblem(key))
    return {
      headers: { 'content-type': 'application/problem+json' },
      denied: problem(400, 'Bad rate limit key', 'the request does not name a usable rate limit key', 'rate-limit-key-invalid'),
    };
  const d = await limit(runner, key, o);
  const windowS = Math.ceil(o.per / 1000);
  const headers: Record<string, string> = {
    'ratelimit-policy': `"${o.policy}";q=${o.rate};w=${windowS}`,
    ratelimit: `"${o.policy}";r=${d.remaining};t=${Math.ceil(d.resetMs / 1000)}`,
  };
  if (d.allowed) return { headers };
  headers['retry-after'] = String(Math.max(1, Math.ceil(d.retryAfterMs / 1000)));
  headers['content-type'] = 'application/problem+json';
  return {
    headers,
    denied: problem(429, 'Too Many Requests', `rate limit exceeded; retry after ${headers['retry-after']} s`, 'rate-limited'),
  };
}

/**
 * Express (4 and 5) middleware: 429 with `Retry-After` past the limit, RateLimit fields on every
 * limited response. Database errors go to `next(err)`.
 *
 * @example
 * app.use('/api', rateLimitExpress(sql, { key: (req) => req.get('x-api-key'), rate: 100, per: 60_000 }));
 */
export function rateLimitExpress(runner: Runner, options: HttpRateLimitOptions<Request>): RequestHandler {
  const o = checked(options);
  return (req: Request, res: ExpressResponse, next: NextFunction) => {
    decide(runner, o, req).then((answer) => {
      if (!answer) return next();
      for (const [k, v] of Object.entries(answer.headers)) res.setHeader(k, v);
      if (!answer.denied) return next();
      res.status(answer.denied.status).end(answer.denied.body);
    }, next);
  };
}

/**
 * Fastify `onRequest` hook: 429 with `Retry-After` past the limit, RateLimit fields on every
 * limited response.
 *
 * @example
 * app.addHook('onRequest', rateLimitFastify(pool, { key: (req) => req.headers['x-api-key'] as string, rate: 100, per: 60_000 }));
 */
export function rateLimitFastify(
  runner: Runner,
  options: HttpRateLimitOptions<FastifyRequest>,
): (req: FastifyRequest, reply: FastifyReply) => Promise<void> {
  const o = checked(options);
  return async (req, reply) => {
    const answer = await decide(runner, o, req);
    if (!answer) return;
    reply.headers(answer.headers);
    if (answer.denied) await reply.code(answer.denied.status).send(answer.denied.body);
  };
}

/**
 * Hono middleware: 429 with `Retry-After` past the limit, RateLimit fields on every limited
 * response.
 *
 * @example
 * app.use('/api/*', rateLimitHono(db, { key: (c) => c.req.header('x-api-key'), rate: 100, per: 60_000 }));
 */
export function rateLimitHono(runner: Runner, options: HttpRateLimitOptions<Context>): MiddlewareHandler {
  const o = checked(options);
  return async (c, next) => {
    const answer = await decide(runner, o, c);
    if (!answer) return next();
    if (answer.denied) return new Response(answer.denied.body, { status: answer.denied.status, headers: answer.headers });
    await next();
    for (const [k, v] of Object.entries(answer.headers)) c.res.headers.set(k, v);
  };
}
