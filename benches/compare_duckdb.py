#!/usr/bin/env python3
"""lakewriter vs the design it replaces: spans inserted into DuckDB row by row.

The old Junjo backend indexed every span into DuckDB with `executemany`. This
script measures, on this machine and in one run:

1. lakewriter: a fresh server (release binary, temp data dir, fsync on) driven by
   `lakewriter loadgen` (Junjo-like spans) for --seconds; spans/s acknowledged.
2. DuckDB: the same span shape (same columns as lakewriter's `spans` table,
   built from the same generator parameters) inserted with `executemany` in
   batches of --spans-per-request, committed per batch like a backend
   would; spans/s.

Usage (from a checkout, after `cargo build --release`):
    .venv/bin/python benches/compare_duckdb.py [--seconds 20] [--duckdb-spans 50000]
Prints both figures and the ratio; --json for machine-readable output.
"""
import argparse
import json
import random
import subprocess
import shutil
import tempfile
import time
from pathlib import Path

import duckdb

from bench_server import TARGET, BenchServer

ROOT = Path(__file__).resolve().parent.parent


def run_lakewriter(binary: str, seconds: int, concurrency: int, spans: int) -> dict:
    key = "lw_compare_admin_key_0123456789"
    server = BenchServer(binary, key, prefix="lw-compare-")
    try:
        out = subprocess.run(
            [binary, "loadgen", "--target", server.grpc_target, "--concurrency", str(concurrency),
             "--items-per-request", str(spans), "--duration", f"{seconds}s", "--json",
             "--api-key", key, "--metrics-url", f"{server.base}/metrics"],
            check=True, capture_output=True, text=True)
        report = json.loads(out.stdout)
        report["spans_per_sec"] = report["items_per_sec"]
        return report
    finally:
        server.stop()


COLUMNS = [
    ("trace_id", "VARCHAR"), ("span_id", "VARCHAR"), ("parent_span_id", "VARCHAR"), ("service_name", "VARCHAR"),
    ("name", "VARCHAR"), ("kind", "VARCHAR"), ("start_time", "TIMESTAMP_NS"), ("end_time", "TIMESTAMP_NS"),
    ("duration_ns", "BIGINT"), ("status_code", "VARCHAR"), ("status_message", "VARCHAR"),
    ("attributes_json", "JSON"), ("events_json", "JSON"), ("links_json", "JSON"),
    ("resource_attributes_json", "JSON"), ("scope_name", "VARCHAR"), ("scope_version", "VARCHAR"),
    ("junjo_id", "VARCHAR"), ("junjo_parent_id", "VARCHAR"), ("junjo_span_type", "VARCHAR"),
    ("junjo_wf_state_start", "JSON"), ("junjo_wf_store_id", "VARCHAR"),
]


M64 = (1 << 64) - 1


def load_words() -> list[str]:
    """The load generator's word list, read from its source so both stay equal."""
    src = (ROOT / "src" / "loadgen.rs").read_text()
    body = src.split("const WORDS: &str =", 1)[1].split(";", 1)[0]
    return "".join(part.rstrip("\\").strip() + " " for part in body.strip().strip('"').split("\n")).split()


WORDS = load_words()


def note(seed: int, i: int, length: int) -> str:
    """`loadgen::note`: the same word-salad filler (splitmix64 over WORDS)."""
    x = ((seed * 0x9E3779B97F4A7C15) & M64) ^ ((i + 1) & M64)
    out = []
    size = 0
    while size < length:
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        word = WORDS[z % len(WORDS)]
        size += len(word) + (1 if out else 0)
        out.append(word)
    return " ".join(out)[:length]


def junjo_rows(seed: int, n: int, attr_bytes: int) -> list[tuple]:
    """Rows shaped like lakewriter's loadgen spans (1 workflow + 9 nodes per trace)."""
    base = 1_763_000_000_000_000_000 + seed * 1_000_000
    rows = []
    for i in range(n):
        trace = seed * 1_000_000 + i // 10
        wf = i % 10 == 0
        start = base + i * 1000
        events = [] if wf else [{"name": "set_state", "timeUnixNano": start + 10, "droppedAttributesCount": 0,
                                 "attributes": {"junjo.store.id": f"store{trace}",
                                                "junjo.state_json_patch": "[{\"op\":\"replace\",\"path\":\"/count\",\"value\":3}]"}}]
        rows.append((
            f"{trace:016x}{trace ^ 0x5a5a:016x}", f"{(seed << 24) | (i + 1):016x}",
            None if wf else f"{(seed << 24) | (i - i % 10 + 1):016x}", f"loadgen-{seed % 4}",
            "Workflow" if wf else f"Node{i % 10}", "INTERNAL", start, start + 900, 900, "UNSET", None,
            json.dumps({"junjo.telemetry.contract_version": 2, "app.note": note(seed, i, attr_bytes)}), json.dumps(events), "[]",
            json.dumps({"service.name": f"loadgen-{seed % 4}"}), "junjo", None, f"rt{seed}-{i}",
            None if wf else f"rt{seed}-{i - i % 10}", "workflow" if wf else "node",
            "{\"items\":[1,2,3]}" if wf else None, f"store{trace}" if wf else None,
        ))
    return rows


def run_duckdb(total: int, batch: int, attr_bytes: int) -> dict:
    path = Path(tempfile.mkdtemp(prefix="duck-compare-")) / "spans.duckdb"
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE spans ({', '.join(f'{c} {t}' for c, t in COLUMNS)}, PRIMARY KEY (trace_id, span_id))")
    placeholders = ", ".join("?" for _ in COLUMNS)
    sql = f"INSERT INTO spans VALUES ({placeholders})"
    # Timestamps as datetimes, the way a Python backend hands them to DuckDB.
    batches = [[r[:6] + (time_ns(r[6]), time_ns(r[7])) + r[8:] for r in junjo_rows(seed + 1, batch, attr_bytes)]
               for seed in range(total // batch)]
    latencies = []
    t0 = time.perf_counter()
    for rows in batches:
        t = time.perf_counter()
        con.execute("BEGIN")
        con.executemany(sql, rows)
        con.execute("COMMIT")
        latencies.append(time.perf_counter() - t)
    secs = time.perf_counter() - t0
    con.close()
    shutil.rmtree(path.parent, ignore_errors=True)
    latencies.sort()
    n = len(batches) * batch
    return {"spans": n, "seconds": secs, "spans_per_sec": n / secs,
            "p50_ms": latencies[len(latencies) // 2] * 1e3, "p99_ms": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1e3}


def time_ns(ns: int):
    import datetime
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).replace(tzinfo=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(TARGET / "release" / "lakewriter"))
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--spans-per-request", type=int, default=500)
    ap.add_argument("--duckdb-spans", type=int, default=50_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    random.seed(1)
    lw = run_lakewriter(a.binary, a.seconds, a.concurrency, a.spans_per_request)
    dk = run_duckdb(a.duckdb_spans, a.spans_per_request, 64)
    result = {"lakewriter": lw, "duckdb_executemany": dk, "ratio": lw["spans_per_sec"] / dk["spans_per_sec"]}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"lakewriter (fsync before ack): {lw['spans_per_sec']:>10.0f} spans/s  p50 {lw['p50_ms']:.1f} ms  p99 {lw['p99_ms']:.1f} ms")
        print(f"DuckDB executemany:            {dk['spans_per_sec']:>10.0f} spans/s  p50 {dk['p50_ms']:.1f} ms/batch  p99 {dk['p99_ms']:.1f} ms/batch")
        print(f"ratio: {result['ratio']:.1f}x")


if __name__ == "__main__":
    main()
