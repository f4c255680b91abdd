// Text that becomes an identity (a lock key, an idempotency scope or key, a phase name) must map
// to exactly one string on the server. Two things break that:
// - a lone surrogate (ill-formed UTF-16): the drivers encode it as U+FFFD, so 'k\uD800',
//   'k\uDFFF' and 'k\uFFFD' would all be the same key on the server;
// - NUL: Postgres text cannot hold it, and pgcoord's own encodings must not be ambiguous.
// Such input is refused before any statement is sent.

/** Why `s` cannot serve as an identity, or undefined when it can. */
export function textProblem(s: string): string | undefined {
  if (s.includes('\0')) return 'contains NUL (U+0000)';
  if (!(s as string & { isWellFormed(): boolean }).isWellFormed()) return 'is not well-formed UTF-16 (it holds a lone surrogate)';
  return undefined;
}

/**
 * A short, safe description of any value for an error message: never throws (BigInt, symbols,
 * null-prototype objects, cyclic values, throwing getters and proxies included) and never returns
 * more than `max` characters.
 */
export function describe(value: unknown, max = 80): string {
  let s: string;
  try {
    switch (typeof value) {
      case 'string':
        s = JSON.stringify(value.length > max ? value.slice(0, max) : value); // never a copy of a huge string
        break;
      case 'bigint':
        s = `${value}n`;
        break;
      case 'symbol':
        s = value.toString();
        break;
      case 'function':
        s = `function ${value.name || '(anonymous)'}`;
        break;
      case 'object':
        if (value === null) s = 'null';
        else if (Array.isArray(value)) s = `an array of ${value.length}`;
        else {
          const proto = Object.getPrototypeOf(value) as { constructor?: { name?: unknown } } | null;
          const name =
            proto === null ? 'null-prototype object' : typeof proto.constructor?.name === 'string' ? proto.constructor.name : 'object';
          s = `a ${name}`;
        }
        break;
      default:
        s = String(value);
    }
  } catch {
    s = `a ${typeof value}`;
  }
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

/**
 * A flat copy of `s` that shares no memory with the string it came from. A slice or a
 * concatenation of a large string keeps that whole string alive in V8: anything a long-lived cache
 * keeps from user input is copied first, so the cache holds what it counts and nothing more.
 */
export function ownCopy(s: string): string {
  return JSON.parse(JSON.stringify(s)) as string;
}
