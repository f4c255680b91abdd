// Fastify (4 and 5) plugin: preParsing caps the body, a preHandler claims the key (or answers),
// onSend stores the serialized payload and commits before the response leaves, onResponse cleans
// up. Fastify parses the body before any of our code sees it, so its own client errors (body over
// its bodyLimit, invalid JSON) are turned into problem+json in onSend, like ours.

import { pipeline, Transform } from 'node:stream';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Runner } from '../driver/index.js';
import type { HandleOf } from '../handles.js';
import { IdempotencyBodyInvalidError, IdempotencyBodyTooLargeError, IdempotencyError } from './errors.js';
import type { RequestBody } from './fingerprint.js';
import {
  checkContentLength,
  type HttpAnswer,
  type HttpIdempotencyOptions,
  httpConfig,
  isJson,
  prepare,
  problemResponse,
  settle,
} from './http.js';
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

// The body as fastify's parser left it, tagged for the fingerprint. A JSON `null` is a body; only
// `undefined` (fastify ran no parser) is none.
function bodyOf(req: FastifyRequest): RequestBody {
  const body: unknown = req.body;
  if (body === undefined) return { kind: 'none' };
  if (isJson(req.headers['content-type'])) return { kind: 'json', value: body };
  if (Buffer.isBuffer(body) || typeof body === 'string') return body.length === 0 ? { kind: 'none' } : { kind: 'bytes', bytes: body };
  return { kind: 'parsed', value: body };
}

// A body stream that fails with 413 past `limit` bytes (for bodies of undeclared length).
function capped(limit: number): Transform {
  let size = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, done) {
      size += chunk.length;
      if (size > limit) return done(new IdempotencyBodyTooLargeError(limit));
      done(null, chunk);
    },
  });
}

// Fastify's own errors about the request body, as the problem the middleware answers with. Only
// when fastify answered with that error's own status (an app's error handler may have answered
// otherwise: then its answer stands).
function bodyProblem(err: unknown, reply: FastifyReply, limit: number): HttpAnswer | undefined {
  if (err instanceof IdempotencyError) return problemResponse(err); // from our preParsing
  const code = (err as { code?: unknown } | null)?.code;
  if (code === 'FST_ERR_CTP_BODY_TOO_LARGE' && reply.statusCode === 413) return problemResponse(new IdempotencyBodyTooLargeError(limit));
  if (
    (code === 'FST_ERR_CTP_INVALID_JSON_BODY' || code === 'FST_ERR_CTP_EMPTY_JSON_BODY' || code === 'FST_ERR_CTP_INVALID_CONTENT_LENGTH') &&
    reply.statusCode === 400
  )
    return problemResponse(new IdempotencyBodyInvalidError((err as Error).message));
  return undefined;
}

/**
 * Fastify plugin for the Idempotency-Key header (register it on the instance or scope whose
 * routes it protects; it is not encapsulated, like a fastify-plugin). The handler finds the
 * claimed key's context on `request.idempotency` (`.tx` in transactional mode). Fastify parses
 * the body (its `bodyLimit` applies too); `maxBodyBytes` is checked against the declared length
 * and, for streamed bodies, the bytes as they arrive. Answers as for {@link idempotencyExpress};
 * fastify's own answers about the body of a request the plugin handles (over `bodyLimit`, invalid
 * JSON) are turned into the same problem+json (413, 400).
 *
 * @example
 * await app.register(idempotencyFastify(sql, { scope: (req) => req.headers['x-tenant'] as string }));
 * app.post('/charges', async (req, reply) => reply.code(201).send(await charge(req.idempotency!.tx, req.body)));
 */
export function idempotencyFastify<R extends Runner>(runner: R, options: HttpIdempotencyOptions<FastifyRequest>) {
  const cfg = httpConfig<FastifyRequest>(runner, options);
  const attempts = new WeakMap<FastifyRequest, IdempotentAttempt<HandleOf<R>>>();
  const failures = new WeakMap<FastifyRequest, unknown>();
  // The requests the plugin handles: the configured methods, with a key or when one is required
  // (a request let through without a key keeps fastify's own answers).
  const handles = (req: FastifyRequest) =>
    cfg.methods.has(req.method.toUpperCase()) && (cfg.required || req.headers[cfg.header] !== undefined);
  const plugin = async (fastify: FastifyInstance) => {
    fastify.decorateRequest('idempotency', null);
    fastify.addHook('preParsing', async (req, _reply, payload) => {
      if (!handles(req)) return payload;
      checkContentLength(req.headers['content-length'], cfg.maxBodyBytes); // a 413 answered in onSend
      if (req.headers['content-length'] !== undefined) return payload; // fastify checks the declared length
      // pipeline, not pipe: a client that aborts mid-body must fail the capped stream too.
      return pipeline(payload, capped(cfg.maxBodyBytes), () => {});
    });
    // Errors before the handler (body parsing, preParsing) reach onSend as fastify's default JSON.
    fastify.addHook('onError', async (req, _reply, error) => {
      if (handles(req) && !attempts.has(req)) failures.set(req, error);
    });
    fastify.addHook('preHandler', async (req, reply) => {
      if (!cfg.methods.has(req.method.toUpperCase())) return;
      const prepared = await prepare<FastifyRequest, HandleOf<R>>(
        cfg,
        { method: req.method, route: req.url, header: (n) => req.headers[n], body: bodyOf(req) },
        req,
      );
      if (prepared.kind === 'pass') return;
      if (prepared.kind === 'answer') return answer(reply, prepared.answer);
      const attempt = prepared.attempt;
      attempts.set(req, attempt);
      req.idempotency = attempt.context as IdempotentContext<unknown>;
      // The response closed before its payload went through onSend: the handler destroyed it
      // (reply.raw.destroy(): fastify then never calls onSend nor onResponse) or the client went
      // away. Nothing can reach the client any more: end the attempt (roll back / release) rather
      // than hold the transaction and the key open. A reply sent later goes out unstored.
      reply.raw.once('close', () => {
        if (attempts.get(req) !== attempt) return; // onSend took it
        attempts.delete(req);
        void attempt.fail(new Error('the response was closed before it was sent'));
      });
    });
    fastify.addHook('onSend', async (req, reply, payload) => {
      const attempt = attempts.get(req);
      if (!attempt) {
        if (!failures.has(req)) return payload;
        const routeLimit = (req as { routeOptions?: { bodyLimit?: unknown } }).routeOptions?.bodyLimit;
        const problem = bodyProblem(failures.get(req), reply, typeof routeLimit === 'number' ? routeLimit : cfg.maxBodyBytes);
        failures.delete(req);
        if (!problem) return payload;
        reply.code(problem.status);
        for (const [k, v] of Object.entries(problem.headers)) reply.header(k, v);
        return problem.body;
      }
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
