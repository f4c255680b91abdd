#!/usr/bin/env bash
# Profiling aid, not a test and not part of `npm run bench`: the client's instructions per request
# of benchmark strategies, counted by valgrind (callgrind) against the wire-protocol stub, so the
# figure is the client's work alone. Each strategy runs twice: WARM requests uncounted (V8
# settles), then N1 (in the second run N2) requests counted; the difference divided by N2 - N1 is
# one request's cost, without start-up and shut-down. Left out: V8's optimizing compiler (a
# one-time cost that lands wherever tiering decides). GC normally stays out of the window (the
# young generation is made too large to fill); the bytes each request allocates, which GC later
# pays for, are printed instead ('?' when a GC ran in the window anyway: its cost is then counted).
#
# How far to trust it: node --predictable makes a run repeat exactly, and the autocommit
# strategies (guarded, optimistic) give the same count to 0.1 % from run to run and within a few
# percent across window sizes. The lock strategies do not: under valgrind V8 keeps re-optimizing
# postgres.js's connection code (it does not natively), and the same strategy moves by 10-50 %
# with the window, so their counts say nothing about pgcoord.
#
#   bench/profile/icount.sh                                   # every pgcoord strategy and its twin
#   bench/profile/icount.sh guarded/same guarded/pgcoord      # chosen strategy ids
# WARM (20000), N1 (2000), N2 (6000), CLIENTS (16). About 40 s per strategy on 2 cores.
# SEMI=default counts with V8's own young generation, GC work included (use N1=10000 N2=30000: GCs
# are then frequent enough to average out); that is where postgres.js's pretenured closures show
# (bench/profile/pretenured-closures.mjs).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
warm=${WARM:-20000} n1=${N1:-2000} n2=${N2:-6000}
# SEMI=default: V8's own young generation, so that the GC work a request causes is counted too
semi='--min-semi-space-size=256 --max-semi-space-size=256'
[ "${SEMI:-}" = default ] && semi=''
ids=("$@")
[ ${#ids[@]} -gt 0 ] || ids=(advisory/best advisory/pgcoord advisory/same advisory/pgcoord-callback for-update/same
  for-update/pgcoord guarded/same guarded/pgcoord optimistic/same optimistic/pgcoord)
out=$(mktemp -d)
trap 'kill $stub 2>/dev/null || true; rm -rf "$out"' EXIT
STUB_PORT=${STUB_PORT:-55432} node bench/profile/stub-server.mjs >/dev/null 2>&1 & # (or the one already running)
stub=$!
npx esbuild bench/profile/icount.ts --bundle --platform=node --format=esm --packages=external \
  --outfile=bench/.build/icount.mjs --log-level=error
sleep 0.5

# one run: prints "<instructions counted, compiles left out> <allocated bytes/request>"
run() {
  local id=$1 n=$2 file="$out/$(echo "$1" | tr / _).$2"
  # --predictable: one thread, no time-based heap or compiler decisions, so a run repeats exactly
  WAIT_FOR_SIGNAL=1 WARM=$warm REQUESTS=$n valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$file" \
    node --predictable $semi bench/.build/icount.mjs "$id" \
    >"$file.log" 2>&1 &
  local pid=$!
  until grep -q '^ready' "$file.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$file.log" >&2; return 1; }
    sleep 0.5
  done
  callgrind_control -i on $pid >/dev/null 2>&1
  kill -USR2 $pid
  wait $pid
  local bytes
  bytes=$(sed -n 's/^allocated \([0-9?]*\) bytes.*/\1/p' "$file.log")
  callgrind_annotate --inclusive=yes --threshold=100 "$file" 2>/dev/null | awk -v bytes="$bytes" '
    /PROGRAM TOTALS/ { t = $1; gsub(",", "", t) }
    /Runtime_CompileOptimized\(|Runtime_CompileLazy\(|Runtime_CompileBaseline|Runtime_InstallBaselineCode/ { c = $1; gsub(",", "", c); compiled += c }
    END { printf "%d %s\n", t - compiled, bytes }'
}

printf '%-28s %14s %16s\n' strategy 'instr/request' 'bytes/request'
for id in "${ids[@]}"; do
  run "$id" "$n1" >"$out/a" &
  first=$!
  run "$id" "$n2" >"$out/b" &
  # (not a bare `wait`: it would wait for the stub server started above too)
  wait $first $!
  read -r a bytes <"$out/a"
  read -r b _ <"$out/b"
  printf '%-28s %14d %16s\n' "$id" $(((b - a) / (n2 - n1))) "$bytes"
done
