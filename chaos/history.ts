// The history: every attempt a worker makes is written to its process's JSONL file twice, a
// `start` line before anything is sent and an `end` line with what the caller was told. Each line
// is written with a synchronous write() before the next request, so a line survives its process
// (SIGKILL included: the kernel has it); an attempt with a start and no end was in flight when its
// process died, and may or may not have committed.

import { closeSync, openSync, readdirSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';

/** What the caller was told: the refund was made, refused (the order would go over its total), or an error. */
export type Outcome = 'applied' | 'refused' | 'error';

/** Written before an attempt sends anything. */
export interface StartLine {
  k: 's';
  /** The refund request id (one refund row at most per id, whatever the attempts). */
  req: string;
  /** 1 for the first attempt of a request; retries and duplicate deliveries of the same id count up. */
  att: number;
  strategy: string;
  runner: string;
  order: number;
  amount: number;
  pid: number;
}

/** Written when the attempt settled. */
export interface EndLine {
  k: 'e';
  req: string;
  att: number;
  out: Outcome;
  /** For errors: a PGCOORD_ code, APP_READ_LOST, STUCK, or UNTYPED:<class>:<driver code>. */
  code?: string;
  /** Answered from an idempotency key's stored result. */
  rep?: boolean;
  /** The message of an error that is not pgcoord's (for the report). */
  msg?: string;
  ms: number;
}

export type Line = StartLine | EndLine;

/** An append-only history file of one process. */
export class HistoryFile {
  private readonly fd: number;
  constructor(path: string) {
    this.fd = openSync(path, 'a');
  }
  write(line: Line): void {
    writeSync(this.fd, `${JSON.stringify(line)}\n`);
  }
  close(): void {
    closeSync(this.fd);
  }
}

/** Every line of every `*.jsonl` file in `dir` (a torn last line of a killed process is skipped). */
export function readHistory(dir: string): Line[] {
  const lines: Line[] = [];
  for (const name of readdirSync(dir).filter((n) => n.endsWith('.jsonl'))) {
    for (const text of readFileSync(join(dir, name), 'utf8').split('\n')) {
      if (!text) continue;
      try {
        lines.push(JSON.parse(text) as Line);
      } catch {
        // a line cut short by SIGKILL mid-write
      }
    }
  }
  return lines;
}
