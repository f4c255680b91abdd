// The built CLI (tsc -p tsconfig.build.json, laid out as the published package: dist, drizzle,
// patches, package.json) runs from plain JS with its shebang, as `npx pgcoord` would run it.
import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT, runCli } from './fixtures/cli-run.js';

const pkg = mkdtempSync(join(tmpdir(), 'pgcoord-build-'));
afterAll(() => rmSync(pkg, { recursive: true, force: true }));

describe('built pgcoord CLI', () => {
  it('runs from dist/cli/index.js: --version, generate --format sql, doctor finds the shipped patch for each 3.4.x', {
    timeout: 120_000,
  }, async () => {
    // tsc exits 2 on type errors elsewhere in the tree but still emits: only a crash (or a missing
    // entry, checked below) fails here
    const tsc = spawnSync(
      process.execPath,
      [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.build.json'), '--outDir', join(pkg, 'dist')],
      { cwd: ROOT, encoding: 'utf8' },
    );
    expect([0, 2], tsc.stdout + tsc.stderr).toContain(tsc.status);
    for (const f of ['package.json', 'drizzle', 'patches']) cpSync(join(ROOT, f), join(pkg, f), { recursive: true });
    symlinkSync(join(ROOT, 'node_modules'), join(pkg, 'node_modules'), 'dir');
    const entry = join(pkg, 'dist', 'cli', 'index.js');
    expect(readFileSync(entry, 'utf8').split('\n')[0]).toBe('#!/usr/bin/env node');

    const version = await runCli(['--version'], { entry });
    expect(version.code).toBe(0);
    expect(version.stdout.trim()).toBe(JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version);

    const gen = await runCli(['generate', '--format', 'sql', '--out', join(pkg, 'out')], { entry });
    expect(gen.code, gen.stderr).toBe(0);
    expect(readFileSync(join(pkg, 'out', 'pgcoord_idempotency_keys.sql'), 'utf8')).toContain('CREATE TABLE "pgcoord"."idempotency_keys"');

    // doctor points an unpatched 3.4.9 and 3.4.10 at the patches shipped in the package (3.4.10
    // faked: the repo's 3.4.9 with its version changed), and passes the repo's 4.x
    for (const version of ['3.4.9', '3.4.10']) {
      const app = join(pkg, 'apps', version);
      mkdirSync(join(app, 'node_modules'), { recursive: true });
      cpSync(join(ROOT, 'node_modules', 'postgres3'), join(app, 'node_modules', 'postgres'), { recursive: true });
      const manifest = join(app, 'node_modules', 'postgres', 'package.json');
      writeFileSync(manifest, JSON.stringify({ ...JSON.parse(readFileSync(manifest, 'utf8')), version }));
      const doc = await runCli(['doctor', '--project', app], { entry, env: { DATABASE_URL: undefined } });
      expect(doc.code, doc.stderr).toBe(1);
      expect(doc.stdout).toMatch(new RegExp(`^HAZARD postgres\\.js ${version.replaceAll('.', '\\.')} `, 'm'));
      expect(doc.stdout).toContain(`copy ${join(pkg, 'patches', `postgres+${version}.patch`)} into`);
    }
    const v4 = await runCli(['doctor', '--project', ROOT], { entry, env: { DATABASE_URL: undefined } });
    expect(v4.code, v4.stdout + v4.stderr).toBe(0);
    expect(v4.stdout).toMatch(/^OK {5}postgres\.js 4\.\d+\.\d+: no patch needed/m);
  });
});
