// The `pgcoord` command's program: generate (migrations), locks (who holds what), purge (expired
// idempotency rows), doctor (known hazards). Exit codes: 0 ok, 1 failed or hazard found, 2 bad usage.

import { readFileSync } from 'node:fs';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { InvalidKeyError, InvalidOptionError } from '../errors.js';
import { InvalidIdentifierError } from '../sql-target.js';
import { connectionUrl, openConnection } from './connect.js';
import { doctor, formatDoctor } from './doctor.js';
import { CliUsageError } from './errors.js';
import { generateMigration } from './generate.js';
import { candidates, formatLocks, listLocks } from './locks.js';
import { purgeWithProgress } from './purge.js';

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
  if (!/^\d+$/.test(value) || Number(value) < 1) throw new InvalidArgumentError('expected a positive integer');
  return Number(value);
}

const examples = (lines: string[]) => `\nExamples:\n${lines.map((l) => `  $ ${l}`).join('\n')}\n`;

/** Build the commander program; `exit` receives each command's exit code. */
function build(io: Io, exit: (code: number) => void): Command {
  const program = new Command('pgcoord')
    .description('PostgreSQL as the only coordination point: migrations, lock inspection, purge, and a hazard check')
    .version(version(), '-V, --version')
    .option('--verbose', 'print stack traces of errors')
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ writeOut: (s) => process.stdout.write(s), writeErr: (s) => process.stderr.write(s) })
    .exitOverride();
  program.addHelpText(
    'after',
    examples(['pgcoord generate --out drizzle', 'pgcoord locks --url postgres://app@db/app', 'pgcoord purge --dry-run', 'pgcoord doctor']),
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
    .option('--name <name>', 'migration name (drizzle: tag suffix, default pgcoord; sql: file name, default pgcoord_<table>)')
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
          `up to date: ${result.files[0] ?? 'the migrations folder'} already creates "${opts.schema}"."${opts.table}"; nothing changed`,
        );
      else {
        io.out(`wrote ${result.files.join(', ')} (${result.statements.length} statements)`);
        if (result.schemaExports)
          io.out(`export pgcoord's table from your drizzle schema so drizzle-kit keeps it:\n${result.schemaExports.replace(/^/gm, '  ')}`);
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
    .option('--json', 'print the locks as JSON')
    .addHelpText(
      'after',
      examples([
        'pgcoord locks',
        'pgcoord locks --names order:42 order:43 --namespace refunds',
        'pgcoord locks --names-file keys.txt --json | jq ".[] | select(.status == \\"waiting\\")"',
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
      const conn = await openConnection(connectionUrl(cmd.optsWithGlobals().url), 1);
      try {
        const locks = await listLocks(conn.runner, { names: candidates(names, opts.namespace ?? []) });
        io.out(opts.json ? JSON.stringify(locks, (_k, v) => (typeof v === 'bigint' ? String(v) : v), 2) : formatLocks(locks));
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
    const message = err instanceof Error ? err.message.split('\n')[0] : String(err);
    io.err(`pgcoord: ${message}`);
    if (verbose && err instanceof Error) io.err(err.stack ?? '');
    return isUsage(err) ? 2 : 1;
  }
}
