// Installed-driver checks of `pgcoord doctor`: which postgres.js / node-postgres the app would load,
// and whether postgres.js carries pgcoord's fix for its connection-fault bugs.

import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** A package as the app at `project` would load it. */
export interface InstalledPackage {
  name: string;
  dir: string;
  version: string;
}

/** The last postgres.js release with the connection-fault bugs the pgcoord patch fixes. */
export const LAST_UNFIXED_POSTGRES = '3.4.9';
/** The marker every file touched by the patch contains. */
export const PATCH_MARKER = 'pgcoord patch';
const PATCHED_FILES = ['src/connection.js', 'src/index.js', 'cjs/src/connection.js', 'cjs/src/index.js'];

/** Find `name` the way Node would from `project`: `node_modules/<name>` in it or any parent folder. */
export function findPackage(project: string, name: string): InstalledPackage | undefined {
  let dir = resolve(project);
  for (;;) {
    const pkgDir = join(dir, 'node_modules', name);
    const manifest = join(pkgDir, 'package.json');
    if (existsSync(manifest)) {
      try {
        const version = String((JSON.parse(readFileSync(manifest, 'utf8')) as { version?: unknown }).version ?? '');
        return { name, dir: pkgDir, version };
      } catch {
        return { name, dir: pkgDir, version: '' };
      }
    }
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

/** True when `version` (x.y.z, pre-release suffix ignored) is at most `limit`. Unparsable versions count as affected. */
export function versionAtMost(version: string, limit: string): boolean {
  const parse = (v: string) => /^(\d+)\.(\d+)\.(\d+)/.exec(v)?.slice(1, 4).map(Number);
  const a = parse(version);
  const b = parse(limit);
  if (!a || !b) return true;
  for (let i = 0; i < 3; i++) if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) < (b[i] ?? 0);
  return true;
}

/** The driver files (of those present) that lack the pgcoord patch marker; `src/` files count even when absent. */
export function unpatchedFiles(pkg: InstalledPackage): string[] {
  return PATCHED_FILES.filter((f) => {
    const path = join(pkg.dir, f);
    if (!existsSync(path)) return f.startsWith('src/');
    return !readFileSync(path, 'utf8').includes(PATCH_MARKER);
  });
}

/** Where this pgcoord install keeps `patches/postgres+3.4.9.patch` (shipped in the package), if found. */
export function shippedPatch(): string | undefined {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = join(dir, 'patches', `postgres+${LAST_UNFIXED_POSTGRES}.patch`);
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  return undefined;
}
