"""An in-process stand-in for lakewriter's IngestionService and HTTP query API,
for the client behaviour a real server cannot be made to show on cue.

It injects scripted faults (fail the next calls with a given status and
``lw-retryable`` flag, lose an ack after the write, break a stream at request
N, hold a handler back) and keeps just enough of the contract for the client
to work through them: bearer-key auth, idempotent batch_ids (a duplicate ack
repeats the original), one response per stream request, in order. What the
real server does with the same calls (storage, deduplication, schema and name
errors, auth scopes, flush) is tested against the real binary in
``tests/python/test_client.py``.
"""
from __future__ import annotations

import http.server
import json
import os
import threading
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pyarrow as pa
import pytest

from lakewriter_client import decode_ipc, encode_ipc, from_value
from lakewriter_client._proto.storage import ingestion_pb2, ingestion_pb2_grpc

KEY = "lw_unit_test_key"


@dataclass
class Fault:
    """What to do to one incoming request instead of (or after) handling it."""

    code: grpc.StatusCode
    details: str = "injected"
    retryable: bool | None = None  # sets lw-retryable to "true"/"false"; None: no metadata
    after_write: bool = False  # write the batch, then fail (a lost ack)


@dataclass
class FakeIngestion(ingestion_pb2_grpc.IngestionServiceServicer):
    faults: list[Fault] = field(default_factory=list)
    #: total requests (unary and stream) after which every open stream breaks, once each value
    break_streams_at: list[int] = field(default_factory=list)
    acks: dict = field(default_factory=dict)
    rows: dict = field(default_factory=lambda: defaultdict(list))
    received: list = field(default_factory=list)  # batch ids in arrival order
    streams_opened: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _auth(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")

    def _abort(self, context: grpc.ServicerContext, fault: Fault) -> None:
        if fault.retryable is not None:
            context.set_trailing_metadata((("lw-retryable", "true" if fault.retryable else "false"),))
        context.abort(fault.code, fault.details)

    def _handle(self, request: ingestion_pb2.WriteBatchRequest, context: grpc.ServicerContext):
        with self.lock:
            self.received.append(request.batch_id)
            fault = self.faults.pop(0) if self.faults else None
        if fault is not None and not fault.after_write:
            self._abort(context, fault)
        response = self._write(request, context)
        if fault is not None:
            self._abort(context, fault)
        return response

    def _write(self, request, context):
        key = (request.endpoint_id, request.batch_id)
        with self.lock:
            if key in self.acks:
                first = self.acks[key]
                return ingestion_pb2.WriteBatchResponse(
                    records_accepted=first.records_accepted, duplicate=True, sequence_token=first.sequence_token
                )
        if request.WhichOneof("payload") == "arrow_ipc_stream":
            try:
                rows = decode_ipc(request.arrow_ipc_stream).to_pylist()
            except Exception as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed Arrow IPC: {exc}")
        else:
            rows = [
                {
                    "event_id": r.event_id,
                    "timestamp": r.timestamp_unix_nano,
                    "version": r.version,
                    **{k: from_value(v) for k, v in r.fields.items()},
                }
                for r in request.records.records
            ]
        with self.lock:
            response = ingestion_pb2.WriteBatchResponse(records_accepted=len(rows), sequence_token=os.urandom(16))
            self.acks[key] = response
            self.rows[request.endpoint_id].extend(rows)
        return response

    def WriteBatch(self, request, context):
        self._auth(context)
        return self._handle(request, context)

    def WriteStream(self, request_iterator, context):
        self._auth(context)
        with self.lock:
            self.streams_opened += 1
        for request in request_iterator:
            with self.lock:
                at = len(self.received)
                broken = at in self.break_streams_at
                if broken:
                    self.break_streams_at.remove(at)
            if broken:
                context.abort(grpc.StatusCode.UNAVAILABLE, "stream broken (injected)")
            yield self._handle(request, context)

    def batch_ids(self, endpoint: str | None = None) -> list:
        return [k[1] for k in self.acks if endpoint is None or k[0] == endpoint]


class FakeServer:
    def __init__(self) -> None:
        self.service = FakeIngestion()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ingestion_pb2_grpc.add_IngestionServiceServicer_to_server(self.service, self.grpc)
        self.port = self.grpc.add_insecure_port("127.0.0.1:0")
        self.grpc.start()
        self.http = _start_http(self)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def stop(self) -> None:
        self.grpc.stop(grace=None)
        self.http.shutdown()
        self.http.server_close()


def _start_http(fake: FakeServer) -> http.server.ThreadingHTTPServer:
    """POST /api/v1/query: ``{"sql": "rows <endpoint>"}`` returns the endpoint's rows;
    ``{"sql": "error <Code> <retryable>"}`` returns that JSON error."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._send(401, json.dumps({"error": "unknown API key", "code": "Unauthenticated",
                                                   "retryable": False}).encode(), "application/json")
            words = body.get("sql", "").split()
            if words and words[0] == "error":
                status = {"InvalidArgument": 400, "Unavailable": 503, "PermissionDenied": 403}.get(words[1], 500)
                err = {"error": f"injected {words[1]}", "code": words[1], "retryable": words[2] == "true"}
                return self._send(status, json.dumps(err).encode(), "application/json")
            assert self.headers.get("Accept") == "application/vnd.apache.arrow.stream"
            rows = fake.service.rows.get(words[1], []) if len(words) > 1 else []
            table = pa.Table.from_pylist(rows) if rows else pa.table({"n": pa.array([], pa.int64())})
            self._send(200, encode_ipc(table), "application/vnd.apache.arrow.stream")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()
