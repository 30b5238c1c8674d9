"""Acknowledgements of written batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._proto.storage import ingestion_pb2


@dataclass(frozen=True)
class BatchAck:
    """The server's acknowledgement of one request (one batch).

    Attributes:
        batch_id: the idempotency key the batch was sent with.
        records_sent: records (rows) in the request.
        records_accepted: records the server acknowledged. For a duplicate this
            is the count of the original write.
        duplicate: the server had already written this batch_id, so nothing was
            written this time. A duplicate caused only by the client resending
            one of its *generated* batch ids after a lost ack is not reported
            as duplicate: that write was this call's own.
        sequence_token: 16-byte ULID of the server's WAL entry holding the batch.
        attempts: how many times the request was sent.
    """

    batch_id: str
    records_sent: int
    records_accepted: int
    duplicate: bool
    sequence_token: bytes
    attempts: int = 1


@dataclass
class WriteResult:
    """What one :meth:`LakewriterClient.write` call or one streaming writer wrote."""

    batches: list[BatchAck] = field(default_factory=list)

    @property
    def records_accepted(self) -> int:
        """Records acknowledged, summed over all batches (duplicates included)."""
        return sum(b.records_accepted for b in self.batches)

    @property
    def records_sent(self) -> int:
        """Records sent, summed over all batches."""
        return sum(b.records_sent for b in self.batches)

    @property
    def records_duplicate(self) -> int:
        """Records of batches the server reported as already written."""
        return sum(b.records_accepted for b in self.batches if b.duplicate)

    @property
    def duplicate_batches(self) -> int:
        """Number of batches the server reported as already written."""
        return sum(1 for b in self.batches if b.duplicate)

    @property
    def duplicate(self) -> bool:
        """True if there was at least one batch and every batch was a duplicate."""
        return bool(self.batches) and all(b.duplicate for b in self.batches)

    @property
    def batch_ids(self) -> list[str]:
        return [b.batch_id for b in self.batches]

    @property
    def sequence_tokens(self) -> list[bytes]:
        return [b.sequence_token for b in self.batches]

    @property
    def retries(self) -> int:
        """Requests re-sent after retryable errors or broken streams."""
        return sum(b.attempts - 1 for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        return (
            f"WriteResult(records_accepted={self.records_accepted}, batches={len(self.batches)}, "
            f"duplicate_batches={self.duplicate_batches}, retries={self.retries})"
        )


def make_ack(
    batch_id: str,
    count: int,
    response: ingestion_pb2.WriteBatchResponse,
    attempts: int,
    generated_id: bool,
) -> BatchAck:
    """A :class:`BatchAck` from a response; see :attr:`BatchAck.duplicate` for generated ids."""
    duplicate = bool(response.duplicate) and not (generated_id and attempts > 1)
    return BatchAck(
        batch_id=batch_id,
        records_sent=count,
        records_accepted=int(response.records_accepted),
        duplicate=duplicate,
        sequence_token=bytes(response.sequence_token),
        attempts=attempts,
    )
