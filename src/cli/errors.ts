// Errors of the `pgcoord` command and its functions. A UsageError exits with code 2 (bad usage);
// every other error exits with code 1.

import { PgcoordError } from '../errors.js';

/**
 * Bad usage of the command or of a CLI function: an invalid identifier, a missing connection URL,
 * an option out of range. The command exits with code 2 and prints the message on one line.
 *
 * @example
 * await generateMigration({ out: 'drizzle', table: 'x; drop table y' }); // throws CliUsageError
 */
export class CliUsageError extends PgcoordError {
  constructor(message: string) {
    super('PGCOORD_CLI_USAGE', message);
  }
}

/**
 * The command could not do what was asked (a file in the way, a missing tool, a failed query).
 * The command exits with code 1.
 */
export class CliFailedError extends PgcoordError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('PGCOORD_CLI_FAILED', message, options);
  }
}
