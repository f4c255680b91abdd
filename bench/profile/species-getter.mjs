// Profiling aid, not a test and not part of `npm run bench`: the smallest reproduction of what
// costs postgres.js, and pgcoord on top of it, most of their client CPU (bench/README.md, "pgcoord's
// overhead"). postgres.js 3.4.9 gives both its `Query extends Promise` and its `Result extends
// Array` a `static get [Symbol.species]()`. With a species *getter*, V8 (Node 20 and 22) aborts
// every optimizing compile of code that constructs the subclass ("dependency change") and tries
// again, forever: wasted compiler work on every core, and the constructor keeps running
// unoptimized (see pretenured-closures.mjs for what that costs in GC). A static data property
// (`static [Symbol.species] = Promise`) means the same to the language and compiles once.
//
//   node bench/profile/species-getter.mjs
import { execFileSync } from 'node:child_process';

const shapes = {
  'static get [Symbol.species]()': 'static get [Symbol.species]() { return Promise; }',
  'static [Symbol.species] = …': 'static [Symbol.species] = Promise;',
};

if (process.argv[2] === 'child') {
  const Sub = new Function(`return class Sub extends Promise { constructor() { super(() => {}); } ${process.argv[3]} }`)();
  let sink;
  const work = () => {
    sink = new Sub();
    return sink;
  };
  let made = 0;
  const tick = () => {
    for (let i = 0; i < 200; i++) work();
    made += 200;
    if (made < 1_000_000) setImmediate(tick);
  };
  tick();
} else {
  for (const [label, member] of Object.entries(shapes)) {
    const out = execFileSync(process.execPath, ['--trace-opt', import.meta.filename, 'child', member], {
      encoding: 'utf8',
      maxBuffer: 64 << 20,
    });
    const aborted = out.match(/aborted optimizing/g)?.length ?? 0;
    const ms = [...out.matchAll(/aborted optimizing.* took ([\d.]+), ([\d.]+), ([\d.]+) ms/g)].reduce(
      (sum, m) => sum + Number(m[1]) + Number(m[2]) + Number(m[3]),
      0,
    );
    console.log(`${label.padEnd(32)} ${String(aborted).padStart(4)} optimizing compiles aborted (${ms.toFixed(0)} ms of compiler time)`);
  }
}
