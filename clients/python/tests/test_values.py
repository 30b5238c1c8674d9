"""Python value → storage.Value / DataRecord conversion."""
import math
import time
import uuid
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from lakewriter_client import datetime_to_ns, from_value, new_ulid, to_record, to_value
from lakewriter_client._ids import ulid_timestamp_ms


def kind(v):
    return v.WhichOneof("kind")


def test_scalars_map_to_their_oneof():
    assert kind(to_value(None)) == "null_value"
    assert kind(to_value(True)) == "bool_value" and to_value(True).bool_value is True
    assert kind(to_value(False)) == "bool_value"  # bool is checked before int
    assert kind(to_value(0)) == "int_value"
    assert to_value(-(2**63)).int_value == -(2**63)
    assert to_value(2**63 - 1).int_value == 2**63 - 1
    assert to_value(1.5).double_value == 1.5
    assert to_value("héllo 🌊").string_value == "héllo 🌊"
    assert kind(to_value("")) == "string_value"
    assert to_value(b"\x00\xff").bytes_value == b"\x00\xff"
    assert to_value(bytearray(b"ab")).bytes_value == b"ab"
    assert to_value(memoryview(b"cd")).bytes_value == b"cd"
    assert kind(to_value(b"")) == "bytes_value"


def test_special_floats_are_kept():
    assert math.isnan(to_value(float("nan")).double_value)
    assert to_value(float("inf")).double_value == math.inf
    assert to_value(float("-inf")).double_value == -math.inf
    assert math.copysign(1, to_value(-0.0).double_value) == -1


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_int64_range_is_checked_and_names_the_key(value):
    with pytest.raises(OverflowError, match="'big'"):
        to_value(value, "big")


@pytest.mark.parametrize("value", [object(), [1, 2], {"a": 1}, {1, 2}, 1 + 2j, (1,)])
def test_unsupported_types_raise_type_error_naming_the_key(value):
    with pytest.raises(TypeError, match="field 'payload'"):
        to_record({"payload": value})


def test_decimal_is_not_silently_converted():
    from decimal import Decimal

    with pytest.raises(TypeError, match="Decimal"):
        to_value(Decimal("1.5"), "price")


def test_datetimes_are_exact_nanoseconds_utc():
    aware = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    expected = 1714979289_123456000
    assert datetime_to_ns(aware) == expected
    assert datetime_to_ns(aware.replace(tzinfo=None)) == expected  # naive = UTC
    plus2 = aware.astimezone(timezone(timedelta(hours=2)))
    assert datetime_to_ns(plus2) == expected
    assert to_value(aware).timestamp_unix_nano == expected
    # before the epoch
    assert datetime_to_ns(datetime(1969, 12, 31, 23, 59, 59, 999999)) == -1000
    # pandas keeps nanoseconds
    assert datetime_to_ns(pd.Timestamp("2024-05-06T07:08:09.123456789Z")) == 1714979289_123456789
    assert datetime_to_ns(pd.Timestamp("2024-05-06T07:08:09.123456789")) == 1714979289_123456789


def test_dates_are_midnight_utc():
    assert to_value(date(1970, 1, 2)).timestamp_unix_nano == 86_400 * 10**9
    assert to_value(date(2024, 5, 6)).timestamp_unix_nano == datetime_to_ns(datetime(2024, 5, 6))


def test_out_of_range_datetimes_are_rejected():
    with pytest.raises(OverflowError, match="'when'"):
        to_value(datetime(2300, 1, 1), "when")
    with pytest.raises(OverflowError):
        to_value(date(1000, 1, 1), "when")


def test_numpy_and_pandas_scalars():
    assert to_value(np.int32(5)).int_value == 5
    assert kind(to_value(np.bool_(True))) == "bool_value"
    assert to_value(np.float32(0.5)).double_value == 0.5
    assert to_value(np.datetime64("2024-05-06T07:08:09.123456789")).timestamp_unix_nano == 1714979289_123456789
    assert kind(to_value(np.datetime64("NaT"))) == "null_value"
    assert kind(to_value(pd.NaT)) == "null_value"
    with pytest.raises(OverflowError):
        to_value(np.uint64(2**64 - 1), "u")


def test_from_value_inverts():
    for v in [None, True, 7, 2.5, "s", b"b"]:
        assert from_value(to_value(v)) == v
    dt = datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)
    assert from_value(to_value(dt)) == dt


def test_record_reserved_keys_and_defaults():
    before = time.time_ns()
    rec = to_record({"a": 1, "b": None})
    after = time.time_ns()
    assert len(rec.event_id) == 26 and before // 10**6 - 1 <= ulid_timestamp_ms(rec.event_id) <= after // 10**6
    assert before <= rec.timestamp_unix_nano <= after
    assert rec.version == 0
    assert set(rec.fields) == {"a", "b"}
    assert kind(rec.fields["b"]) == "null_value"

    ts = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    rec = to_record({"event_id": "e1", "timestamp": ts, "version": 3, "x": "y"})
    assert (rec.event_id, rec.timestamp_unix_nano, rec.version) == ("e1", datetime_to_ns(ts), 3)
    assert set(rec.fields) == {"x"}  # reserved keys are not fields

    assert to_record({"timestamp": 123}).timestamp_unix_nano == 123
    assert to_record({"timestamp": date(1970, 1, 1)}).timestamp_unix_nano == 0
    u = uuid.uuid4()
    assert to_record({"event_id": u}).event_id == str(u)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"event_id": 5}, "event_id"),
        ({"timestamp": "2024-01-01"}, "timestamp"),
        ({"timestamp": 1.5}, "timestamp"),
        ({"timestamp": True}, "timestamp"),
        ({"timestamp": 2**63}, "timestamp"),
        ({"version": "1"}, "version"),
        ({"version": True}, "version"),
        ({1: "x"}, "field names must be str"),
    ],
)
def test_bad_record_columns(record, message):
    with pytest.raises((TypeError, OverflowError), match=message):
        to_record(record)


def test_non_mapping_record_is_rejected():
    with pytest.raises(TypeError, match="dict"):
        to_record(["a", 1])


def test_ulids_are_unique_and_sortable():
    ids = [new_ulid(ms=1000 + i) for i in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert ulid_timestamp_ms(new_ulid(ms=1714979289123)) == 1714979289123
