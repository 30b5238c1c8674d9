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
KEY=lw_bench_admin_key_0123456789
rm -rf "$DATA"
serve() {
  LAKEWRITER_BOOTSTRAP_API_KEY=$KEY "$bin" serve --data-dir "$DATA" \
    --grpc-addr 127.0.0.1:50071 --http-addr 127.0.0.1:1343 \
    --internal-grpc-addr 127.0.0.1:50072 --log warn >> "$DATA.server.log" 2>&1 &
  server=$!
  for _ in $(seq 150); do curl -sf http://127.0.0.1:1343/health > /dev/null && break; sleep 0.2; done
}
serve
"$bin" loadgen --target http://127.0.0.1:50071 --api-key $KEY --concurrency 32 \
  --items-per-request 500 --duration 60s --unique > "$DATA.loadgen.out" 2>&1 &
loadgen=$!
sleep "$secs"
kill -9 "$server"
wait "$loadgen" || true
acked=$(grep -oE 'items [0-9]+' "$DATA.loadgen.out" | tail -1 | cut -d' ' -f2)
reused=$(cat "$DATA"/wal/LOG* 2> /dev/null | grep -c "reusing log" || true)
serve
curl -sf -X POST -H "X-API-Key: $KEY" 127.0.0.1:1343/api/v1/admin/flush > /dev/null
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
