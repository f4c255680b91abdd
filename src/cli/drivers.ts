// Installed-driver checks of `pgcoord doctor`: which postgres.js / node-postgres the app would load,
// and whether a postgres.js 3.x carries pgcoord's fix for its connection-fault bugs (4.x has the
// fixes upstream).

import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** A package as the app at `project` would load it. */
export interface InstalledPackage {
  name: string;
  dir: string;
  version: string;
}

/** The postgres.js releases pgcoord ships a patch for: `patches/postgres+<version>.patch`. */
export const PATCHED_POSTGRES_VERSIONS: readonly string[] = ['3.4.9', '3.4.10'];
/** The first postgres.js major with the connection-fault fixes upstream (no patch needed). */
export const FIXED_POSTGRES_MAJOR = 4;
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

/** The major version of `version` (x.y.z, pre-release suffix ignored), undefined when unparsable. */
export function majorVersion(version: string): number | undefined {
  const m = /^(\d+)\.\d+\.\d+/.exec(version);
  return m ? Number(m[1]) : undefined;
}

/** True when postgres.js `version` has the connection-fault bugs (every 3.x; unparsable versions count as affected). */
export function hasConnectionFaultBugs(version: string): boolean {
  const major = majorVersion(version);
  return major === undefined || major < FIXED_POSTGRES_MAJOR;
}

/** The driver files (of those present) that lack the pgcoord patch marker; `src/` files count even when absent. */
export function unpatchedFiles(pkg: InstalledPackage): string[] {
  return PATCHED_FILES.filter((f) => {
    const path = join(pkg.dir, f);
    if (!existsSync(path)) return f.startsWith('src/');
    return !readFileSync(path, 'utf8').includes(PATCH_MARKER);
  });
}

/**
 * Where this pgcoord install keeps `patches/postgres+<version>.patch` (shipped in the package), or
 * its path in an app's node_modules when not found here; undefined when pgcoord has no patch for
 * that postgres.js version.
 */
export function shippedPatch(version: string): string | undefined {
  if (!PATCHED_POSTGRES_VERSIONS.includes(version)) return undefined;
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = join(dir, 'patches', `postgres+${version}.patch`);
    if (existsSync(candidate)) return candidate;
    dir = dirname(dir);
  }
  return join('node_modules', 'pgcoord', 'patches', `postgres+${version}.patch`);
}
