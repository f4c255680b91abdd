// Profiling aid, not a test and not part of `npm run bench`: the smallest reproduction of the GC
// pathology behind most of pgcoord's native CPU gap on the autocommit path (bench/README.md, "pgcoord's
// overhead"). V8's parser marks a function literal assigned to a property (`obj.f = () => ...`)
// as long-lived, and unoptimized code (interpreter, baseline) allocates it in the old generation.
// When it captures per-call state, the dead old closure keeps that state alive through every
// young-generation GC until the next full GC, and everything it reaches gets promoted. postgres.js
// 3.4.9 does this for every query (`this.resolve = x => ...` in Query's constructor), and that
// constructor runs unoptimized because of its species getter (species-getter.mjs).
//
//   node bench/profile/pretenured-closures.mjs
//
// prints the bytes promoted per call for three ways of giving each object its callback; the
// child processes run with --no-opt, so that all the code stays unoptimized, as Query's
// constructor does under pgcoord's calls.
import { execFileSync } from 'node:child_process';

const shapes = {
  // what postgres.js does: the closure is the right-hand side of a property assignment
  'obj.f = () => ...': 'q.f = (x) => { q.done = true; return r(x); };',
  // the same closure made by a helper: not a literal assigned to a property, so young
  'obj.f = helper(...)': 'q.f = settler(q, r);',
  // the same closure in an object literal: young too
  '{ f: () => ... }': 'q = { a: 1, done: false, f: (x) => { q.done = true; return r(x); } };',
};

if (process.argv[2] === 'child') {
  const shape = process.argv[3];
  const settler = (q, r) => (x) => {
    q.done = true;
    return r(x);
  };
  const make = new Function(
    'settler',
    `return function make(r) { let q = { a: 1, done: false }; ${shape} q.payload = [{ id: 1, note: 'x'.repeat(40) }]; return q; }`,
  )(settler);
  let pending = [];
  let made = 0;
  const tick = () => {
    for (const q of pending) q.f(q.payload);
    pending = [];
    for (let i = 0; i < 16; i++) pending.push(make((x) => x));
    made += 16;
    if (made < 1_000_000) setImmediate(tick);
  };
  setImmediate(tick);
} else {
  for (const [label, shape] of Object.entries(shapes)) {
    const out = execFileSync(process.execPath, ['--no-opt', '--trace-gc-nvp', import.meta.filename, 'child', shape], {
      encoding: 'utf8',
      maxBuffer: 64 << 20,
    });
    let promoted = 0;
    for (const m of out.matchAll(/ promoted=(\d+)/g)) promoted += Number(m[1]);
    console.log(`${label.padEnd(22)} ${(promoted / 1_000_000).toFixed(0).padStart(5)} bytes promoted per call`);
  }
}
