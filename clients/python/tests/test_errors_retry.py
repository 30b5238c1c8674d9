"""Error typing and retry classification, with fake grpc error objects."""
import random

import grpc
import pytest

from lakewriter_client import (
    AuthenticationError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LakewriterError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
    from_grpc_error,
    from_http_error,
    is_retryable,
)
from lakewriter_client._errors import parse_retry_info, server_retry_delay


class FakeRpcError(grpc.RpcError, grpc.Call):
    """Enough of grpc's error object: code(), details(), trailing_metadata()."""

    def __init__(self, code, details="boom", trailing=()):
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing

    # unused parts of grpc.Call
    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


S = grpc.StatusCode


@pytest.mark.parametrize(
    "code, trailing, retryable",
    [
        (S.UNAVAILABLE, (), True),
        (S.DEADLINE_EXCEEDED, (), True),
        (S.RESOURCE_EXHAUSTED, (("lw-retryable", "true"),), True),  # memtable budget
        (S.RESOURCE_EXHAUSTED, (), False),  # request over the size limit
        (S.RESOURCE_EXHAUSTED, (("lw-retryable", "false"),), False),
        (S.INTERNAL, (("lw-retryable", b"true"),), True),  # binary-ish value
        (S.ABORTED, (("LW-Retryable", "TRUE"),), True),
        (S.INVALID_ARGUMENT, (), False),
        (S.UNAUTHENTICATED, (), False),
        (S.PERMISSION_DENIED, (("other", "true"),), False),
        (S.UNIMPLEMENTED, (), False),
    ],
)
def test_retry_classification(code, trailing, retryable):
    err = FakeRpcError(code, trailing=trailing)
    assert is_retryable(err) is retryable
    assert from_grpc_error(err).retryable is retryable


def test_trailing_metadata_none_is_tolerated():
    err = FakeRpcError(S.RESOURCE_EXHAUSTED)
    err._trailing = None
    assert is_retryable(err) is False


@pytest.mark.parametrize(
    "code, cls",
    [
        (S.INVALID_ARGUMENT, InvalidArgumentError),
        (S.UNAUTHENTICATED, AuthenticationError),
        (S.PERMISSION_DENIED, PermissionDeniedError),
        (S.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (S.UNAVAILABLE, UnavailableError),
        (S.DEADLINE_EXCEEDED, DeadlineExceededError),
        (S.NOT_FOUND, NotFoundError),
        (S.INTERNAL, InternalError),
        (S.ABORTED, LakewriterError),
    ],
)
def test_grpc_errors_become_typed_exceptions(code, cls):
    msg = "field `price`: existing type double, incoming type string"
    err = from_grpc_error(FakeRpcError(code, msg), batch_id="b1")
    assert type(err) is cls
    assert err.code == code.name and err.grpc_code is code
    assert err.message == msg  # the server's message, unchanged
    assert err.batch_id == "b1"
    assert "price" in str(err) and code.name in str(err)
    assert isinstance(err, LakewriterError)


def test_empty_server_message_stays_empty():
    err = from_grpc_error(FakeRpcError(S.UNIMPLEMENTED, ""), batch_id="b")
    assert err.message == "" and str(err) == "UNIMPLEMENTED (batch b)"


def test_deadline_is_an_unavailable_error():
    assert issubclass(DeadlineExceededError, UnavailableError)


@pytest.mark.parametrize(
    "status, body, cls, code, retryable",
    [
        (400, b'{"error": "bad sql", "code": "InvalidArgument", "retryable": false}',
         InvalidArgumentError, "INVALID_ARGUMENT", False),
        (401, b'{"error": "no key", "code": "Unauthenticated", "retryable": false}',
         AuthenticationError, "UNAUTHENTICATED", False),
        (403, b'{"error": "scope", "code": "PermissionDenied", "retryable": false}',
         PermissionDeniedError, "PERMISSION_DENIED", False),
        (503, b'{"error": "budget", "code": "ResourceExhausted", "retryable": true}',
         ResourceExhaustedError, "RESOURCE_EXHAUSTED", True),
        (503, b"<html>bad gateway</html>", UnavailableError, "UNAVAILABLE", True),
        (404, b"", NotFoundError, "NOT_FOUND", False),
        (500, b'{"error": "odd", "code": "SomethingNew"}', InternalError, "SOMETHING_NEW", False),
    ],
)
def test_http_errors(status, body, cls, code, retryable):
    err = from_http_error(status, body, "application/json")
    assert type(err) is cls and err.code == code and err.retryable is retryable and err.http_status == status
    if body.startswith(b"{"):
        assert err.message in body.decode()


def test_backoff_grows_is_capped_and_jittered():
    policy = RetryPolicy(max_retries=5, initial_backoff=0.1, max_backoff=1.0)
    rng = random.Random(1)
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert max(delays) - min(delays) > cap / 4  # actually jittered
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def retry_info(seconds: int, nanos: int = 0) -> bytes:
    """An encoded google.rpc.RetryInfo (field 1: a google.protobuf.Duration)."""
    from google.protobuf.duration_pb2 import Duration

    inner = Duration(seconds=seconds, nanos=nanos).SerializeToString()
    return b"\x0a" + bytes([len(inner)]) + inner


def test_server_pushback_is_read_from_retry_info_and_retry_after():
    assert parse_retry_info(retry_info(1)) == 1.0
    assert parse_retry_info(retry_info(0, 250_000_000)) == 0.25
    assert parse_retry_info(b"\x0a\x05\x08") is None  # truncated
    assert parse_retry_info(b"") is None
    err = FakeRpcError(S.RESOURCE_EXHAUSTED, "memtable memory budget exhausted",
                       trailing=(("lw-retryable", "true"), ("google.rpc.retryinfo-bin", retry_info(2))))
    assert server_retry_delay(err) == 2.0
    typed = from_grpc_error(err)
    assert typed.retryable and typed.retry_after == 2.0 and server_retry_delay(typed) == 2.0
    assert from_grpc_error(FakeRpcError(S.UNAVAILABLE)).retry_after is None
    http = from_http_error(429, b'{"error": "budget", "code": "ResourceExhausted", "retryable": true}',
                           "application/json", "1")
    assert http.retry_after == 1.0 and http.retryable
    assert from_http_error(429, b"", "", "Wed, 21 Oct 2015 07:28:00 GMT").retry_after is None


def test_backoff_waits_at_least_what_the_server_asked():
    policy = RetryPolicy(max_retries=5, initial_backoff=0.001, max_backoff=0.01)
    rng = random.Random(2)
    assert all(policy.delay(1, rng, pushback=1.0) == 1.0 for _ in range(50))
    assert all(policy.delay(1, rng, pushback=None) <= 0.01 for _ in range(50))
    slow = RetryPolicy(initial_backoff=4.0, max_backoff=8.0)
    assert all(policy_delay >= 2.0 for policy_delay in (slow.delay(1, rng, pushback=1.0) for _ in range(50)))
