// A handler's result as it is stored (JSON with its status), and back.

import { InvalidOptionError } from '../errors.js';
import { describe } from '../text.js';
import { IdempotentFailureError } from './errors.js';
import type { IdempotentResult, StoredResponse } from './options.js';

const JSON_HEADERS = { 'content-type': 'application/json' };

function decodeJson(body: Buffer): unknown {
  return body.length === 0 ? null : JSON.parse(body.toString('utf8'));
}

/** A handler's value as the stored response: JSON, or an error saying why it cannot be stored. */
export function toStored(value: unknown, status: number): StoredResponse {
  let text: string | undefined;
  try {
    text = JSON.stringify(value === undefined ? null : value);
  } catch (err) {
    throw new InvalidOptionError(`the idempotent result must be JSON-serializable, got ${describe(value)}: ${(err as Error).message}`);
  }
  // A function or a symbol has no JSON text at all.
  if (text === undefined) throw new InvalidOptionError(`the idempotent result must be JSON-serializable, got ${describe(value)}`);
  return { status, headers: JSON_HEADERS, body: Buffer.from(text, 'utf8') };
}

/** The result of a stored response (a stored failure is thrown as {@link IdempotentFailureError}). */
export function outcomeOf<T>(key: string, response: StoredResponse, replayed: boolean): IdempotentResult<T> {
  const body = decodeJson(response.body);
  if (response.status >= 400) throw new IdempotentFailureError(key, response.status, body, replayed);
  return { value: body as T, replayed };
}
