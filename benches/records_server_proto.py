#!/usr/bin/env python3
"""Server-side DataRecord protobuf throughput: pre-serialized WriteBatch requests.

Builds one WriteBatchRequest of --records 10-field protobuf DataRecords once,
serializes it once, then --threads threads send those bytes with WriteBatch
(no batch_id, so no idempotency lookup) for --seconds, fsync before every ack.
The client does no per-record work, so this measures the server's protobuf
decode → Arrow conversion → WAL → memtable path (plus gRPC).

Usage: server running (e.g. `lakewriter serve --no-auth`), then
    .venv/bin/python benches/records_server_proto.py --target 127.0.0.1:50051
"""
import argparse
import json
import threading
import time

import grpc
from lakewriter_client._proto.storage import common_pb2, ingestion_pb2


def request(n: int) -> bytes:
    now = time.time_ns()
    recs = []
    for i in range(n):
        f = {
            "user": common_pb2.Value(string_value=str(i % 10_000)),
            "country": common_pb2.Value(string_value=["de", "us", "fr", "jp"][i % 4]),
            "model": common_pb2.Value(string_value=["gpt", "claude", "llama"][i % 3]),
            "status": common_pb2.Value(string_value="ok" if i % 7 else "error"),
            "tokens_in": common_pb2.Value(int_value=i % 4096),
            "tokens_out": common_pb2.Value(int_value=(i * 7) % 4096),
            "latency_ms": common_pb2.Value(int_value=i % 10_000),
            "cost": common_pb2.Value(double_value=i / 1e5),
            "score": common_pb2.Value(double_value=(i % 100) / 100),
            "cached": common_pb2.Value(bool_value=i % 2 == 0),
        }
        recs.append(common_pb2.DataRecord(event_id=f"e{i}", timestamp_unix_nano=now + i, fields=f))
    req = ingestion_pb2.WriteBatchRequest(endpoint_id="bench-proto",
                                          records=ingestion_pb2.DataRecords(records=recs))
    return req.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--records", type=int, default=5_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    body = request(args.records)
    opts = [("grpc.max_send_message_length", 64 << 20)]
    lat, lock = [], threading.Lock()
    stop = time.perf_counter() + args.seconds

    def worker() -> None:
        ch = grpc.insecure_channel(args.target, options=opts)
        call = ch.unary_unary("/ingestion.IngestionService/WriteBatch")
        mine = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            call(body, timeout=30)
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    secs = time.perf_counter() - start
    lat.sort()
    pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 1)
    print(json.dumps({"requests": len(lat), "records_per_request": args.records,
                      "records_per_s": round(len(lat) * args.records / secs),
                      "request_bytes": len(body), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                      "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
