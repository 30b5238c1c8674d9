"""The synchronous lakewriter client: batch writes over gRPC, SQL queries over HTTP."""
from __future__ import annotations

import enum
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence, Union

import grpc
import pyarrow as pa

from ._arrow import ARROW_STREAM_MEDIA_TYPE, as_arrow_table, decode_ipc, iter_ipc_chunks, prepare_table
from ._convert import DataRecord, chunk_records
from ._errors import (
    DeadlineExceededError,
    LakewriterError,
    NotFoundError,
    UnavailableError,
    from_grpc_error,
    from_http_error,
    is_retryable,
    server_retry_delay,
)
from ._ids import new_ulid
from ._proto.storage import ingestion_pb2, ingestion_pb2_grpc
from ._result import BatchAck, WriteResult, make_ack
from ._retry import RetryPolicy
from ._snapshot import LakeSnapshot

if TYPE_CHECKING:
    from ._stream import StreamWriter

#: What :meth:`LakewriterClient.write` accepts: record dicts, or a table-like object.
Records = Union[
    Iterable[Union[Mapping[str, Any], DataRecord]],
    Mapping[str, Any],
    pa.Table,
    pa.RecordBatch,
    Any,  # pandas / polars DataFrame, objects with __arrow_c_stream__
]

DEFAULT_MAX_BATCH_RECORDS = 50_000
#: Default payload size of one request: well under the server's 16 MiB limit
#: (and under gRPC's common 4 MiB default message limit).
DEFAULT_MAX_BATCH_BYTES = 3 * 1024 * 1024


class _Default(enum.Enum):
    TIMEOUT = "client default"


#: Marks "use the client's ``timeout``" in per-call ``timeout`` parameters.
DEFAULT_TIMEOUT = _Default.TIMEOUT
Timeout = Union[float, None, _Default]


@dataclass
class _Payload:
    count: int
    records: list[DataRecord] | None = None
    arrow: bytes | None = None


def _parse_target(target: str, secure: bool | None) -> tuple[str, bool]:
    for scheme, is_secure, port in (("https://", True, 443), ("http://", False, 80), ("grpc://", False, None)):
        if target.startswith(scheme):
            host = target[len(scheme):].rstrip("/")
            if port is not None and ":" not in host.rsplit("]", 1)[-1]:
                host = f"{host}:{port}"
            return host, is_secure if secure is None else secure
    return target, bool(secure)


