"""Lake snapshots: the exact Parquet files of one table, kept for a lease."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import LakewriterClient


@dataclass
class LakeSnapshot:
    """One table's Parquet files at one instant (``POST /api/v1/lake/snapshot``).

    Every flushed row of the table is in exactly one of :attr:`files`, and while
    the lease lasts none of them is deleted by compaction or retention, so an
    outside reader sees neither a row twice nor a file vanish mid-scan, which a
    glob over the lake cannot promise. Rows still in memtables
    (:attr:`unflushed_rows`) are in no file yet.

    >>> with lw.lake_snapshot("spans") as snap:
    ...     duckdb.read_parquet(snap.locations, hive_partitioning=True).count("*")

    Attributes:
        table, tenant: what was listed.
        id: the lease id (``None`` when no lease was asked for).
        expires_at: RFC 3339 end of the lease (the server's clock).
        files: one dict per file: ``location`` (absolute path, or
            ``s3://bucket/prefix/…``), ``path`` (relative to the lake root),
            ``date``, ``hour``, ``rows``, ``bytes``, ``min_time``, ``max_time``.
        rows, bytes: totals over the files.
        unflushed_rows: the table's rows in no file yet.
    """

    table: str
    tenant: str
    id: str | None
    expires_at: str | None
    files: list[dict[str, Any]]
    rows: int
    bytes: int
    unflushed_rows: int
    _client: LakewriterClient | None = field(default=None, repr=False, compare=False)

    @property
    def locations(self) -> list[str]:
        """Where each file is, for ``read_parquet`` (DuckDB, Polars, PyArrow)."""
        return [f["location"] for f in self.files]

    def release(self) -> None:
        """End the lease now (the files may go at the server's next cleanup).

        Releasing twice, or a snapshot without a lease, does nothing.
        """
        if self.id is None or self._client is None:
            return
        self._client._release_lease(self.id)
        self.id = None

    def __enter__(self) -> LakeSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
