// Profiling aid, not a test and not part of `npm run bench`: a PostgreSQL wire-protocol stub that
// answers every statement at once with canned rows, so that a client's CPU per request is all a
// run measures (no server work, no fsync, no lock waits). The benchmark's strategies take their
// successful path against it. See bench/profile/ab.ts for the A/B harness.
//   node bench/profile/stub-server.mjs        # listens on 127.0.0.1:55432 (STUB_PORT to change)
import net from 'node:net';

const port = Number(process.env.STUB_PORT ?? 55432);

function msg(type, body) {
  const b = Buffer.alloc(5 + body.length);
  b[0] = type.charCodeAt(0);
  b.writeInt32BE(4 + body.length, 1);
  body.copy(b, 5);
  return b;
}
const cstr = (s) => Buffer.concat([Buffer.from(s), Buffer.from([0])]);
const i16 = (n) => {
  const b = Buffer.alloc(2);
  b.writeInt16BE(n);
  return b;
};
const i32 = (n) => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
};

function rowDesc(cols) {
  const parts = [i16(cols.length)];
  for (const [name, oid] of cols) parts.push(cstr(name), i32(0), i16(0), i32(oid), i16(-1), i32(-1), i16(0));
  return msg('T', Buffer.concat(parts));
}
function dataRow(vals) {
  const parts = [i16(vals.length)];
  for (const v of vals) {
    if (v === null) parts.push(i32(-1));
    else {
      const b = Buffer.from(String(v));
      parts.push(i32(b.length), b);
    }
  }
  return msg('D', Buffer.concat(parts));
}
const complete = (tag) => msg('C', cstr(tag));
const ready = (s) => msg('Z', Buffer.from(s));

// What a statement returns: enough of the benchmark's answers that every strategy takes its
// successful path (the order fits, the update applied), never the data itself.
const ORDER = [
  ['id', 23],
  ['total', 23],
  ['refunded', 23],
  ['version', 23],
];
const ORDER_ROW = [1, 1000000000, 0, 0];
function shape(text) {
  const t = text.trim().toLowerCase();
  if (t.startsWith('begin')) return { cols: null, rows: [], tag: 'BEGIN', tx: 'T' };
  if (t.startsWith('commit')) return { cols: null, rows: [], tag: 'COMMIT', tx: 'I' };
  if (t.startsWith('rollback')) return { cols: null, rows: [], tag: 'ROLLBACK', tx: 'I' };
  if (t.includes('pg_advisory_xact_lock') && t.includes(' as ok')) return { cols: [['ok', 25]], rows: [['true']], tag: 'SELECT 1' };
  if (t.includes('pg_advisory_xact_lock')) return { cols: [['pg_advisory_xact_lock', 2278]], rows: [['']], tag: 'SELECT 1' };
  if (t.startsWith('select') && t.includes('orders')) return { cols: ORDER, rows: [ORDER_ROW], tag: 'SELECT 1' };
  // guardedUpdate's statement ends with its two columns, in this order
  if (t.includes('pgcoord_found'))
    return { cols: [...ORDER, ['pgcoord_applied', 16], ['pgcoord_found', 23]], rows: [[...ORDER_ROW, 't', 1]], tag: 'SELECT 1' };
  if (t.startsWith('with') || t.includes(' returning ')) {
    const cols = [...ORDER, ['fresh', 23], ['done', 23]];
    return { cols, rows: [[...ORDER_ROW, 1, 1]], tag: 'SELECT 1' };
  }
  if (t.startsWith('update')) return { cols: null, rows: [], tag: 'UPDATE 1' };
  if (t.startsWith('insert')) return { cols: null, rows: [], tag: 'INSERT 0 1' };
  if (t.includes('pg_type'))
    return {
      cols: [
        ['oid', 26],
        ['typarray', 26],
      ],
      rows: [],
      tag: 'SELECT 0',
    };
  return { cols: [['x', 25]], rows: [], tag: 'SELECT 0' };
}
const nParams = (text) => {
  let n = 0;
  for (const m of text.matchAll(/\$(\d+)/g)) n = Math.max(n, Number(m[1]));
  return n;
};

let backends = 0;
net
  .createServer((sock) => {
    sock.setNoDelay(true);
    let buf = Buffer.alloc(0);
    let started = false;
    let tx = 'I';
    const statements = new Map();
    let portal = null;
    const failed = false;
    sock.on('error', () => {});
    sock.on('data', (d) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      const out = [];
      for (;;) {
        if (!started) {
          if (buf.length < 4) break;
          const len = buf.readInt32BE(0);
          if (buf.length < len) break;
          const code = buf.readInt32BE(4);
          buf = buf.subarray(len);
          if (code === 80877103) {
            sock.write('N');
            continue;
          } // SSLRequest
          started = true;
          out.push(
            msg('R', i32(0)),
            msg('S', Buffer.concat([cstr('server_version'), cstr('15.0')])),
            msg('S', Buffer.concat([cstr('client_encoding'), cstr('UTF8')])),
            msg('S', Buffer.concat([cstr('integer_datetimes'), cstr('on')])),
            msg('K', Buffer.concat([i32(process.pid), i32(++backends)])), // a cancel secret per connection, as a server gives
            ready('I'),
          );
          continue;
        }
        if (buf.length < 5) break;
        const type = String.fromCharCode(buf[0]);
        const len = buf.readInt32BE(1);
        if (buf.length < 1 + len) break;
        const body = buf.subarray(5, 1 + len);
        buf = buf.subarray(1 + len);
        if (type === 'Q') {
          const text = body.toString('utf8', 0, body.length - 1);
          const s = shape(text);
          if (s.cols) {
            out.push(rowDesc(s.cols));
            for (const r of s.rows) out.push(dataRow(r));
          }
          out.push(complete(s.tag));
          if (s.tx) tx = s.tx;
          out.push(ready(tx));
        } else if (type === 'P') {
          const z1 = body.indexOf(0);
          const name = body.toString('utf8', 0, z1);
          const z2 = body.indexOf(0, z1 + 1);
          const text = body.toString('utf8', z1 + 1, z2);
          statements.set(name, text);
          if (!failed) out.push(msg('1', Buffer.alloc(0)));
        } else if (type === 'D') {
          const name = body.toString('utf8', 1, body.length - 1);
          const text = statements.get(name) ?? '';
          const n = nParams(text);
          out.push(msg('t', Buffer.concat([i16(n), ...Array.from({ length: n }, () => i32(25))])));
          const s = shape(text);
          out.push(s.cols ? rowDesc(s.cols) : msg('n', Buffer.alloc(0)));
        } else if (type === 'B') {
          const z1 = body.indexOf(0);
          const z2 = body.indexOf(0, z1 + 1);
          portal = statements.get(body.toString('utf8', z1 + 1, z2)) ?? '';
          out.push(msg('2', Buffer.alloc(0)));
        } else if (type === 'E') {
          const s = shape(portal ?? '');
          for (const r of s.rows) out.push(dataRow(r));
          out.push(complete(s.tag));
          if (s.tx) tx = s.tx;
        } else if (type === 'S') {
          out.push(ready(tx));
        } else if (type === 'X') {
          sock.end();
        }
      }
      if (out.length) sock.write(Buffer.concat(out));
    });
  })
  .listen(port, '127.0.0.1', () => console.log(`stub server on 127.0.0.1:${port}`));
