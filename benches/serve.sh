# Sourced by the shell benchmarks: starts a release server in the background
# and waits until it answers /health (the Python benchmarks use
# bench_server.py for the same job).
#
#   lw_serve BINARY DATA_DIR PORT_BASE LOG_FILE [serve args...]
#
# Ports: gRPC PORT_BASE, internal gRPC PORT_BASE+1, HTTP PORT_BASE+2. Sets
# LW_PID and LW_HTTP (http://127.0.0.1:PORT_BASE+2). Appends to LOG_FILE.
LW_KEY=lw_bench_admin_key_0123456789

lw_serve() {
  local bin=$1 data=$2 base=$3 log=$4
  shift 4
  LAKEWRITER_BOOTSTRAP_API_KEY=$LW_KEY "$bin" serve --data-dir "$data" \
    --grpc-addr "127.0.0.1:$base" --internal-grpc-addr "127.0.0.1:$((base + 1))" \
    --http-addr "127.0.0.1:$((base + 2))" "$@" >> "$log" 2>&1 &
  LW_PID=$!
  LW_HTTP="http://127.0.0.1:$((base + 2))"
  for _ in $(seq 150); do
    curl -sf "$LW_HTTP/health" > /dev/null && return 0
    sleep 0.2
  done
  echo "server did not become healthy; see $log" >&2
  return 1
}
