// Fastify (4 and 5) plugin: a preHandler claims the key (or answers), onSend stores the
// serialized payload and commits before the response leaves, onResponse cleans up.

import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { HandleOf } from '../handles.js';
import type { Runner } from '../runner.js';
import { IdempotencyBodyTooLargeError, IdempotencyError } from './errors.js';
import { checkContentLength, type HttpAnswer, type HttpIdempotencyOptions, httpConfig, prepare, problemResponse, settle } from './http.js';
import type { IdempotentAttempt, IdempotentContext } from './run.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by pgcoord's idempotency plugin while the handler runs under a claimed key. */
    idempotency?: IdempotentContext<unknown> | null;
  }
}

function answer(reply: FastifyReply, a: HttpAnswer): FastifyReply {
  reply.code(a.status);
  for (const [k, v] of Object.entries(a.headers)) reply.header(k, v);
  return reply.send(a.body);
}

/**
 * Fastify plugin for the Idempotency-Key header (register it on the instance or scope whose
 * routes it protects; it is not encapsulated, like a fastify-plugin). The handler finds the
 * claimed key's context on `request.idempotency` (`.tx` in transactional mode). Fastify parses
 * the body (its `bodyLimit` applies); `maxBodyBytes` is checked against the declared length and,
 * for streamed bodies, the parsed body's JSON size. Answers as for {@link idempotencyExpress}.
 *
 * @example
 * await app.register(idempotencyFastify(sql, { scope: (req) => req.headers['x-tenant'] as string }));
 * app.post('/charges', async (req, reply) => reply.code(201).send(await charge(req.idempotency!.tx, req.body)));
 */
export function idempotencyFastify<R extends Runner>(runner: R, options: HttpIdempotencyOptions<FastifyRequest>) {
  const cfg = httpConfig<FastifyRequest>(runner, options);
  const attempts = new WeakMap<FastifyRequest, IdempotentAttempt<HandleOf<R>>>();
  const plugin = async (fastify: FastifyInstance) => {
    fastify.decorateRequest('idempotency', null);
    fastify.addHook('preHandler', async (req, reply) => {
      if (!cfg.methods.has(req.method.toUpperCase())) return;
      try {
        checkContentLength(req.headers['content-length'], cfg.maxBodyBytes);
        if (req.headers['content-length'] === undefined && req.body !== undefined && req.body !== null) {
          const size = Buffer.isBuffer(req.body)
            ? req.body.length
            : Buffer.byteLength(typeof req.body === 'string' ? req.body : JSON.stringify(req.body));
          if (size > cfg.maxBodyBytes) throw new IdempotencyBodyTooLargeError(cfg.maxBodyBytes);
        }
      } catch (err) {
        if (err instanceof IdempotencyError) return answer(reply, problemResponse(err));
        throw err;
      }
      const prepared = await prepare<FastifyRequest, HandleOf<R>>(
        cfg,
        { method: req.method, route: req.url, header: (n) => req.headers[n], body: req.body ?? undefined },
        req,
      );
      if (prepared.kind === 'pass') return;
      if (prepared.kind === 'answer') return answer(reply, prepared.answer);
      attempts.set(req, prepared.attempt);
      req.idempotency = prepared.attempt.context as IdempotentContext<unknown>;
    });
    fastify.addHook('onSend', async (req, reply, payload) => {
      const attempt = attempts.get(req);
      if (!attempt) return payload;
      attempts.delete(req);
      const body =
        typeof payload === 'string'
          ? Buffer.from(payload)
          : Buffer.isBuffer(payload)
            ? payload
            : payload === null || payload === undefined
              ? Buffer.alloc(0)
              : undefined; // a stream
      const out = await settle(cfg, attempt, { status: reply.statusCode, headers: reply.getHeaders(), body });
      if (out.kind === 'original') return payload;
      for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name);
      reply.code(out.answer.status);
      for (const [k, v] of Object.entries(out.answer.headers)) reply.header(k, v);
      return out.answer.body;
    });
    // The handler's response never went through onSend (a hook failed after it): free the key.
    // (Not on a client abort: the handler may still be using the transaction; its reply still
    // goes through onSend, which ends the attempt.)
    fastify.addHook('onResponse', async (req) => {
      const attempt = attempts.get(req);
      if (!attempt) return;
      attempts.delete(req);
      await attempt.fail(undefined);
    });
  };
  (plugin as unknown as Record<symbol, unknown>)[Symbol.for('skip-override')] = true;
  (plugin as unknown as Record<symbol, unknown>)[Symbol.for('fastify.display-name')] = 'pgcoord-idempotency';
  return plugin;
}
