#!/usr/bin/env bash
# Alternating A/B runs of lakewriter binaries under the same load, one fresh
# server (and data dir) per run, so a disk that is slow for a while hurts
# every binary alike.
#
#   benches/ab_halfload.sh ROUNDS NAME=BINARY [NAME=BINARY ...]
#
# Load: LOADGEN_ARGS (default: 32 clients x 500 spans, 210 req/s open loop for
# 30 s = half of the measured maximum), sent by LOADGEN (default: each run's
# own binary; set it to compare servers with one load generator). Per run it
# prints the load generator's latency line, WAL group commits over 10 / 50 ms (from the
# server's lakewriter_wal_fsync_seconds histogram), the bytes the server
# caused to be written to disk (/proc/PID/io write_bytes), its major page
# faults (code read back from disk; startup included) and the CPU seconds of
# the tokio workers and the WAL writer thread. Files go to $OUT
# (default /tmp/lakewriter-ab): NAME_ROUND.{out,metrics,threads,server.log,rocks.log}.
set -euo pipefail
rounds=$1; shift
OUT=${OUT:-/tmp/lakewriter-ab}
LOADGEN_ARGS=${LOADGEN_ARGS:---concurrency 32 --items-per-request 500 --duration 30s --rate 210}
DATA=$OUT/data
. "$(dirname "$0")/serve.sh"
mkdir -p "$OUT"
bucket() { awk -v le="$2" '$1 == "lakewriter_wal_fsync_seconds_bucket{le=\"" le "\"}" {print $2}' "$1"; }
for r in $(seq "$rounds"); do
  for pair in "$@"; do
    name=${pair%%=*}; bin=${pair#*=}; f=$OUT/${name}_$r
    rm -rf "$DATA" "$f.server.log"
    lw_serve "$bin" "$DATA" 50061 "$f.server.log"
    server=$LW_PID
    # shellcheck disable=SC2086
    "${LOADGEN:-$bin}" loadgen --target http://127.0.0.1:50061 --api-key $LW_KEY \
      --metrics-url "$LW_HTTP/metrics" $LOADGEN_ARGS > "$f.out" 2>&1
    curl -s "$LW_HTTP/metrics" > "$f.metrics"
    majflt=$(awk '{print $12}' "/proc/$server/stat")
    written=$(awk '$1 == "write_bytes:" {printf "%.0f", $2 / 1e6}' "/proc/$server/io")
    for t in /proc/$server/task/*; do
      echo "$(cat "$t/comm") $(cut -d' ' -f14,15 "$t/stat")"
    done | awk '{c[$1] += $2 + $3} END {for (k in c) printf "%.2f %s\n", c[k] / 100, k}' \
      | sort -rn > "$f.threads"
    kill "$server"; wait "$server" || true
    cp "$DATA/wal/LOG" "$f.rocks.log" 2> /dev/null || true
    total=$(awk '$1 == "lakewriter_wal_fsync_seconds_count" {print $2}' "$f.metrics")
    over10=$((total - $(bucket "$f.metrics" 0.01)))
    over50=$((total - $(bucket "$f.metrics" 0.05)))
    cpu=$(awk '$2 ~ /tokio-rt-worker|wal-writer/ {printf "%s %s s  ", $2, $1}' "$f.threads")
    echo "$name round $r: $(grep -E 'ack latency|timer lateness' "$f.out" | tr '\n' ' ') commits $total >10ms $over10 >50ms $over50  disk writes $written MB  major faults $majflt  $cpu"
  done
done
rm -rf "$DATA"
