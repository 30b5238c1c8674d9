"""ULIDs for event and batch ids: 48-bit Unix milliseconds + 80 random bits, Crockford base32."""
from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ALPHABET_BYTES = np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)
_DECODE = {c: i for i, c in enumerate(ALPHABET)}
ULID_LEN = 26
_BLOCK = 1 << 20  # rows per generated Arrow chunk: bounds temporary memory


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_ulid(ms: int | None = None) -> str:
    """A new ULID string (26 characters, sortable by creation time)."""
    ms = _now_ms() if ms is None else ms
    value = ((ms & ((1 << 48) - 1)) << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(ULID_LEN):
        out.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def ulid_to_int(ulid: str) -> int:
    """The 128-bit integer of a ULID string."""
    value = 0
    for ch in ulid.upper():
        value = (value << 5) | _DECODE[ch]
    return value


def ulid_timestamp_ms(ulid: str) -> int:
    """The millisecond timestamp encoded in a ULID."""
    return ulid_to_int(ulid) >> 80


def _ulid_block(n: int, ms: int) -> pa.StringArray:
    rnd = np.frombuffer(os.urandom(10 * n), dtype=np.uint8).reshape(n, 10)
    hi = (
        np.uint64((ms & ((1 << 48) - 1)) << 16)
        | (rnd[:, 0].astype(np.uint64) << np.uint64(8))
        | rnd[:, 1].astype(np.uint64)
    )
    lo = np.ascontiguousarray(rnd[:, 2:]).view(">u8").reshape(n).astype(np.uint64)
    chars = np.empty((n, ULID_LEN), dtype=np.uint8)
    five = np.uint64(31)
    for i in range(ULID_LEN):  # a loop over the 26 character positions, not over rows
        low = 5 * (ULID_LEN - 1 - i)  # lowest bit of this character in the 130-bit number
        if low >= 64:
            v = hi >> np.uint64(low - 64)
        elif low + 5 <= 64:
            v = lo >> np.uint64(low)
        else:
            v = (lo >> np.uint64(low)) | (hi << np.uint64(64 - low))
        chars[:, i] = _ALPHABET_BYTES[(v & five).astype(np.intp)]
    offsets = np.arange(0, ULID_LEN * (n + 1), ULID_LEN, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))


def ulid_array(n: int, ms: int | None = None) -> pa.ChunkedArray:
    """``n`` new ULIDs as an Arrow utf8 column, generated with numpy (no per-row Python)."""
    ms = _now_ms() if ms is None else ms
    blocks = [_ulid_block(min(_BLOCK, n - start), ms) for start in range(0, n, _BLOCK)]
    return pa.chunked_array(blocks, type=pa.string())
