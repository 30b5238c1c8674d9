"""Query latency over many small files, before and after compaction.

Starts the server (LAKEWRITER_BIN, default the debug build in
$CARGO_TARGET_DIR) with --compact-interval 0 on a temp data dir
(benches/bench_server.py), writes
ROUNDS flushes of SPANS spans each (OTLP/HTTP JSON, all in one UTC hour, so
ROUNDS files in one partition), times two queries, compacts with
POST /api/v1/admin/compact, and times them again. Usage:

    .venv/bin/python benches/compaction.py [ROUNDS] [SPANS]
"""

import os
import statistics
import sys
import time

import requests

from bench_server import TARGET, BenchServer

KEY = "lw_bench_admin_key_0123456789abcdefghij"
T0 = 1763000000000000000

QUERIES = {
    "one trace by id": "SELECT count(*) FROM spans WHERE trace_id = '000000000000000000000000000003e8'",
    "spans per service": "SELECT service_name, count(*) FROM spans GROUP BY 1",
}


def export(s, base, round_, n):
    spans = []
    for i in range(n):
        k = round_ * n + i
        spans.append({"traceId": f"{k // 10 + 1:032x}", "spanId": f"{k + 1:016x}", "name": f"op-{i % 20}",
                      "kind": 1, "startTimeUnixNano": str(T0 + k * 1000),
                      "endTimeUnixNano": str(T0 + k * 1000 + 500),
                      "attributes": [{"key": "n", "value": {"intValue": str(k)}}]})
    doc = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": f"svc-{round_ % 7}"}}]},
        "scopeSpans": [{"spans": spans}]}]}
    r = s.post(base + "/v1/traces", json=doc, headers={"X-API-Key": KEY})
    r.raise_for_status()


def timed(s, base):
    out = {}
    for name, sql in QUERIES.items():
        times = []
        for _ in range(15):
            start = time.time()
            r = s.post(base + "/api/v1/query", json={"sql": sql}, headers={"X-API-Key": KEY})
            times.append((time.time() - start) * 1000)
            r.raise_for_status()
        out[name] = statistics.median(times)
    return out


def lake_files(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".parquet")]
    return len(files), sum(os.path.getsize(f) for f in files)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    binary = os.environ.get("LAKEWRITER_BIN", str(TARGET / "debug" / "lakewriter"))
    server = BenchServer(binary, KEY, "--compact-interval", "0")
    base = server.base
    s = requests.Session()
    s.trust_env = False
    try:
        for r in range(rounds):
            export(s, base, r, n)
            s.post(base + "/api/v1/admin/flush", headers={"X-API-Key": KEY}).raise_for_status()
        lake = os.path.join(server.data, "lake")
        print(f"{rounds} flushes of {n} spans: files, bytes = {lake_files(lake)}")
        print("before:", {k: f"{v:.1f} ms" for k, v in timed(s, base).items()})
        start = time.time()
        r = s.post(base + "/api/v1/admin/compact", headers={"X-API-Key": KEY})
        r.raise_for_status()
        print(f"compact: {r.json()} in {time.time() - start:.2f} s")
        time.sleep(1)
        print(f"after compaction: files, bytes = {lake_files(lake)}")
        print("after:", {k: f"{v:.1f} ms" for k, v in timed(s, base).items()})
    finally:
        server.stop()


if __name__ == "__main__":
    main()
