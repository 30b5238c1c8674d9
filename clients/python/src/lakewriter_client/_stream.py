"""Streaming writer over the bidirectional ``IngestionService.WriteStream`` RPC."""
from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import grpc

from ._arrow import as_arrow_table, iter_ipc_chunks, prepare_table
from ._convert import RECORD_FRAMING_BYTES, DataRecord, to_record
from ._errors import (
    DeadlineExceededError,
    InternalError,
    LakewriterError,
    UnavailableError,
    from_grpc_error,
    is_retryable,
    server_retry_delay,
)
from ._ids import new_ulid
from ._proto.storage import ingestion_pb2
from ._result import WriteResult, make_ack
from ._retry import RetryPolicy

if TYPE_CHECKING:
    from ._client import LakewriterClient

#: How long close() waits for the server to end the stream after the last ack.
_CLOSE_GRACE_SECONDS = 10.0


class _Pending:
    """A sealed batch waiting for its ack."""

    __slots__ = ("batch_id", "request", "count", "generated", "sends")

    def __init__(self, batch_id: str, request: ingestion_pb2.WriteBatchRequest, count: int, generated: bool):
        self.batch_id = batch_id
        self.request = request
        self.count = count
        self.generated = generated
        self.sends = 0


class _Conn:
    """One WriteStream call: its outgoing request queue and the call object."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[ingestion_pb2.WriteBatchRequest | None] = queue.SimpleQueue()
        self.call: Any = None

    def requests(self) -> Iterator[ingestion_pb2.WriteBatchRequest]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            yield item

    def end(self) -> None:
        """Half-close: no more requests on this call."""
        self.queue.put(None)


class StreamWriter:
    """Buffers records and sends them as batches over one long-lived ``WriteStream``.

    Create it with :meth:`LakewriterClient.stream`. Thread-safe: several
    producer threads may call :meth:`write`.

    Delivery: every batch stays in memory until the server acknowledges it. When
    the stream breaks with a retryable error (or the server ends it early), the
    writer reconnects with backoff and resends the unacknowledged batches, in
    order and with their original batch_ids, so nothing is lost or written
    twice. A non-retryable error (e.g. ``INVALID_ARGUMENT`` for a batch) stops
    the writer: the error (with ``.batch_id`` of the rejected batch and
    ``.result`` of what was acknowledged) is raised by the next
    :meth:`write`, :meth:`flush` or :meth:`close`; batches after the rejected
    one are not written (see :attr:`unacked_batch_ids`).
    """

    def __init__(
        self,
        client: LakewriterClient,
        endpoint: str,
        *,
        max_batch_records: int,
        max_batch_bytes: int,
        flush_interval: float = 1.0,
        max_unacked_batches: int = 8,
        batch_id_prefix: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if max_batch_records < 1 or max_batch_bytes < 1 or max_unacked_batches < 1:
            raise ValueError("batch limits and max_unacked_batches must be positive")
        self.endpoint = endpoint
        self._client = client
        self._max_records = max_batch_records
        self._max_bytes = max_batch_bytes
        self._interval = flush_interval
        self._max_unacked = max_unacked_batches
        self._prefix = batch_id_prefix
        self._retry = retry or client.retry

        self._cond = threading.Condition()
        self._buffer: list[DataRecord] = []
        self._buffer_bytes = 0
        self._buffer_since = 0.0
        self._unacked: deque[_Pending] = deque()
        self._result = WriteResult()
        self._acked = 0
        self._seq = 0
        self._conn: _Conn | None = None
        self._error: LakewriterError | None = None
        self._closing = False
        self._aborted = False
        self._reconnects = 0
        self._abort_event = threading.Event()
        self._stop_ticker = threading.Event()

        self._reader = threading.Thread(target=self._run, name=f"lakewriter-stream-{endpoint}", daemon=True)
        self._reader.start()
        self._ticker: threading.Thread | None = None
        if flush_interval and flush_interval > 0:
            self._ticker = threading.Thread(target=self._tick, name=f"lakewriter-flush-{endpoint}", daemon=True)
            self._ticker.start()

    # ---- public -----------------------------------------------------------

    def write(self, records: Any) -> None:
        """Buffer one record dict, an iterable of them, or a table (pyarrow/pandas/polars).

        Dicts follow the rules of :meth:`LakewriterClient.write` and are converted
        before anything of this call is buffered (a :class:`TypeError` leaves the
        buffer unchanged). Tables are sent as Arrow IPC batches of their own, after
        the records buffered before them. Blocks while ``max_unacked_batches``
        batches await their ack.
        """
        if isinstance(records, (Mapping, DataRecord)):
            records = [records]
        elif isinstance(records, (str, bytes, bytearray)):
            raise TypeError("records must be dicts or a table, not a string")
        else:
            table = as_arrow_table(records)
            if table is not None:
                self._write_table(table)
                return
        converted = [(rec, rec.ByteSize() + RECORD_FRAMING_BYTES) for rec in map(to_record, records)]
        with self._cond:
            self._check_usable()
            for rec, size in converted:
                if self._buffer and (
                    len(self._buffer) >= self._max_records or self._buffer_bytes + size > self._max_bytes
                ):
                    self._wait_capacity()
                    self._seal()
                if not self._buffer:
                    self._buffer_since = time.monotonic()
                self._buffer.append(rec)
                self._buffer_bytes += size
            if len(self._buffer) >= self._max_records or self._buffer_bytes >= self._max_bytes:
                self._wait_capacity()
                self._seal()

    def flush(self, timeout: float | None = None) -> WriteResult:
        """Send what is buffered and wait until every sent batch is acknowledged.

        Returns the totals so far. Raises the writer's error, or
        :class:`DeadlineExceededError` if ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._check_usable()
            self._seal()
            while self._unacked and self._error is None and not self._aborted:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceededError(
                        f"{len(self._unacked)} batches not acknowledged within {timeout}s",
                        batch_id=self._unacked[0].batch_id,
                    )
                self._cond.wait(remaining)
            if self._error is not None:
                raise self._error
            return self._snapshot()

    def close(self, timeout: float | None = None) -> WriteResult:
        """Flush, end the stream and stop the writer's threads; returns the totals.

        Idempotent. Raises the writer's error if it failed (after cleaning up).
        """
        failure: BaseException | None = None
        with self._cond:
            open_ = not self._closing and not self._aborted
        if open_:
            try:
                self.flush(timeout)
            except BaseException as exc:  # still clean up below
                failure = exc
        with self._cond:
            self._closing = True
            if self._conn is not None:
                self._conn.end()
            self._cond.notify_all()
        self._stop_ticker.set()
        if failure is not None:
            self._abort_io()
        self._reader.join(_CLOSE_GRACE_SECONDS)
        if self._reader.is_alive():
            self._abort_io()
            self._reader.join(1.0)
        if failure is not None:
            raise failure
        if self._error is not None:
            raise self._error
        return self._snapshot()

    def abort(self) -> None:
        """Stop at once: cancel the stream and drop buffered and unacknowledged batches."""
        with self._cond:
            self._closing = True
            self._buffer.clear()
            self._buffer_bytes = 0
        self._stop_ticker.set()
        self._abort_io()
        self._reader.join(1.0)

    @property
    def result(self) -> WriteResult:
        """Totals of the batches acknowledged so far."""
        with self._cond:
            return self._snapshot()

    @property
    def buffered_records(self) -> int:
        """Records waiting in the buffer (not yet sent)."""
        with self._cond:
            return len(self._buffer)

    @property
    def unacked_batch_ids(self) -> list[str]:
        """Batch ids sent (or to be resent) but not yet acknowledged, oldest first."""
        with self._cond:
            return [p.batch_id for p in self._unacked]

    @property
    def reconnects(self) -> int:
        """How many times the stream was re-opened with batches to resend."""
        return self._reconnects

    @property
    def error(self) -> LakewriterError | None:
        """The error that stopped the writer, if any."""
        return self._error

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the body failed: still deliver what it wrote, but let its exception win
            self.close()
        except LakewriterError as close_error:
            warnings.warn(f"lakewriter stream writer failed while closing: {close_error}", stacklevel=2)

    # ---- batching (callers hold self._cond) ---------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing or self._aborted:
            raise RuntimeError("the stream writer is closed")

    def _wait_capacity(self) -> None:
        while len(self._unacked) >= self._max_unacked and self._error is None and not self._aborted:
            self._cond.wait()
        self._check_usable()

    def _next_batch_id(self) -> tuple[str, bool]:
        seq = self._seq
        self._seq += 1
        if self._prefix is not None:
            return f"{self._prefix}.{seq}", False
        return new_ulid(), True

    def _enqueue(self, request: ingestion_pb2.WriteBatchRequest, count: int, generated: bool) -> None:
        pending = _Pending(request.batch_id, request, count, generated)
        self._unacked.append(pending)
        if self._conn is not None:
            pending.sends += 1
            self._conn.queue.put(request)
        self._cond.notify_all()

    def _new_request(self) -> tuple[ingestion_pb2.WriteBatchRequest, bool]:
        batch_id, generated = self._next_batch_id()
        request = ingestion_pb2.WriteBatchRequest(
            endpoint_id=self.endpoint, tenant_id=self._client.tenant or "", batch_id=batch_id
        )
        return request, generated

    def _seal(self) -> None:
        if not self._buffer:
            return
        request, generated = self._new_request()
        request.records.records.extend(self._buffer)
        count = len(self._buffer)
        self._buffer = []
        self._buffer_bytes = 0
        self._enqueue(request, count, generated)

    def _write_table(self, table: Any) -> None:
        prepared = prepare_table(table)
        for data, rows in iter_ipc_chunks(prepared, self._max_records, self._max_bytes, self._client.ipc_compression):
            with self._cond:
                self._check_usable()
                self._wait_capacity()
                self._seal()  # records buffered before the table go first
                request, generated = self._new_request()
                request.arrow_ipc_stream = data
                self._enqueue(request, rows, generated)

    def _snapshot(self) -> WriteResult:
        return WriteResult(list(self._result.batches))

    def _fail(self, error: LakewriterError) -> None:
        if self._error is None:
            error.result = self._snapshot()
            self._error = error
        if self._conn is not None:
            self._conn.end()
        self._cond.notify_all()

    # ---- background threads -----------------------------------------------

    def _tick(self) -> None:
        period = max(0.01, min(self._interval / 4, 0.25))
        while not self._stop_ticker.wait(period):
            with self._cond:
                if self._closing or self._aborted or self._error is not None:
                    return
                if self._buffer and time.monotonic() - self._buffer_since >= self._interval:
                    self._seal()

    def _abort_io(self) -> None:
        with self._cond:
            self._aborted = True
            conn = self._conn
            if conn is not None:
                conn.end()
            self._cond.notify_all()
        self._abort_event.set()
        if conn is not None and conn.call is not None:
            conn.call.cancel()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug must not leave producers blocked forever
            with self._cond:
                self._fail(InternalError(f"stream writer thread failed: {exc!r}"))

    def _loop(self) -> None:
        attempt = 0
        client = self._client
        while True:
            with self._cond:
                while not self._unacked and not self._closing and not self._aborted and self._error is None:
                    self._cond.wait()
                if self._aborted or self._error is not None or (self._closing and not self._unacked):
                    return
                conn = _Conn()
                for pending in self._unacked:  # resend everything unacknowledged, in order
                    pending.sends += 1
                    conn.queue.put(pending.request)
                if any(p.sends > 1 for p in self._unacked):
                    self._reconnects += 1
                self._conn = conn
                acked_before = self._acked
                if self._closing:
                    conn.end()
            call = client._stub.WriteStream(conn.requests(), metadata=client._metadata)
            conn.call = call
            if self._aborted:
                call.cancel()
            error: grpc.RpcError | None = None
            try:
                for response in call:
                    self._on_response(response)
            except grpc.RpcError as exc:
                error = exc
            finally:
                conn.end()
            with self._cond:
                if self._conn is conn:
                    self._conn = None
                if self._aborted or self._error is not None:
                    return
                if self._acked > acked_before:
                    attempt = 0
                if not self._unacked:
                    continue  # ended cleanly or broke while idle: reopen when there is work
                if error is not None and not is_retryable(error):
                    self._fail(from_grpc_error(error, batch_id=self._unacked[0].batch_id))
                    return
                attempt += 1
                if attempt > self._retry.max_retries:
                    if error is not None:
                        self._fail(from_grpc_error(error, batch_id=self._unacked[0].batch_id))
                    else:
                        self._fail(UnavailableError(
                            f"the server ended the stream with {len(self._unacked)} batches unacknowledged",
                            batch_id=self._unacked[0].batch_id,
                        ))
                    return
            pushback = server_retry_delay(error) if error is not None else None
            if self._abort_event.wait(self._retry.delay(attempt, pushback=pushback)):
                return

    def _on_response(self, response: ingestion_pb2.WriteBatchResponse) -> None:
        with self._cond:
            if not self._unacked:
                self._fail(InternalError("the server sent more acks than batches"))
                return
            pending = self._unacked.popleft()
            self._result.batches.append(
                make_ack(pending.batch_id, pending.count, response, pending.sends, pending.generated)
            )
            self._acked += 1
            self._cond.notify_all()
