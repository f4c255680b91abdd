// `pgcoord queue`: the keyed queues at a glance (jobs, keys, running, dead, the oldest job's age),
// one queue's keys most behind first, and the two ways out of a dead job: retry or skip. All ages
// are on the database clock. The reads and actions are src/queue/admin.ts's; this file checks the
// command's input, formats the answers and says plainly when there is nothing to act on.

import { type Runner, runStatement } from '../driver/index.js';
import { listQueueKeys, type QueueKeyInfo, type QueueStats, queueStats, retryDeadJob, skipDeadJob } from '../queue/admin.js';
import { checkName } from '../queue/enqueue.js';
import { queueError } from '../queue/errors.js';
import { JOBS } from '../queue/schema.js';
import { describe, textProblem } from '../text.js';
import { CliFailedError, CliUsageError } from './errors.js';
import { duration, table } from './output.js';

/** How much of a job's last error the key table shows (the JSON has all of it). */
const ERROR_WIDTH = 60;

/**
 * A queue or key name given on the command line, checked by the rule pgcoord's queue functions
 * apply (1 to 255 characters, no NUL, no lone surrogate), so that a bad one is a usage error (exit
 * 2) before any connection is made.
 *
 * @throws {@link CliUsageError} saying what is wrong with the name.
 * @example
 * checkQueueArgument('refunds', 'queue'); // 'refunds'
 * checkQueueArgument('', 'key');          // throws: invalid key name: it is empty
 */
export function checkQueueArgument(value: unknown, what: 'queue' | 'key'): string {
  if (typeof value !== 'string') throw new CliUsageError(`invalid ${what} name: expected a string, got ${describe(value)}`);
  if (value.length === 0) throw new CliUsageError(`invalid ${what} name: it is empty`);
  if (value.length > 255)
    throw new CliUsageError(`invalid ${what} name ${describe(value, 40)}: ${value.length} characters, at most 255 allowed`);
  const problem = textProblem(value);
  if (problem !== undefined) throw new CliUsageError(`invalid ${what} name ${describe(value, 40)}: it ${problem}`);
  return checkName(value, what); // the library's own rule, should it ever say more
}

// A name, label or error written by hand may hold line breaks or other control characters: shown quoted.
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it looks for
const printable = (text: string) => (/[\u0000-\u001f\u007f]/.test(text) ? JSON.stringify(text) : text);

/** An error as one short line: whitespace runs folded, cut at `width` characters with an ellipsis. */
function oneLine(text: string, width: number): string {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it replaces
  const flat = text.replace(/[\s\u0000-\u001f\u007f]+/g, ' ').trim();
  return flat.length > width ? `${flat.slice(0, width - 1)}…` : flat;
}

/**
 * A readable table of {@link queueStats}'s result (one line per queue), or a line saying no job is
 * queued.
 *
 * @example
 * console.log(formatQueueStats(await queueStats(sql)));
 * // QUEUE    JOBS  KEYS  RUNNING  DEAD  OLDEST
 * // refunds  12    5     1        1     3m12s
 */
export function formatQueueStats(stats: readonly QueueStats[]): string {
  if (stats.length === 0) return `no queued jobs in ${JOBS}`;
  return table(
    ['QUEUE', 'JOBS', 'KEYS', 'RUNNING', 'DEAD', 'OLDEST'],
    stats.map((s) => [printable(s.queue), String(s.jobs), String(s.keys), String(s.running), String(s.dead), duration(s.oldestMs)]),
  );
}

/**
 * A readable table of {@link listQueueKeys}'s result, most behind first as it comes: each key's
 * state, jobs, head job id, its attempts, the key's lag, who holds it and the head's last error
 * (cut to one short line). A line saying there are none when the list is empty.
 *
 * @example
 * console.log(formatQueueKeys(await listQueueKeys(sql, 'refunds', { dead: true })));
 * // KEY       STATE  JOBS  HEAD  ATTEMPTS  LAG    HOLDER  LAST ERROR
 * // order:42  dead   3     1042  5         2h5m   -       Error: card declined
 */
