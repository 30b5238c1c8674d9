"""Queries bigger than --query-memory: time and spill volume, spilling vs not.

Starts the server (LAKEWRITER_BIN, default the debug build in
$CARGO_TARGET_DIR) three times on temp data dirs (benches/bench_server.py):
--query-memory 64MiB with spilling (the default --query-spill-limit), 64MiB
with --query-spill-limit 0, and 512MiB (everything fits). Runs a 2 M-group aggregation and a sort of 2 M
strings three times on each and prints status, wall time, and the spill
counters from /metrics. Usage:

    .venv/bin/python benches/query_spill.py
"""

import os
import re
import time

import requests

from bench_server import TARGET, BenchServer

KEY = "lw_bench_admin_key_0123456789abcdefghij"

QUERIES = {
    "group by (6 M rows, 2 M groups)":
        "SELECT count(*), sum(c) FROM (SELECT value % 2000000 AS k, count(*) AS c "
        "FROM range(6000000) GROUP BY k)",
    "sort (2 M 24-byte strings)":
        "SELECT count(*), sum(CASE WHEN prev > h THEN 1 ELSE 0 END) FROM "
        "(SELECT h, lag(h) OVER (ORDER BY h) AS prev FROM "
        "(SELECT lpad(to_hex((value * 2654435761) % 4294967291), 24, 'x') AS h FROM range(2000000)))",
}


def metric(s, base, name):
    m = re.search(r"^" + name + r" (\S+)$", s.get(base + "/metrics").text, re.M)
    return float(m.group(1))


def run(binary, extra):
    server = BenchServer(binary, KEY, *extra)
    s = requests.Session()
    s.trust_env = False
    base = server.base
    try:
        print(" ".join(extra))
        for name, sql in QUERIES.items():
            for _ in range(3):
                spilled = metric(s, base, "lakewriter_query_spilled_bytes_total")
                start = time.time()
                r = s.post(base + "/api/v1/query", json={"sql": sql}, headers={"X-API-Key": KEY})
                took = time.time() - start
                spilled = metric(s, base, "lakewriter_query_spilled_bytes_total") - spilled
                print(f"  {name}: {r.status_code} in {took:.2f} s, spilled {spilled / 1e6:.1f} MB")
    finally:
        server.stop()


def main():
    binary = os.environ.get("LAKEWRITER_BIN", str(TARGET / "debug" / "lakewriter"))
    for extra in (["--query-memory", "64MiB"],
                  ["--query-memory", "64MiB", "--query-spill-limit", "0"],
                  ["--query-memory", "512MiB"]):
        run(binary, extra)


if __name__ == "__main__":
    main()
