// The built CLI (tsc -p tsconfig.build.json, laid out as the published package: dist, drizzle,
// patches, package.json) runs from plain JS with its shebang, as `npx pgcoord` would run it.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT, runCli } from './fixtures/cli-run.js';

const pkg = mkdtempSync(join(tmpdir(), 'pgcoord-build-'));
afterAll(() => rmSync(pkg, { recursive: true, force: true }));

describe('built pgcoord CLI', () => {
  it('runs from dist/cli/index.js: --version, generate --format sql, doctor finds the shipped patch', { timeout: 120_000 }, async () => {
    execFileSync(
      process.execPath,
      [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.build.json'), '--outDir', join(pkg, 'dist')],
      {
        cwd: ROOT,
        stdio: 'ignore',
      },
    ); // type errors elsewhere in the tree do not stop emitting
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

    const doc = await runCli(['doctor', '--project', ROOT], { entry, env: { DATABASE_URL: undefined } });
    expect(doc.code).toBe(1);
    expect(doc.stdout).toContain(`copy ${join(pkg, 'patches', 'postgres+3.4.9.patch')}`);
  });
});
