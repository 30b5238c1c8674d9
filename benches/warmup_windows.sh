#!/usr/bin/env bash
# How a fresh server's latency settles: one new server (fresh data dir), then
# N back-to-back open-loop windows of the same load, one line per window.
#
#   benches/warmup_windows.sh BINARY [WINDOW] [N]     (defaults: 5s, 8)
#
# Load per window: 32 clients x 500 spans at 210 req/s (half load). Per
# window it prints the load generator's latency without its own timer
# lateness, WAL group commits over 2.5 ms, acknowledgements (commit path)
# over 5 ms, the server's page faults (minor, major; cumulative) and its
# resident memory. Server arguments can come from the environment
# (LAKEWRITER_PRETOUCH_MEMORY=0 turns pre-touching off). Files go to $OUT
# (default /tmp/lakewriter-warmup); KEEP_DATA=1 restarts on the data dir of
# the previous run instead of a fresh one.
set -euo pipefail
bin=$1; window=${2:-5s}; n=${3:-8}
OUT=${OUT:-/tmp/lakewriter-warmup}
. "$(dirname "$0")/serve.sh"
mkdir -p "$OUT"; [ -n "${KEEP_DATA:-}" ] || rm -rf "$OUT/data"
lw_serve "$bin" "$OUT/data" 50061 "$OUT/server.log"
metric() { curl -s "$LW_HTTP/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
fsync_fast=0 fsyncs=0 ack_fast=0 acks=0
for i in $(seq "$n"); do
  latency=$("$bin" loadgen --target http://127.0.0.1:50061 --api-key "$LW_KEY" --concurrency 32 \
    --items-per-request 500 --duration "$window" --rate 210 2>&1 | grep 'without client timer' | sed 's/.*ms: //')
  f=$(metric 'lakewriter_wal_fsync_seconds_bucket{le="0.0025"}'); c=$(metric lakewriter_wal_fsync_seconds_count)
  a=$(metric 'lakewriter_ingest_ack_seconds_bucket{le="0.005"}'); ac=$(metric lakewriter_ingest_ack_seconds_count)
  faults=$(awk '{print $10 ", " $12}' "/proc/$LW_PID/stat")
  rss=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$LW_PID/status")
  echo "window $i: $latency | commits > 2.5 ms $(((c - fsyncs) - (f - fsync_fast))) of $((c - fsyncs))" \
    "| acks > 5 ms $(((ac - acks) - (a - ack_fast))) | faults $faults | rss $((rss / 1024)) MiB"
  fsync_fast=$f fsyncs=$c ack_fast=$a acks=$ac
done
kill "$LW_PID"; wait "$LW_PID" || true