class LakewriterClient:
    """Client of a lakewriter server.

    Args:
        target: gRPC address, ``"host:port"`` (plaintext unless ``secure``),
            ``"http://host:port"`` or ``"https://host[:port]"`` (TLS).
        api_key: API key or JWT, sent as ``authorization: Bearer …``. Defaults to
            the ``LAKEWRITER_API_KEY`` environment variable; ``None`` sends no
            credential (servers started with ``--no-auth``).
        tenant: sent as ``tenant_id``; must equal the key's tenant. ``None`` lets
            the credential decide (recommended).
        http_url: base URL of the HTTP API (e.g. ``"http://localhost:1323"``),
            needed by :meth:`query`, :meth:`flush` and :meth:`lake_snapshot`.
        timeout: seconds per request attempt (``None``: no deadline).
        max_retries: retries of a retryable failure (``UNAVAILABLE``,
            ``DEADLINE_EXCEEDED``, errors flagged ``lw-retryable``).
        initial_backoff, max_backoff: exponential backoff bounds, seconds.
        max_batch_records, max_batch_bytes: limits of one request; larger inputs
            are split into several requests.
        ipc_compression: ``None``, ``"zstd"`` or ``"lz4"`` for Arrow payloads
            (only if the server reads compressed IPC).
        secure, root_certificates, credentials: TLS settings.
        channel: an existing :class:`grpc.Channel` to use (not closed by :meth:`close`).
        channel_options: extra gRPC channel options.
        metadata: extra gRPC metadata sent with every call.

    The client is thread-safe; use one per process and :meth:`close` it (or use
    it as a context manager).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        http_url: str | None = None,
        timeout: float | None = 30.0,
        max_retries: int = 5,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_batch_records: int = DEFAULT_MAX_BATCH_RECORDS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        ipc_compression: str | None = None,
        secure: bool | None = None,
        root_certificates: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        if max_batch_records < 1 or max_batch_bytes < 1:
            raise ValueError("max_batch_records and max_batch_bytes must be positive")
        self.api_key = api_key if api_key is not None else os.environ.get("LAKEWRITER_API_KEY")
        self.tenant = tenant
        self.http_url = http_url.rstrip("/") if http_url else None
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries, initial_backoff=initial_backoff, max_backoff=max_backoff)
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self.ipc_compression = ipc_compression

        md = [(k.lower(), v) for k, v in metadata]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        self._metadata: tuple[tuple[str, str], ...] = tuple(md)

        self.target, use_tls = _parse_target(target, secure)
        self._owns_channel = channel is None
        if channel is None:
            options = [
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                *channel_options,
            ]
            if use_tls or credentials is not None:
                creds = credentials or grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(self.target, creds, options=options)
            else:
                channel = grpc.insecure_channel(self.target, options=options)
        self._channel = channel
        self._stub = ingestion_pb2_grpc.IngestionServiceStub(channel)  # type: ignore[no-untyped-call]
        self._closed = False

    # ---- lifecycle --------------------------------------------------------

    def close(self) -> None:
        """Close the gRPC channel (if the client created it). Idempotent."""
        if not self._closed:
            self._closed = True
            if self._owns_channel:
                self._channel.close()

    def __enter__(self) -> LakewriterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LakewriterClient(target={self.target!r}, tenant={self.tenant!r}, http_url={self.http_url!r})"

    # ---- writes -----------------------------------------------------------

    def write(
        self,
        endpoint: str,
        records: Records,
        *,
        batch_id: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_batch_records: int | None = None,
        max_batch_bytes: int | None = None,
    ) -> WriteResult:
        """Write records to ``endpoint`` and wait until the server has made them durable.

        ``records`` is one of:

        - an iterable of dicts (or a single dict): ``event_id`` (default: new
          ULID), ``timestamp`` (``datetime``, naive = UTC, ``date`` or int ns;
          default: now), ``version`` (int, default 0); every other key is a field
          typed by its Python value (``None``, ``bool``, ``int``, ``float``,
          ``str``, bytes-like, ``datetime``, ``date``). Other types raise
          :class:`TypeError` before anything is sent for that chunk.
        - a ``pyarrow.Table``/``RecordBatch``, a pandas or polars DataFrame (sent
          as Arrow IPC); ``event_id``/``timestamp`` columns are added if absent.

        Inputs over ``max_batch_records``/``max_batch_bytes`` go out as several
        requests. With a ``batch_id``, a single request uses it as is and request
        ``i`` of several uses ``f"{batch_id}.{i}"``, so writing the same input
        again with the same ``batch_id`` (and the same limits) writes nothing
        twice. Without one, every request gets a new ULID.

        Retryable failures are retried with backoff, with the same batch_id.
        Otherwise a :class:`LakewriterError` subclass is raised; requests
        acknowledged before it stay written, and ``err.result`` lists them.
        """
        timeout = self._timeout(timeout)
        max_records = max_batch_records or self.max_batch_records
        max_bytes = max_batch_bytes or self.max_batch_bytes
        self._check_open()
        result = WriteResult()
        chunks = self._payloads(records, max_records, max_bytes)
        first = next(chunks, None)
        if first is None:
            return result
        second = next(chunks, None)
        single = second is None

        def all_chunks() -> Iterator[_Payload]:
            yield first
            if second is not None:
                yield second
                yield from chunks

        for index, payload in enumerate(all_chunks()):
            if batch_id is None:
                bid, generated = new_ulid(), True
            else:
                bid, generated = (batch_id if single else f"{batch_id}.{index}"), False
            request = self._request(endpoint, bid, payload)
            try:
                ack = self._send(request, payload.count, generated, timeout)
            except LakewriterError as err:
                err.result = result
                raise
            result.batches.append(ack)
        return result

    def stream(
        self,
        endpoint: str,
        *,
        max_batch_records: int | None = None,
        max_batch_bytes: int | None = None,
        flush_interval: float = 1.0,
        max_unacked_batches: int = 8,
        batch_id_prefix: str | None = None,
        max_retries: int | None = None,
    ) -> StreamWriter:
        """A streaming writer over the bidirectional ``WriteStream`` RPC.

        For continuous producers: :meth:`StreamWriter.write` buffers records; a
        batch is sent when it reaches ``max_batch_records``/``max_batch_bytes``
        or is ``flush_interval`` seconds old. Sent batches are kept until
        acknowledged; when the stream breaks the writer reconnects and resends
        them with their original batch_ids (the server drops what it already
        has). ``write`` blocks while ``max_unacked_batches`` are in flight.

        With ``batch_id_prefix``, batch ``n`` (0-based) is ``f"{prefix}.{n}"``,
        so a restarted producer that replays from the same point with the same
        prefix writes nothing twice; otherwise batch ids are new ULIDs.

        Use as a context manager; leaving it (or :meth:`StreamWriter.close`)
        sends what is buffered, waits for every ack and returns the totals.
        """
        from ._stream import StreamWriter

        self._check_open()
        return StreamWriter(
            self,
            endpoint,
            max_batch_records=max_batch_records or self.max_batch_records,
            max_batch_bytes=max_batch_bytes or self.max_batch_bytes,
            flush_interval=flush_interval,
            max_unacked_batches=max_unacked_batches,
            batch_id_prefix=batch_id_prefix,
            retry=self.retry if max_retries is None else RetryPolicy(
                max_retries=max_retries,
                initial_backoff=self.retry.initial_backoff,
                max_backoff=self.retry.max_backoff,
            ),
        )

    # ---- HTTP -------------------------------------------------------------

    def query(self, sql: str, *, timeout: Timeout = DEFAULT_TIMEOUT) -> pa.Table:
        """Run SQL over the tenant's tables and return the result as a ``pyarrow.Table``.

        Tables: ``spans``, ``state_patches`` and one per DataRecord endpoint;
        quote names with dashes (``SELECT * FROM "my-endpoint"``). Results include
        rows not yet flushed to Parquet. Needs ``http_url``.
        """
        timeout = self._timeout(timeout)
        body = self._http("/api/v1/query", {"sql": sql}, accept=ARROW_STREAM_MEDIA_TYPE, timeout=timeout)
        data, content_type = body
        if "json" in content_type:
            payload = json.loads(data or b"null")
            if isinstance(payload, list):
                return pa.Table.from_pylist(payload)
            raise LakewriterError(f"unexpected JSON query response: {str(payload)[:200]}", code="INTERNAL")
        return decode_ipc(data)

    def flush(self, *, timeout: Timeout = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Ask the server to flush every memtable to Parquet now (needs an admin key)."""
        timeout = self._timeout(timeout)
        data, _ = self._http("/api/v1/admin/flush", {}, accept="application/json", timeout=timeout)
        return json.loads(data) if data else {}

    def lake_snapshot(
        self, table: str, *, lease_seconds: int = 600, timeout: Timeout = DEFAULT_TIMEOUT
    ) -> LakeSnapshot:
        """The Parquet files of ``table`` now, kept in the lake for ``lease_seconds``.

        Read them with ``duckdb.read_parquet(snap.locations, hive_partitioning=True)``
        for an exactly-once view that compaction and retention cannot change
        under the reader; use it as a context manager to release the lease at
        the end (or call :meth:`LakeSnapshot.release`). ``lease_seconds`` is at
        most 3600; ``0`` lists the files without keeping them. A tenant holds at
        most 64 leases. Needs ``http_url`` and the ``read`` scope on ``table``.
        """
        timeout = self._timeout(timeout)
        body = {"table": table, "lease_seconds": lease_seconds}
        # Not retried: a lost answer would leave its lease held, unknown,
        # counting against the tenant's 64 until it ends.
        data, _ = self._http("/api/v1/lake/snapshot", body, accept="application/json", timeout=timeout,
                             retry=False)
        v = json.loads(data)
        return LakeSnapshot(
            table=v["table"], tenant=v["tenant"], id=v["id"], expires_at=v["expires_at"], files=v["files"],
            rows=v["rows"], bytes=v["bytes"], unflushed_rows=v["unflushed_rows"], _client=self,
        )

    def _release_lease(self, lease: str) -> None:
        try:
            self._http(f"/api/v1/lake/snapshot/{lease}", None, accept="application/json",
                       timeout=self._timeout(DEFAULT_TIMEOUT), method="DELETE")
        except NotFoundError:
            pass  # ended already

    # ---- internals --------------------------------------------------------

    def _timeout(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, _Default) else timeout

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")

    def _payloads(self, records: Records, max_records: int, max_bytes: int) -> Iterator[_Payload]:
        if isinstance(records, (str, bytes, bytearray)):
            raise TypeError("records must be dicts or a table, not a string")
        table = as_arrow_table(records)
        if table is not None:
            table = prepare_table(table)
            for data, rows in iter_ipc_chunks(table, max_records, max_bytes, self.ipc_compression):
                yield _Payload(count=rows, arrow=data)
            return
        if isinstance(records, (Mapping, DataRecord)):
            records = [records]
        for chunk in chunk_records(records, max_records, max_bytes):
            yield _Payload(count=len(chunk), records=chunk)

    def _request(self, endpoint: str, batch_id: str, payload: _Payload) -> ingestion_pb2.WriteBatchRequest:
        request = ingestion_pb2.WriteBatchRequest(
            endpoint_id=endpoint, tenant_id=self.tenant or "", batch_id=batch_id
        )
        if payload.arrow is not None:
            request.arrow_ipc_stream = payload.arrow
        else:
            request.records.records.extend(payload.records or ())
        return request

    def _send(
        self,
        request: ingestion_pb2.WriteBatchRequest,
        count: int,
        generated_id: bool,
        timeout: float | None,
    ) -> BatchAck:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._stub.WriteBatch(request, metadata=self._metadata, timeout=timeout)
            except grpc.RpcError as exc:
                if is_retryable(exc) and attempt <= self.retry.max_retries:
                    time.sleep(self.retry.delay(attempt, pushback=server_retry_delay(exc)))
                    continue
                raise from_grpc_error(exc, batch_id=request.batch_id) from exc
            return make_ack(request.batch_id, count, response, attempt, generated_id)

    def _http(
        self, path: str, body: Mapping[str, Any] | None, *, accept: str, timeout: float | None,
        method: str = "POST", retry: bool = True,
    ) -> tuple[bytes, str]:
        if not self.http_url:
            raise ValueError("this client has no http_url: pass http_url='http://host:1323'")
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        attempt = 0
        while True:
            attempt += 1
            request = urllib.request.Request(self.http_url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return response.read(), response.headers.get("Content-Type", "")
            except urllib.error.HTTPError as exc:
                err = from_http_error(exc.code, exc.read(), exc.headers.get("Content-Type", ""),
                                      exc.headers.get("Retry-After"))
                cause: BaseException = exc
            except (socket.timeout, TimeoutError) as exc:
                err, cause = DeadlineExceededError(f"no HTTP response within {timeout}s", retryable=True), exc
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                    err = DeadlineExceededError(f"no HTTP response within {timeout}s", retryable=True)
                else:
                    err = UnavailableError(f"cannot reach {self.http_url}: {exc.reason}", retryable=True)
                cause = exc
            except ConnectionError as exc:
                err, cause = UnavailableError(f"cannot reach {self.http_url}: {exc}", retryable=True), exc
            if retry and err.retryable and attempt <= self.retry.max_retries:
                time.sleep(self.retry.delay(attempt, pushback=err.retry_after))
                continue
            raise err from cause

