// Error codes are part of the API: the exported list is exactly the codes the source raises, and
// the README's error table names every one of them (a family wildcard such as
// `PGCOORD_IDEMPOTENCY_*` counts for its members).
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ERROR_CODES, InvalidOptionError, type PgcoordErrorCode } from '../src/index.js';

const root = join(import.meta.dirname, '..');

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : [],
  );
}

describe('error codes', () => {
  it('ERROR_CODES is exactly the codes the source raises', () => {
    const raised = new Set<string>();
    for (const file of sources(join(root, 'src'))) {
      // the list itself does not count as raising
      const text = readFileSync(file, 'utf8').replace(/export const ERROR_CODES = \[[^\]]*\] as const;/, '');
      for (const m of text.matchAll(/'(PGCOORD_[A-Z_]+)'/g)) raised.add(m[1] as string);
    }
    raised.delete('PGCOORD_INTERNAL'); // an HTTP problem code for errors that are not pgcoord's
    raised.delete('PGCOORD_LONG_HOLD'); // a process warning's code (warnOnLongHolds), no error has it
    expect([...raised].sort()).toEqual([...ERROR_CODES].sort());
  });

  it("the README's error table names every code", () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8');
    const table = readme.slice(readme.indexOf('### Errors'));
    const missing = ERROR_CODES.filter((code) => {
      if (table.includes(`\`${code}\``)) return false;
      const family = code.split('_').slice(0, 2).join('_');
      return !table.includes(`\`${family}_*\``);
    });
    expect(missing).toEqual([]);
  });

  it('a switch over err.code is checked by the compiler', () => {
    const label = (code: PgcoordErrorCode): string => {
      switch (code) {
        case 'PGCOORD_INVALID_OPTION':
          return 'bad input';
        // @ts-expect-error: not a pgcoord code
        case 'PGCOORD_NO_SUCH_CODE':
          return 'never';
        default:
          return 'other';
      }
    };
    expect(label(new InvalidOptionError('x').code)).toBe('bad input');
  });
});
