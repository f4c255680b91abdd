// Express (4 and 5) middleware. The handler's response is held back (write/end are buffered)
// until its outcome is committed, so a client never sees a response whose effects roll back.

import type { NextFunction, Request, RequestHandler, Response } from 'express';
import type { HandleOf } from '../handles.js';
import type { Runner } from '../runner.js';
import { IdempotencyError } from './errors.js';
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
import type { IdempotentAttempt, IdempotentContext } from './run.js';

declare module 'express-serve-static-core' {
  interface Request {
    /** Set by pgcoord's idempotency middleware while the handler runs under a claimed key. */
    idempotency?: IdempotentContext<unknown>;
  }
}

function send(res: Response, answer: HttpAnswer): void {
  res.status(answer.status);
  for (const [k, v] of Object.entries(answer.headers)) res.setHeader(k, v);
  res.end(answer.body);
}

async function requestBody(req: Request, limit: number): Promise<unknown> {
  checkContentLength(req.headers['content-length'], limit);
  if (req.body !== undefined) {
    // Parsed by the app's own body parser (its limit applies; the declared length was checked).
    return req.body;
  }
  const hasBody =
    req.headers['content-length'] !== undefined
      ? Number(req.headers['content-length']) > 0
      : req.headers['transfer-encoding'] !== undefined;
  if (!hasBody) return undefined;
  const raw = await readCapped(req, limit);
  const body = parseBody(raw, req.headers['content-type']);
  req.body = body; // the handler gets the body pgcoord read (parsed JSON, or a Buffer)
  return body;
}

function capture<H>(res: Response, attempt: IdempotentAttempt<H>, cfg: ReturnType<typeof httpConfig<Request>>): void {
  const chunks: Buffer[] = [];
  let size = 0;
  let overflow = false;
  const original = { write: res.write, end: res.end, writeHead: res.writeHead };
  const restore = () => {
    res.write = original.write;
    res.end = original.end;
    res.writeHead = original.writeHead;
  };
  const push = (chunk: unknown, encoding?: unknown) => {
    if (chunk === undefined || chunk === null || typeof chunk === 'function') return;
    const b = Buffer.isBuffer(chunk)
      ? chunk
      : chunk instanceof Uint8Array
        ? Buffer.from(chunk)
        : Buffer.from(String(chunk), typeof encoding === 'string' ? (encoding as BufferEncoding) : 'utf8');
    size += b.length;
    if (size > cfg.maxResponseBytes) overflow = true;
    chunks.push(b);
  };
  // One object literal, not three `res.x = function`: V8 allocates a function literal assigned to a
  // property in the old generation (when the code is not optimized yet), and these capture this
  // request's state (res, the body so far), which would then outlive the request until a full GC
  // (bench/profile/pretenured-closures.mjs).
  Object.assign(res, {
    writeHead(status: number, ...rest: unknown[]) {
      res.statusCode = status;
      const headers = rest.find((x) => x && typeof x === 'object');
      if (Array.isArray(headers)) for (let i = 0; i + 1 < headers.length; i += 2) res.setHeader(String(headers[i]), headers[i + 1]);
      else if (headers) for (const [k, v] of Object.entries(headers)) res.setHeader(k, v as string);
      return res;
    },
    write(chunk: unknown, encoding?: unknown, cb?: unknown) {
      push(chunk, encoding);
      const done = typeof encoding === 'function' ? encoding : cb;
      if (typeof done === 'function') queueMicrotask(() => (done as () => void)());
      return true;
    },
    end(chunk?: unknown, encoding?: unknown, cb?: unknown) {
      push(chunk, encoding);
      restore();
      const body = Buffer.concat(chunks);
      const done = [chunk, encoding, cb].find((x) => typeof x === 'function') as (() => void) | undefined;
      void settle(cfg, attempt, { status: res.statusCode, headers: res.getHeaders(), body: overflow ? undefined : body }).then(
        (out) => {
          if (out.kind === 'original') {
            res.end(body, done);
            return;
          }
          for (const name of res.getHeaderNames()) res.removeHeader(name);
          send(res, out.answer);
        },
        () => {
          for (const name of res.getHeaderNames()) res.removeHeader(name);
          send(res, problemResponse(undefined));
        },
      );
      return res;
    },
  });
}

/**
 * Express middleware for the Idempotency-Key header. Put it before the routes it protects; the
 * handler finds the claimed key's context on `req.idempotency` (in transactional mode,
 * `req.idempotency.tx` is the transaction to do the request's database work in: it commits
 * together with the stored response).
 *
 * Answers: 400 missing / invalid key, 409 + Retry-After while the same key is in flight (after
 * `waitMs`), 422 same key with another request, 413 body over `maxBodyBytes`, all problem+json.
 * A replay restores status, allow-listed headers and exact body, with `Idempotent-Replayed: true`.
 *
 * @example
 * app.post('/charges', idempotencyExpress(sql, { scope: (req) => req.get('x-tenant') }), async (req, res) => {
 *   const tx = req.idempotency!.tx as postgres.TransactionSql;
 *   const [c] = await tx`insert into charges (amount) values (${req.body.amount}) returning id`;
 *   res.status(201).location(`/charges/${c.id}`).json(c);
 * });
 */
export function idempotencyExpress<R extends Runner>(runner: R, options: HttpIdempotencyOptions<Request>): RequestHandler {
  const cfg = httpConfig<Request>(runner, options);
  return async (req: Request, res: Response, next: NextFunction) => {
    try {
      if (!cfg.methods.has(req.method.toUpperCase())) return next();
      const body = await requestBody(req, cfg.maxBodyBytes);
      const prepared = await prepare<Request, HandleOf<R>>(
        cfg,
        { method: req.method, route: req.originalUrl, header: (n) => req.headers[n], body },
        req,
      );
      if (prepared.kind === 'pass') return next();
      if (prepared.kind === 'answer') return send(res, prepared.answer);
      capture(res, prepared.attempt, cfg);
      req.idempotency = prepared.attempt.context as IdempotentContext<unknown>;
      next();
    } catch (err) {
      if (err instanceof IdempotencyError) return send(res, problemResponse(err));
      next(err);
    }
  };
}
