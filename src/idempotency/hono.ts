// Hono middleware: claims the key before `next()`, reads the handler's Response after it, and
// replaces it with an identical one built from the bytes that were stored and committed.

import type { Context, MiddlewareHandler } from 'hono';
import type { Runner } from '../driver/index.js';
import type { HandleOf } from '../handles.js';
import { IdempotencyError } from './errors.js';
import type { RequestBody } from './fingerprint.js';
import {
  checkContentLength,
  type HttpAnswer,
  type HttpIdempotencyOptions,
  httpConfig,
  parseBody,
  prepare,
  problemResponse,
  readCapped,
  settle,
} from './http.js';
import type { IdempotentContext } from './run.js';

/** Hono `Variables` entry set by the middleware: `c.get('idempotency')`. */
export type IdempotencyVariables = { idempotency: IdempotentContext<unknown> };

function toResponse(a: HttpAnswer): Response {
  return new Response(new Uint8Array(a.body), { status: a.status, headers: a.headers });
}

async function* chunksOf(stream: ReadableStream<Uint8Array>): AsyncGenerator<Uint8Array> {
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    reader.releaseLock();
  }
}

// Read a response body up to `limit` bytes; over it, give back a stream that replays what was read
// followed by the rest (so an unstored response can still be sent as it is).
async function readResponse(res: Response, limit: number): Promise<{ body: Buffer } | { stream: ReadableStream<Uint8Array> }> {
  if (!res.body) return { body: Buffer.alloc(0) };
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return { body: Buffer.concat(chunks) };
    chunks.push(value);
    size += value.byteLength;
    if (size > limit) break;
  }
  return {
    stream: new ReadableStream<Uint8Array>({
      async pull(controller) {
        const next = chunks.shift();
        if (next) return controller.enqueue(next);
        const { done, value } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      },
      cancel: (reason) => reader.cancel(reason),
    }),
  };
}

function replace(c: Context, res: Response): void {
  c.res = undefined as unknown as Response; // no header merging from the handler's response
  c.res = res;
}

/**
 * Hono middleware for the Idempotency-Key header. The handler finds the claimed key's context with
 * `c.get('idempotency')` (`.tx` in transactional mode). The middleware reads the request body
 * itself (capped at `maxBodyBytes`, streamed bodies included) and leaves it cached for
 * `c.req.json()` / `c.req.text()`. Answers as for {@link idempotencyExpress}.
 *
 * @example
 * const app = new Hono<{ Variables: IdempotencyVariables }>();
 * app.use('/charges/*', idempotencyHono(sql, { scope: (c) => c.req.header('x-tenant') }));
 * app.post('/charges', async (c) => c.json(await charge(c.get('idempotency').tx, await c.req.json()), 201));
 */
export function idempotencyHono<R extends Runner>(runner: R, options: HttpIdempotencyOptions<Context>): MiddlewareHandler {
  const cfg = httpConfig<Context>(runner, options);
  return async (c, next) => {
    if (!cfg.methods.has(c.req.method.toUpperCase())) return next();
    let prepared: Awaited<ReturnType<typeof prepare<Context, HandleOf<R>>>>;
    try {
      checkContentLength(c.req.header('content-length'), cfg.maxBodyBytes);
      let body: RequestBody = { kind: 'none' };
      if (c.req.raw.body) {
        const raw = await readCapped(chunksOf(c.req.raw.body), cfg.maxBodyBytes);
        // Hand the bytes to Hono's body cache, so c.req.json() / text() / arrayBuffer() still work.
        const copy = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength);
        (c.req.bodyCache as Record<string, Promise<unknown>>).arrayBuffer = Promise.resolve(copy);
        body = parseBody(raw, c.req.header('content-type'));
      }
      const url = new URL(c.req.url);
      prepared = await prepare<Context, HandleOf<R>>(
        cfg,
        { method: c.req.method, route: url.pathname + url.search, header: (n) => c.req.header(n), body },
        c,
      );
    } catch (err) {
      if (err instanceof IdempotencyError) return toResponse(problemResponse(err));
      throw err;
    }
    if (prepared.kind === 'pass') return next();
    if (prepared.kind === 'answer') return toResponse(prepared.answer);
    const attempt = prepared.attempt;
    c.set('idempotency' as never, attempt.context as never);
    try {
      await next();
    } catch (err) {
      await attempt.fail(err);
      throw err;
    }
    const res = c.res;
    const read = await readResponse(res, cfg.maxResponseBytes);
    const headers: Record<string, unknown> = {};
    res.headers.forEach((v, k) => {
      headers[k] = v;
    });
    const out = await settle(cfg, attempt, { status: c.error ? 500 : res.status, headers, body: 'body' in read ? read.body : undefined });
    if (out.kind === 'answer') return replace(c, toResponse(out.answer));
    replace(
      c,
      new Response('body' in read ? new Uint8Array(read.body) : read.stream, {
        status: res.status,
        statusText: res.statusText,
        headers: res.headers,
      }),
    );
  };
}
