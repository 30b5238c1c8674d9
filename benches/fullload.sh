#!/usr/bin/env bash
# Full-load runs: one fresh server per client count, closed loop, 500-span
# requests for 20 s; prints the load generator's summary of each.
#
#   benches/fullload.sh [BINARY]   (default: the release build)
set -euo pipefail
B=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/lakewriter-target}/release/lakewriter}
cd "$(dirname "$0")/.."
. benches/serve.sh
DATA=${DATA:-/tmp/lakewriter-fullload}
for c in 32 128; do
  rm -rf "$DATA"
  lw_serve "$B" "$DATA" 50061 "$DATA.log"
  echo "== $c clients"
  "$B" loadgen --target http://127.0.0.1:50061 --api-key "$LW_KEY" --metrics-url "$LW_HTTP/metrics" \
    --concurrency "$c" --items-per-request 500 --duration 20s 2>&1 | grep -v '^  t='
  kill "$LW_PID"; wait "$LW_PID" || true
done
rm -rf "$DATA" "$DATA.log"
