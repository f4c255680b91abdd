// The `pgcoord` command's program: generate (migrations), locks (who holds what), leases (who holds
// which lease, with which fence), queue (queues, their keys, and dead jobs to retry or skip), purge
// (expired idempotency rows), doctor (known hazards).
// Exit codes: 0 ok, 1 failed or hazard found, 2 bad usage.

import { readFileSync } from 'node:fs';
import { Argument, Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { InvalidKeyError, InvalidOptionError } from '../errors.js';
import { listQueueKeys, queueStats } from '../queue/admin.js';
import { InvalidIdentifierError } from '../sql-target.js';
import { describe } from '../text.js';
import { connectionUrl, openConnection } from './connect.js';
import { doctor, formatDoctor } from './doctor.js';
import { CliUsageError } from './errors.js';
import { generateMigration } from './generate.js';
import { formatLeases, leasesJson, listLeases } from './leases.js';
import { candidates, formatLocks, listLocks } from './locks.js';
import { purgeWithProgress } from './purge.js';
import { checkQueueArgument, describeQueue, formatQueueAction, formatQueueStats, queueAction, queueKeysJson } from './queue.js';
import { watchLocks } from './watch.js';

interface Io {
  out(text: string): void;
  err(text: string): void;
}

const stdio: Io = { out: (t) => process.stdout.write(`${t}\n`), err: (t) => process.stderr.write(`${t}\n`) };

function version(): string {
  try {
    return String(JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')).version);
  } catch {
    return 'unknown';
  }
}

function positiveInt(value: string): number {
  if (!/^\d{1,16}$/.test(value) || !Number.isSafeInteger(Number(value)) || Number(value) < 1)
    throw new InvalidArgumentError('expected a positive integer');
  return Number(value);
}

function keyLimit(value: string): number {
  const n = positiveInt(value);
  if (n > 100_000) throw new InvalidArgumentError('expected at most 100000');
  return n;
}

/** `--watch [seconds]`: a number of seconds from 0.1 to 3600, as milliseconds. */
function watchSeconds(value: string): number {
  const s = Number(value);
  if (!/^\d*\.?\d+$/.test(value.trim()) || !Number.isFinite(s) || s < 0.1 || s > 3600)
    throw new InvalidArgumentError('expected a number of seconds from 0.1 to 3600');
  return Math.round(s * 1000);
}

const examples = (lines: string[]) => `\nExamples:\n${lines.map((l) => `  $ ${l}`).join('\n')}\n`;

/** Build the commander program; `exit` receives each command's exit code. */
function build(io: Io, exit: (code: number) => void): Command {
  const program = new Command('pgcoord')
    .description('PostgreSQL as the only coordination point: migrations, lock, lease and queue inspection, purge, and a hazard check')
    .version(version(), '-V, --version')
    .option('--verbose', 'print stack traces of errors')
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ writeOut: (s) => process.stdout.write(s), writeErr: (s) => process.stderr.write(s) })
    .exitOverride();
  program.addHelpText(
    'after',
    examples([
      'pgcoord generate --out drizzle',
      'pgcoord locks --url postgres://app@db/app',
      'pgcoord leases',
      'pgcoord queue refunds --dead',
      'pgcoord purge --dry-run',
      'pgcoord doctor',
    ]),
  );
  const urlOption = () => new Option('--url <url>', 'database URL (default: $DATABASE_URL)');

  program
    .command('generate')
    .description("write the migration that creates pgcoord's tables into your migrations folder")
    .addOption(
      new Option('--format <format>', 'drizzle (drizzle-kit layout) or sql (one plain SQL file)')
        .choices(['drizzle', 'sql'])
        .default('drizzle'),
    )
    .option('--out <dir>', 'migrations folder (default: drizzle, or migrations with --format sql)')
    .option('--schema <name>', 'schema of the idempotency table', 'pgcoord')
    .option('--table <name>', 'name of the idempotency table', 'idempotency_keys')
    .option(
      '--name <name>',
      'migration name (drizzle: tag suffix, default pgcoord; sql: file name, default pgcoord_<table>, or pgcoord_<newest shipped migration> when the folder has that table)',
    )
    .option('--json', 'print the result as JSON')
    .addHelpText(
      'after',
      examples([
        'pgcoord generate --out drizzle                       # then: drizzle-kit migrate',
        'pgcoord generate --schema billing --table idem',
        'pgcoord generate --format sql --out db/migrations --name V7__pgcoord   # Flyway, psql, node-pg-migrate',
      ]),
    )
    .action(async (opts) => {
      const result = await generateMigration({
        out: opts.out,
        format: opts.format,
        schema: opts.schema,
        table: opts.table,
        name: opts.name,
      });
      if (opts.json) io.out(JSON.stringify(result, null, 2));
      else if (result.status === 'up-to-date')
        io.out(
          `up to date: ${result.files.join(', ') || 'the migrations folder'} already create${result.files.length > 1 ? '' : 's'} pgcoord's tables ("${opts.schema}"."${opts.table}" and pgcoord's own); nothing changed`,
        );
      else {
        io.out(`wrote ${result.files.join(', ')} (${result.statements.length} statements)`);
        if (result.schemaExports)
          io.out(
            `export pgcoord's tables from your drizzle schema so drizzle-kit keeps them:\n${result.schemaExports.replace(/^/gm, '  ')}`,
          );
      }
      exit(0);
    });

  program
    .command('locks')
    .description('list advisory locks held and awaited in the database, with holders, waiters and who blocks whom')
    .addOption(urlOption())
    .option('--names <names...>', 'candidate key strings to decode hashed keys (keys pgcoord made from strings)')
    .option('--namespace <namespaces...>', 'namespaces the candidate names may be under')
    .option('--names-file <file>', 'file with one candidate key string per line')
    .option('--json', 'print the locks as JSON (with --watch: one JSON document per line per refresh)')
    .addOption(
      new Option('--watch [seconds]', 'refresh every <seconds> (0.1 to 3600, default 2) until Ctrl-C, with the blocking chains')
        .preset('2')
        .argParser(watchSeconds),
    )
    .option('--count <n>', 'with --watch: stop after n refreshes', positiveInt)
    .addHelpText(
      'after',
      examples([
        'pgcoord locks',
        'pgcoord locks --names order:42 order:43 --namespace refunds',
        'pgcoord locks --names-file keys.txt --json | jq ".[] | select(.status == \\"waiting\\")"',
        'pgcoord locks --watch                 # top-like: holders, waiters, who blocks whom, every 2s',
        'pgcoord locks --watch 0.5 --json | jq -c "{at, held, waiting}"',
      ]),
    )
    .action(async (opts, cmd: Command) => {
      const names: string[] = [...(opts.names ?? [])];
      if (opts.namesFile) {
        try {
          names.push(...readFileSync(opts.namesFile, 'utf8').split(/\r?\n/));
        } catch (err) {
          throw new CliUsageError(`cannot read --names-file ${opts.namesFile}: ${(err as Error).message}`);
        }
      }
      if (opts.count !== undefined && opts.watch === undefined)
        throw new CliUsageError('--count is the number of --watch refreshes: pgcoord locks --watch --count <n>');
      const conn = await openConnection(connectionUrl(cmd.optsWithGlobals().url), 1);
      if (opts.watch !== undefined) {
        // Ctrl-C, SIGTERM, or a reader gone (`| head`) end the watch; the connection is closed, exit 0.
        const stop = new AbortController();
        const onStop = () => stop.abort();
        process.once('SIGINT', onStop);
        process.once('SIGTERM', onStop);
        process.stdout.once('error', onStop);
        try {
          await watchLocks(conn, {
            intervalMs: opts.watch,
            count: opts.count,
            json: opts.json === true,
            tty: process.stdout.isTTY === true,
            names: candidates(names, opts.namespace ?? []),
            write: (text) => {
              if (!stop.signal.aborted) io.out(text);
            },
            signal: stop.signal,
          });
        } finally {
          process.off('SIGINT', onStop);
          process.off('SIGTERM', onStop);
          process.stdout.off('error', onStop);
          await conn.close();
        }
        exit(0);
        return;
      }
      try {
        const locks = await listLocks(conn.runner, { names: candidates(names, opts.namespace ?? []) });
        io.out(opts.json ? JSON.stringify(locks, (_k, v) => (typeof v === 'bigint' ? String(v) : v), 2) : formatLocks(locks));
      } finally {
        await conn.close();
      }
      exit(0);
    });

  program
    .command('leases')
    .description('list the leases in pgcoord.leases: holder, fence, held or free, and when the term ends (database clock)')
    .addOption(urlOption())
    .option('--json', 'print the leases as JSON (fences as decimal strings)')
    .addHelpText('after', examples(['pgcoord leases', 'pgcoord leases --json | jq ".[] | select(.state == \\"held\\") | .name"']))
    .action(async (_opts, cmd: Command) => {
      const opts = cmd.optsWithGlobals();
      const conn = await openConnection(connectionUrl(opts.url), 1);
      try {
        const list = await listLeases(conn.runner);
        io.out(opts.json ? leasesJson(list) : formatLeases(list));
      } finally {
        await conn.close();
      }
      exit(0);
    });

  program
    .command('queue')
    .description(
      "the queues (jobs, keys, running, dead, the oldest job's age); with a name, its keys most behind first; retry or skip a key's dead job",
    )
    .argument('[name]', 'a queue: list its keys, most behind first (state, jobs, head job, attempts, lag, holder, last error)')
    .addArgument(new Argument('[action]', "act on <key>'s dead head job: run it again, or drop it").choices(['retry', 'skip']))
    .argument('[key]', 'the key whose dead job to retry or skip')
    .addOption(urlOption())
    .option('--dead', 'only the keys stopped at a dead job')
    .option('--limit <n>', 'at most this many keys (1 to 100000, default 100)', keyLimit)
    .option('--json', 'print the listing as JSON (job ids as decimal strings)')
    .addHelpText(
      'after',
      examples([
        'pgcoord queue',
        'pgcoord queue refunds --dead',
        'pgcoord queue refunds --limit 20 --json | jq ".[] | select(.lagMs > 60000) | .key"',
        'pgcoord queue refunds retry order:42     # run its dead job again, from attempt 1',
        'pgcoord queue refunds skip order:42      # drop its dead job; the key goes on',
      ]),
    )
    .action(async (name: string | undefined, action: 'retry' | 'skip' | undefined, key: string | undefined, _opts, cmd: Command) => {
      const opts = cmd.optsWithGlobals();
      // Everything the command line can get wrong is refused before connecting.
      if (name !== undefined) checkQueueArgument(name, 'queue');
      if (action !== undefined && key === undefined)
        throw new CliUsageError(`pgcoord queue ${name} ${action} needs the key: pgcoord queue <name> ${action} <key>`);
      if (key !== undefined) checkQueueArgument(key, 'key');
      if (name === undefined && (opts.dead || opts.limit !== undefined))
        throw new CliUsageError(
          `--${opts.dead ? 'dead' : 'limit'} lists one queue's keys: pgcoord queue <name> --${opts.dead ? 'dead' : 'limit <n>'}`,
        );
      if (action !== undefined && (opts.dead || opts.limit !== undefined || opts.json))
        throw new CliUsageError(`--dead, --limit and --json are for the listings, not for ${action}`);
      const conn = await openConnection(connectionUrl(opts.url), 1);
      try {
        if (name === undefined) {
          const stats = await queueStats(conn.runner);
          io.out(opts.json ? JSON.stringify(stats, null, 2) : formatQueueStats(stats));
        } else if (action === undefined) {
          if (opts.json) io.out(queueKeysJson(await listQueueKeys(conn.runner, name, { dead: opts.dead === true, limit: opts.limit })));
          else io.out(await describeQueue(conn.runner, name, { dead: opts.dead === true, limit: opts.limit }));
        } else io.out(formatQueueAction(await queueAction(conn.runner, name, action, key as string)));
      } finally {
        await conn.close();
      }
      exit(0);
    });

  program
    .command('purge')
    .description('delete expired idempotency rows in batches (short transactions, safe next to live traffic)')
    .addOption(urlOption())
    .option('--schema <name>', 'schema of the idempotency table', 'pgcoord')
    .option('--table <name>', 'name of the idempotency table', 'idempotency_keys')
    .option('--batch-size <n>', 'rows per batch', positiveInt, 1000)
    .option('--max-batches <n>', 'stop after this many batches', positiveInt)
    .option('--dry-run', 'only count the rows that would be deleted')
    .option('--json', 'print the result as JSON')
    .addHelpText('after', examples(['pgcoord purge --dry-run', 'pgcoord purge --batch-size 5000 --max-batches 100   # e.g. from cron']))
    .action(async (opts, cmd: Command) => {
      const conn = await openConnection(connectionUrl(cmd.optsWithGlobals().url), 1);
      const stop = new AbortController();
      const onSignal = () => stop.abort();
      process.once('SIGINT', onSignal);
      try {
        const result = await purgeWithProgress(conn.runner, {
          schema: opts.schema,
          table: opts.table,
          batchSize: opts.batchSize,
          maxBatches: opts.maxBatches,
          dryRun: opts.dryRun,
          signal: stop.signal,
          onBatch: (p) => io.err(`batch ${p.batches}: ${p.deleted} of ${p.expired} deleted`),
        });
        if (opts.json) io.out(JSON.stringify(result, null, 2));
        else if (result.dryRun)
          io.out(`dry run: ${result.expired} of ${result.total} rows in ${opts.schema}.${opts.table} are expired and would be deleted`);
        else
          io.out(
            `deleted ${result.deleted} expired rows from ${opts.schema}.${opts.table} in ${result.batches} batch${result.batches === 1 ? '' : 'es'}${stop.signal.aborted ? ' (interrupted)' : ''}`,
          );
      } finally {
        process.off('SIGINT', onSignal);
        await conn.close();
      }
      exit(0);
    });

  program
    .command('doctor')
    .description('check the installed drivers and the database for known hazards, and say what to do (exit 1 when one is found)')
    .addOption(urlOption())
    .option('--project <dir>', 'the app folder whose installed drivers are checked', process.cwd())
    .option('--schema <name>', 'schema of the idempotency table', 'pgcoord')
    .option('--table <name>', 'name of the idempotency table', 'idempotency_keys')
    .option('--json', 'print the report as JSON')
    .addHelpText(
      'after',
      examples([
        'pgcoord doctor                      # drivers, and the server at $DATABASE_URL',
        'pgcoord doctor --url postgres://app@pgbouncer:6432/app --json',
      ]),
    )
    .action(async (opts, cmd: Command) => {
      const url = cmd.optsWithGlobals().url ?? process.env.DATABASE_URL;
      const conn = url ? await openConnection(connectionUrl(url), 3) : undefined;
      try {
        const report = await doctor({ project: opts.project, runner: conn?.runner, schema: opts.schema, table: opts.table });
        io.out(opts.json ? JSON.stringify(report, null, 2) : formatDoctor(report));
        exit(report.hazards > 0 ? 1 : 0);
      } finally {
        await conn?.close();
      }
    });
  return program;
}

function isUsage(err: unknown): boolean {
  return (
    err instanceof CliUsageError ||
    err instanceof InvalidOptionError ||
    err instanceof InvalidIdentifierError ||
    err instanceof InvalidKeyError
  );
}

/**
 * Run the command with `argv` (as in `process.argv`) and resolve to its exit code: 0 ok, 1 failed
 * or hazard found, 2 bad usage. Errors are printed as one line (with the stack under `--verbose`).
 */
export async function main(argv: readonly string[], io: Io = stdio): Promise<number> {
  let code = 0;
  const program = build(io, (c) => {
    code = c;
  });
  try {
    if (argv.length <= 2) {
      program.outputHelp();
      return 2;
    }
    await program.parseAsync([...argv]);
    return code;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return 0;
      return 2; // commander already printed the one-line error
    }
    const verbose = argv.includes('--verbose');
    const message = err instanceof Error && typeof err.message === 'string' ? err.message.split('\n')[0] : describe(err);
    io.err(`pgcoord: ${message}`);
    if (verbose && err instanceof Error) io.err(err.stack ?? '');
    return isUsage(err) ? 2 : 1;
  }
}
