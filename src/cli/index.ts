#!/usr/bin/env node
// Entry of the `pgcoord` command (package.json `bin`). Everything else is in main.ts.

import { main } from './main.js';

main(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`pgcoord: ${String(err)}\n`);
    process.exitCode = 1;
  },
);
