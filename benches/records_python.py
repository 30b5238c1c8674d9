#!/usr/bin/env python3
"""DataRecord throughput through the Python client against a running server.

Writes --records 10-field records (4 strings, 3 int64, 2 double, 1 bool) to a
fresh endpoint as Arrow IPC (a pyarrow Table, split by the client into requests
of --batch records) and as protobuf DataRecords (list of dicts), one writer
per mode, fsync before every ack. Reports records/s, MB/s of the Arrow data,
and the mean ack latency per request.

Usage: start a server (`cargo run --release -- serve --no-auth` or with a key),
then  .venv/bin/python benches/records_python.py --target localhost:50051 [--api-key KEY]
"""
import argparse
import json
import time
import uuid

import numpy as np
import pyarrow as pa
from lakewriter_client import LakewriterClient


def table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"{seed}-{i}" for i in range(n)]
    now = time.time_ns()
    return pa.table({
        "event_id": pa.array(ids),
        "timestamp": pa.array(np.full(n, now, dtype="int64")).cast(pa.timestamp("ns", "UTC")),
        "user": pa.array(rng.integers(0, 10_000, n).astype(str)),
        "country": pa.array(rng.choice(["de", "us", "fr", "jp"], n)),
        "model": pa.array(rng.choice(["gpt", "claude", "llama"], n)),
        "status": pa.array(rng.choice(["ok", "error"], n)),
        "tokens_in": pa.array(rng.integers(0, 4096, n)),
        "tokens_out": pa.array(rng.integers(0, 4096, n)),
        "latency_ms": pa.array(rng.integers(1, 10_000, n)),
        "cost": pa.array(rng.random(n)),
        "score": pa.array(rng.random(n)),
        "cached": pa.array(rng.random(n) < 0.5),
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--dict-records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=50_000)
    args = ap.parse_args()
    out = {}
    with LakewriterClient(args.target, api_key=args.api_key, max_batch_records=args.batch,
                          max_batch_bytes=15 << 20) as lw:
        t = table(args.records, 1)
        start = time.perf_counter()
        r = lw.write(f"bench-arrow-{uuid.uuid4().hex[:8]}", t)
        secs = time.perf_counter() - start
        out["arrow"] = {"records": r.records_accepted, "seconds": round(secs, 3),
                        "records_per_s": round(r.records_accepted / secs),
                        "mb_per_s": round(t.nbytes / secs / 1e6, 1),
                        "requests": len(r.batches), "mean_ack_ms": round(secs / len(r.batches) * 1e3, 2)}
        rows = table(args.dict_records, 2).drop(["event_id", "timestamp"]).to_pylist()
        start = time.perf_counter()
        r = lw.write(f"bench-dicts-{uuid.uuid4().hex[:8]}", rows)
        secs = time.perf_counter() - start
        out["protobuf_dicts"] = {"records": r.records_accepted, "seconds": round(secs, 3),
                                 "records_per_s": round(r.records_accepted / secs),
                                 "requests": len(r.batches)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
