#!/usr/bin/env python3
"""Query latency with N spans in the lake: lakewriter's span endpoints and SQL
endpoint vs DuckDB over the same Parquet files.

1. Starts a fresh server (temp data dir, fsync on) and loads --spans distinct
   Junjo-like spans with `lakewriter loadgen --unique` (traces of 10 spans,
   4 services), then flushes them all to Parquet.
2. Runs each query --runs times (after 2 warm-up runs) over HTTP and reports
   p50/p99: trace by id, root spans of a service (limit 500), service names,
   and a GROUP BY service_name aggregate over all spans.
3. Runs the same queries in DuckDB (Python package) over the same files.

Usage (from a checkout, after a build):
    .venv/bin/python benches/query_latency.py [--spans 10000000] [--runs 30] [--binary PATH]
"""
import argparse
import json
import os
import statistics
import subprocess
import time
import urllib.request

import duckdb

from bench_server import TARGET, BenchServer

KEY = "lw_query_bench_admin_key_0123456789"


def http(url: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()


def timed(fn, runs: int) -> dict:
    for _ in range(2):
        fn()
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1000)
    ms.sort()
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 2)}


def trace_hex(seed: int, i: int = 0) -> str:
    trace = seed * 1_000_000 + i // 10
    return f"{trace:016x}{trace ^ 0x5A5A:016x}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(TARGET / "debug" / "lakewriter"))
    ap.add_argument("--spans", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    server = BenchServer(a.binary, KEY, "--wal-retention", "0s", prefix="lw-query-")
    data, base = server.data, server.base
    try:
        # Load: requests of 500 distinct spans until --spans are acknowledged.
        started = time.time()
        out = subprocess.run(
            [a.binary, "loadgen", "--target", server.grpc_target, "--api-key", KEY,
             "--unique", "--concurrency", "8", "--items-per-request", "500", "--duration", "3600s",
             "--max-items", str(a.spans), "--json"],
            check=True, capture_output=True, text=True)
        loaded = json.loads(out.stdout)["items"]
        http(f"{base}/api/v1/admin/flush", {})
        load_s = time.time() - started
        files = [str(p) for p in (data / "lake").rglob("*.parquet")]
        lake_bytes = sum(os.path.getsize(f) for f in files)

        # A trace the load certainly wrote: the first worker's first request
        # (loadgen --unique seeds start at 1000).
        trace = trace_hex(1000, 0)
        queries = {
            "trace_by_id": lambda: http(f"{base}/otel/trace/{trace}/nested-spans"),
            "root_spans_limit_500": lambda: http(f"{base}/otel/service/loadgen-0/root-spans?limit=500"),
            "service_names": lambda: http(f"{base}/otel/span-service-names"),
            "group_by_service": lambda: http(f"{base}/api/v1/query", {"sql": (
                "SELECT service_name, count(*) AS n, avg(duration_ns) AS avg_ns "
                "FROM spans GROUP BY service_name ORDER BY service_name")}),
        }
        assert len(json.loads(queries["trace_by_id"]())) == 10, "trace not found"
        lw = {k: timed(f, a.runs) for k, f in queries.items()}

        con = duckdb.connect()
        src = f"read_parquet('{data}/lake/*/endpoint=spans/**/*.parquet', hive_partitioning = true)"
        duck_sql = {
            "trace_by_id": (f"SELECT * FROM {src} WHERE trace_id = ? ORDER BY start_time", [trace]),
            "root_spans_limit_500": (f"SELECT * FROM {src} WHERE service_name = ? AND parent_span_id IS NULL "
                                     "ORDER BY start_time DESC LIMIT 500", ["loadgen-0"]),
            "service_names": (f"SELECT DISTINCT service_name FROM {src} ORDER BY 1", []),
            "group_by_service": (f"SELECT service_name, count(*) AS n, avg(duration_ns) AS avg_ns FROM {src} "
                                 "GROUP BY service_name ORDER BY service_name", []),
        }
        assert con.execute(*duck_sql["trace_by_id"]).to_arrow_table().num_rows == 10
        dk = {k: timed(lambda q=q, p=p: con.execute(q, p).to_arrow_table(), a.runs) for k, (q, p) in duck_sql.items()}
        result = {"spans": loaded, "files": len(files), "lake_bytes": lake_bytes, "load_seconds": round(load_s, 1),
                  "lakewriter": lw, "duckdb": dk}
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{loaded} spans in {len(files)} files, {lake_bytes / 1e6:.0f} MB; loaded + flushed in {load_s:.0f} s")
            print(f"{'query':<24}{'lakewriter p50/p99 ms':>24}{'DuckDB p50/p99 ms':>22}")
            for k in queries:
                print(f"{k:<24}{lw[k]['p50_ms']:>12} / {lw[k]['p99_ms']:<9}{dk[k]['p50_ms']:>10} / {dk[k]['p99_ms']}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
