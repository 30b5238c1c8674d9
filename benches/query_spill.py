"""Queries bigger than --query-memory: time and spill volume, spilling vs not.

Starts the server (LAKEWRITER_BIN, default the debug build in
$CARGO_TARGET_DIR) three times on temp data dirs: --query-memory 64MiB with
spilling (the default --query-spill-limit), 64MiB with --query-spill-limit 0,
and 512MiB (everything fits). Runs a 2 M-group aggregation and a sort of 2 M
strings three times on each and prints status, wall time, and the spill
counters from /metrics. Usage:

    .venv/bin/python benches/query_spill.py
"""

import os
import re
import subprocess
import tempfile
import time

import requests

KEY = "lw_bench_admin_key_0123456789abcdefghij"
PORT = "18612"
URL = "http://127.0.0.1:" + PORT

QUERIES = {
    "group by (6 M rows, 2 M groups)":
        "SELECT count(*), sum(c) FROM (SELECT value % 2000000 AS k, count(*) AS c "
        "FROM range(6000000) GROUP BY k)",
    "sort (2 M 24-byte strings)":
        "SELECT count(*), sum(CASE WHEN prev > h THEN 1 ELSE 0 END) FROM "
        "(SELECT h, lag(h) OVER (ORDER BY h) AS prev FROM "
        "(SELECT lpad(to_hex((value * 2654435761) % 4294967291), 24, 'x') AS h FROM range(2000000)))",
}


def metric(s, name):
    m = re.search(r"^" + name + r" (\S+)$", s.get(URL + "/metrics").text, re.M)
    return float(m.group(1))


def run(binary, extra):
    env = dict(os.environ, LAKEWRITER_BOOTSTRAP_API_KEY=KEY, LAKEWRITER_PRETOUCH_MEMORY="0")
    args = [binary, "serve", "--data-dir", tempfile.mkdtemp(), "--grpc-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:" + PORT, "--internal-grpc-addr", "127.0.0.1:0", *extra]
    server = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = requests.Session()
    s.trust_env = False
    try:
        for _ in range(600):
            try:
                s.get(URL + "/health")
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        print(" ".join(extra))
        for name, sql in QUERIES.items():
            for _ in range(3):
                spilled = metric(s, "lakewriter_query_spilled_bytes_total")
                start = time.time()
                r = s.post(URL + "/api/v1/query", json={"sql": sql}, headers={"X-API-Key": KEY})
                took = time.time() - start
                spilled = metric(s, "lakewriter_query_spilled_bytes_total") - spilled
                print(f"  {name}: {r.status_code} in {took:.2f} s, spilled {spilled / 1e6:.1f} MB")
    finally:
        server.terminate()
        server.wait()


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/lakewriter-target"))
    binary = os.environ.get("LAKEWRITER_BIN", os.path.join(target, "debug", "lakewriter"))
    for extra in (["--query-memory", "64MiB"],
                  ["--query-memory", "64MiB", "--query-spill-limit", "0"],
                  ["--query-memory", "512MiB"]):
        run(binary, extra)


if __name__ == "__main__":
    main()
