#!/usr/bin/env bash
# Crash check at full load: unique spans from 32 clients, kill -9 the server
# after SECONDS, start it again, flush, and count the spans in the Parquet
# files with DuckDB. Every acknowledged span must be there exactly once:
# rows >= acked, distinct span ids == rows.
#
#   benches/kill9_count.sh BINARY SECONDS
#
# Needs the test venv (./scripts/test creates .venv with duckdb).
set -euo pipefail
bin=$1; secs=$2
root=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-/tmp/lakewriter-kill9}
. "$root/benches/serve.sh"
rm -rf "$DATA" "$DATA.server.log"
lw_serve "$bin" "$DATA" 50071 "$DATA.server.log" --log warn
server=$LW_PID
"$bin" loadgen --target http://127.0.0.1:50071 --api-key $LW_KEY --concurrency 32 \
  --items-per-request 500 --duration 60s --unique > "$DATA.loadgen.out" 2>&1 &
loadgen=$!
sleep "$secs"
kill -9 "$server"
wait "$loadgen" || true
acked=$(grep -oE 'items [0-9]+' "$DATA.loadgen.out" | tail -1 | cut -d' ' -f2)
reused=$(cat "$DATA"/wal/LOG* 2> /dev/null | grep -c "reusing log" || true)
lw_serve "$bin" "$DATA" 50071 "$DATA.server.log" --log warn
server=$LW_PID
curl -sf -X POST -H "X-API-Key: $LW_KEY" "$LW_HTTP/api/v1/admin/flush" > /dev/null
kill "$server"; wait "$server" || true
"$root/.venv/bin/python" - "$DATA" "$acked" "$reused" <<'PY'
import sys, duckdb
data, acked, reused = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows, distinct = duckdb.sql(
    f"SELECT count(*), count(DISTINCT span_id) FROM read_parquet("
    f"'{data}/lake/*/endpoint=spans/**/*.parquet', hive_partitioning = true)"
).fetchall()[0]
ok = rows >= acked and distinct == rows
print(f"acked {acked}  rows {rows}  distinct span ids {distinct}  "
      f"(reused WAL log files before the kill: {reused})  {'OK' if ok else 'LOST OR DUPLICATED'}")
sys.exit(0 if ok else 1)
PY
rm -rf "$DATA" "$DATA.server.log" "$DATA.loadgen.out"