export function formatQueueKeys(keys: readonly QueueKeyInfo[], options: { queue?: string; dead?: boolean } = {}): string {
  if (keys.length === 0) {
    const where = options.queue === undefined ? '' : ` in queue ${JSON.stringify(options.queue)}`;
    return options.dead ? `no dead keys${where}` : `no queued jobs${where}`;
  }
  return table(
    ['KEY', 'STATE', 'JOBS', 'HEAD', 'ATTEMPTS', 'LAG', 'HOLDER', 'LAST ERROR'],
    keys.map((k) => [
      printable(k.key),
      k.state,
      String(k.jobs),
      String(k.headId),
      String(k.attempts),
      duration(k.lagMs),
      k.holder === null ? '-' : printable(k.holder),
      k.lastError === null ? '-' : oneLine(k.lastError, ERROR_WIDTH),
    ]),
  );
}

/** {@link listQueueKeys}'s result as JSON text: head ids as decimal strings (they may exceed 2^53). */
export function queueKeysJson(keys: readonly QueueKeyInfo[]): string {
  return JSON.stringify(
    keys.map((k) => ({ ...k, headId: String(k.headId) })),
    null,
    2,
  );
}

/** `pgcoord queue <name>`'s text: a summary line, the key table, and a note when `limit` cut it. */
export async function describeQueue(runner: Runner, queue: string, options: { dead?: boolean; limit?: number } = {}): Promise<string> {
  const limit = options.limit ?? 100;
  const keys = await listQueueKeys(runner, queue, { dead: options.dead ?? false, limit });
  const [stats] = await queueStats(runner, queue);
  const lines: string[] = [];
  if (stats)
    lines.push(
      `queue ${JSON.stringify(queue)}: ${stats.jobs} job${stats.jobs === 1 ? '' : 's'} on ${stats.keys} key${stats.keys === 1 ? '' : 's'}, ${stats.running} running, ${stats.dead} dead, oldest ${duration(stats.oldestMs)}`,
      '',
    );
  lines.push(formatQueueKeys(keys, { queue, dead: options.dead }));
  const total = stats ? (options.dead ? stats.dead : stats.keys) : 0;
  if (keys.length === limit && total > limit)
    lines.push(`(the ${limit} most behind of ${total} ${options.dead ? 'dead ' : ''}keys: --limit to see more)`);
  return lines.join('\n');
}

/** What a retry or skip did, for the command's output. */
export interface QueueActionResult {
  queue: string;
  key: string;
  action: 'retry' | 'skip';
  /** The id of the job retried or skipped. */
  jobId: bigint;
}

// The key's head as it is now, to say why there was nothing to retry or skip.
const HEAD = `select j.id::text as id, j.state from ${JOBS} j where j.queue = $1 and j.key = $2 order by j.id limit 1`;

async function notDead(runner: Runner, queue: string, key: string, action: 'retry' | 'skip'): Promise<CliFailedError> {
  const rows = await runStatement(runner, { text: HEAD, params: [queue, key] }, {}, true).catch((err: unknown) => {
    throw queueError(err);
  });
  const head = rows[0];
  const what = `queue ${JSON.stringify(queue)} key ${JSON.stringify(key)}`;
  const why =
    head === undefined
      ? 'has no queued jobs'
      : head.state === 'dead'
        ? `has dead job ${String(head.id)} at its head now (another ${action} or a worker raced this one); run again`
        : `has job ${String(head.id)} at its head and it is not dead`;
  return new CliFailedError(`${what} ${why}: nothing to ${action} (\`pgcoord queue ${queue} --dead\` lists the dead keys)`);
}

/**
 * Retry (run again from attempt 1, still ahead of the key's later jobs) or skip (drop, never run)
 * the dead job at the head of `key`.
 *
 * @throws {@link CliFailedError} when the key's head is not a dead job (the message says what it is).
 * @example
 * await queueAction(sql, 'refunds', 'retry', 'order:42');
 */
export async function queueAction(runner: Runner, queue: string, action: 'retry' | 'skip', key: string): Promise<QueueActionResult> {
  const id = await (action === 'retry' ? retryDeadJob : skipDeadJob)(runner, queue, key);
  if (id !== undefined) return { queue, key, action, jobId: id };
  throw await notDead(runner, queue, key, action);
}

/** One line saying what {@link queueAction} did. */
export function formatQueueAction(result: QueueActionResult): string {
  const what = `queue ${JSON.stringify(result.queue)} key ${JSON.stringify(result.key)}`;
  return result.action === 'retry'
    ? `${what}: dead job ${result.jobId} will run again (from attempt 1, before the key's later jobs)`
    : `${what}: skipped dead job ${result.jobId}; the key goes on with its next job`;
}
