"""Peak server memory for hostile OTLP/HTTP JSON bodies.

Starts the server (LAKEWRITER_BIN, default the debug build in
$CARGO_TARGET_DIR) on a temp data dir, posts gzip'd JSON bodies of millions of
tiny items with the admin key, and prints each reply and the server's VmHWM
(peak resident memory) after it. Usage:

    .venv/bin/python benches/json_amplification.py
"""

import gzip
import os
import subprocess
import tempfile
import time

import requests

KEY = "lw_bench_admin_key_0123456789abcdefghij"
PORT = "18611"
URL = "http://127.0.0.1:" + PORT


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(l.split()[1] + " kB" for l in f if l.startswith("VmHWM"))


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/lakewriter-target"))
    binary = os.environ.get("LAKEWRITER_BIN", os.path.join(target, "debug", "lakewriter"))
    env = dict(os.environ, LAKEWRITER_BOOTSTRAP_API_KEY=KEY, LAKEWRITER_PRETOUCH_MEMORY="0")
    args = [binary, "serve", "--data-dir", tempfile.mkdtemp(), "--grpc-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:" + PORT, "--internal-grpc-addr", "127.0.0.1:0"]
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
        print("idle: peak RSS", peak_rss(server.pid))
        empty = ",".join(["{}"] * ((16 << 20) // 3 - 100))
        one_key = ",".join(['{"intValue":1}'] * ((16 << 20) // 16))
        bodies = [
            ("empty log records", "/v1/logs",
             '{"resourceLogs":[{"scopeLogs":[{"logRecords":[' + empty + ']}]}]}'),
            ("empty spans", "/v1/traces",
             '{"resourceSpans":[{"scopeSpans":[{"spans":[' + empty + ']}]}]}'),
            ("arrayValue of one-key values", "/v1/logs",
             '{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"body":{"arrayValue":{"values":['
             + one_key + ']}}}]}]}]}'),
        ]
        for name, path, body in bodies:
            start = time.time()
            r = s.post(URL + path, data=gzip.compress(body.encode()),
                       headers={"X-API-Key": KEY, "Content-Type": "application/json",
                                "Content-Encoding": "gzip"})
            print(f"{name}: {len(body)} bytes -> {r.status_code} in {time.time() - start:.1f}s "
                  f"{r.text[:90]!r}; peak RSS {peak_rss(server.pid)}")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
