// Express (4 and 5) middleware. The handler's response is held back (write/end are buffered)
// until its outcome is committed, so a client never sees a response whose effects roll back.

import type { NextFunction, Request, RequestHandler, Response } from 'express';
import type { Runner } from '../driver/index.js';
import { InvalidOptionError } from '../errors.js';
import type { HandleOf } from '../handles.js';
import { IdempotencyError } from './errors.js';
import type { RequestBody } from './fingerprint.js';
import {
  checkContentLength,
  type HttpAnswer,
  type HttpIdempotencyOptions,
  httpConfig,
  isJson,
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

// The body as the fingerprint sees it. A defined `req.body` proves nothing: body-parser 1.x
// (express 4) sets `req.body = {}` for every body it does not parse, and any middleware may set
// it. Only a body-parser that consumed the stream (it sets `req._body`, and the stream has ended)
// gave `req.body` from the bytes; otherwise the bytes are still there and are read here.
async function requestBody(req: Request, limit: number): Promise<RequestBody> {
  checkContentLength(req.headers['content-length'], limit);
  const parsedByApp = (req as { _body?: unknown })._body === true || req.readableEnded;
  if (parsedByApp) return appBody(req);
  const hasBody =
    req.headers['content-length'] !== undefined
      ? Number(req.headers['content-length']) > 0
      : req.headers['transfer-encoding'] !== undefined;
  if (!hasBody) return { kind: 'none' };
  const raw = await readCapped(req, limit);
  const body = parseBody(raw, req.headers['content-type']);
  // The handler gets the body pgcoord read (parsed JSON, or a Buffer) unless something else set
  // req.body (body-parser 1.x's empty placeholder does not count). `_body` tells body parsers that
  // run later that the stream is consumed (body-parser 2.x sees the ended stream).
  if (req.body === undefined || isEmptyPlaceholder(req.body)) req.body = body.kind === 'json' ? body.value : raw;
  (req as { _body?: boolean })._body = true;
  return body;
}

function isEmptyPlaceholder(value: unknown): boolean {
  return (
    value !== null && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype && Object.keys(value).length === 0
  );
}

// A body the app's parser produced from the (now consumed) stream: JSON when the content type is
// JSON, bytes when the parser left bytes or text (express.raw(), express.text()), else the value
// as another parser made it (express.urlencoded(), ...).
function appBody(req: Request): RequestBody {
  const body: unknown = req.body;
  // body-parser reads a declared empty body too (express.json() then gives {}): it had no bytes.
  if (req.headers['content-length'] === '0') return { kind: 'none' };
  if (body === undefined) {
    // The stream was consumed and nothing says what it held: refuse rather than call it empty.
    throw new InvalidOptionError(
      'the request body was consumed before the idempotency middleware and left no req.body: put the middleware before that consumer',
    );
  }
  if (Buffer.isBuffer(body)) return body.length === 0 ? { kind: 'none' } : { kind: 'bytes', bytes: body };
  if (isJson(req.headers['content-type'])) return { kind: 'json', value: body };
  if (typeof body === 'string') return body.length === 0 ? { kind: 'none' } : { kind: 'bytes', bytes: body };
  return { kind: 'parsed', value: body };
}

function capture<H>(res: Response, attempt: IdempotentAttempt<H>, cfg: ReturnType<typeof httpConfig<Request>>): void {
  const chunks: Buffer[] = [];
  let size = 0;
  let overflow = false;
  const original = { write: res.write, end: res.end, writeHead: res.writeHead };
  let ended = false; // end() was called (settled there) or the response closed first (failed here)
  const restore = () => {
    res.write = original.write;
    res.end = original.end;
    res.writeHead = original.writeHead;
  };
  // The response closed before the handler ended it: the handler destroyed it (res.destroy()), or
  // the client went away. Nothing can reach the client any more and express gives no other sign of
  // the handler being done (unlike fastify, whose reply always goes through onSend), so end the
  // attempt here: roll back / release, never leave the transaction open and the key held. A later
  // end() from the handler sends its response untouched (to a closed socket) and stores nothing;
  // its statements after this point fail (the transaction is over), and a retry runs afresh.
  res.once('close', () => {
    if (ended) return;
    ended = true;
    restore();
    void attempt.fail(new Error('the response was closed before it was sent'));
  });
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
      ended = true;
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
 * Answers: 400 missing / invalid key, no scope or an invalid one, invalid JSON; 409 + Retry-After
 * while the same key is in flight (after `waitMs`); 422 same key with another request; 413 body
 * over `maxBodyBytes`; all problem+json. A replay restores status, allow-listed headers and exact
 * body, with `Idempotent-Replayed: true`.
 *
 * The body is fingerprinted from its bytes: the middleware reads it itself (and sets `req.body` to
 * the parsed JSON or a Buffer) unless a body parser before it consumed the stream, in which case
 * that parser's `req.body` is used (as JSON for a JSON content type, as bytes for `express.raw()` /
 * `express.text()`). A response closed before it was sent (`res.destroy()`, a client gone) ends the
 * attempt: its work rolls back and the key stays retryable.
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
