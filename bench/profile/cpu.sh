#!/usr/bin/env bash
# Profiling aid, not a test and not part of `npm run bench`: the client's CPU per request of
# benchmark strategies against the wire-protocol stub, each strategy in processes of its own (no
# JIT state shared with the other side, which skews in-process A/B runs of code that shares
# postgres.js), alternating, ROUNDS times; prints the minimum (interference only ever adds) and the
# median. Within one invocation the minimum repeats to within about 5 µs per request, but the host's
# speed drifts by 10-15 % over tens of minutes: compare strategies in one invocation only. Use it
# where callgrind (icount.sh) is unstable, i.e. for the lock strategies.
#
#   bench/profile/cpu.sh advisory/best advisory/pgcoord
# ROUNDS (5), WARM (5000), REQUESTS (20000), CLIENTS (16). About 10 s per strategy and round.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || { echo "usage: bench/profile/cpu.sh <strategy id>..." >&2; exit 2; }
STUB_PORT=${STUB_PORT:-55432} node bench/profile/stub-server.mjs >/dev/null 2>&1 & # (or the one already running)
stub=$!
trap 'kill $stub 2>/dev/null || true' EXIT
npx esbuild bench/profile/icount.ts --bundle --platform=node --format=esm --packages=external \
  --outfile=bench/.build/icount.mjs --log-level=error
sleep 0.5
for _ in $(seq "${ROUNDS:-5}"); do
  for id in "$@"; do
    echo "$id $(WARM=${WARM:-5000} REQUESTS=${REQUESTS:-20000} node bench/.build/icount.mjs "$id" | sed -n 's/^cpu \([0-9.]*\).*/\1/p')"
  done
done | sort -k1,1 -k2,2n | awk '
  { n[$1]++; v[$1, n[$1]] = $2; all[$1] = all[$1] " " $2 }
  END { for (k in n) printf "%-28s min %6.1f  median %6.1f µs/request  (all:%s)\n", k, v[k, 1], v[k, int((n[k] + 1) / 2)], all[k] }'
