"""The SQL endpoint and DuckDB over the flushed files give the same answers."""
import json
import urllib.request

import duckdb
from lakewriter_client import LakewriterClient

from conftest import ADMIN_KEY
from test_otel_exporter import export_spans


def sql(server, query: str) -> list:
    req = urllib.request.Request(
        server.http + "/api/v1/query", data=json.dumps({"sql": query}).encode(), method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": ADMIN_KEY})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["rows"]


def test_sql_endpoint_matches_duckdb_after_flush(server):
    for svc in ["svc-a", "svc-b", "svc-a"]:
        export_spans(server, svc)
    with LakewriterClient(server.grpc_endpoint, api_key=ADMIN_KEY) as lw:
        lw.write("cmp", [{"grp": f"g{i % 3}", "x": i, "y": i / 4} for i in range(1000)])
    # Before the flush the SQL endpoint already sees every row (memtables).
    before = sql(server, 'SELECT grp, count(*), sum(x), sum(y) FROM "cmp" GROUP BY grp ORDER BY grp')
    server.flush()
    after = sql(server, 'SELECT grp, count(*), sum(x), sum(y) FROM "cmp" GROUP BY grp ORDER BY grp')
    con = duckdb.connect()
    lake = server.lake
    duck = con.execute(
        f"SELECT grp, count(*), sum(x), sum(y) FROM read_parquet('{lake}/tenant=default/endpoint=cmp/**/*.parquet') "
        "GROUP BY grp ORDER BY grp").fetchall()
    assert before == after == [list(r) for r in duck]
    assert sum(r[1] for r in after) == 1000

    ours = sql(server, "SELECT service_name, name, count(*) FROM spans GROUP BY 1, 2 ORDER BY 1, 2")
    duck = con.execute(
        f"SELECT service_name, name, count(*) FROM read_parquet('{lake}/tenant=default/endpoint=spans/**/*.parquet') "
        "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    assert ours == [list(r) for r in duck]
    assert ours == [["svc-a", "child", 2], ["svc-a", "root", 2], ["svc-b", "child", 1], ["svc-b", "root", 1]]


def test_duckdb_reads_a_lake_snapshot_exactly_once_across_compaction(server):
    import time
    from datetime import datetime, timezone

    at = datetime(2025, 11, 13, 5, tzinfo=timezone.utc)
    con = duckdb.connect()
    glob = f"{server.lake}/tenant=default/endpoint=snap/**/*.parquet"

    def count(files):
        return con.read_parquet(files, hive_partitioning=True).aggregate("count(*), sum(k)").fetchall()[0]

    with LakewriterClient(server.grpc_endpoint, api_key=ADMIN_KEY, http_url=server.http) as lw:
        for part in range(3):
            lw.write("snap", [{"k": part * 100 + i, "timestamp": at} for i in range(100)])
            server.flush()
        lw.write("snap", [{"k": 1000, "timestamp": at}])
        with lw.lake_snapshot("snap", lease_seconds=600) as snap:
            assert (snap.table, snap.tenant, snap.rows, snap.unflushed_rows) == ("snap", "default", 300, 1)
            assert len(snap.files) == 3 and snap.id and snap.expires_at.endswith("Z")
            assert all(f["date"] == "2025-11-13" and f["hour"] == 5 for f in snap.files)
            merged = server.post("/api/v1/admin/compact", headers={"X-API-Key": ADMIN_KEY})
            assert merged["merged"] == 3
            # The lease keeps the inputs next to the merged file: a glob now
            # counts their rows twice, the snapshot once.
            assert count(glob) == (600, 2 * sum(range(300)))
            assert count(snap.locations) == (300, sum(range(300)))
            rel = con.read_parquet(snap.locations, hive_partitioning=True)
            hive = rel.aggregate("tenant, endpoint, date", "tenant, endpoint, date").fetchall()
            assert [tuple(map(str, r)) for r in hive] == [("default", "snap", "2025-11-13")]
        assert snap.id is None  # released by the with block
        # Released, the inputs go at the server's next cleanup (watched on
        # disk: a glob scan racing the deletes could fail).
        deadline = time.monotonic() + 20
        while len(list(server.lake.glob("tenant=default/endpoint=snap/**/*.parquet"))) != 1:
            assert time.monotonic() < deadline, "released inputs were not deleted"
            time.sleep(0.1)
        assert count(glob) == (300, sum(range(300)))
        server.flush()
        now = lw.lake_snapshot("snap", lease_seconds=0)
        assert (now.id, now.rows, now.unflushed_rows, len(now.files)) == (None, 301, 0, 2)
        assert count(now.locations) == (301, sum(range(300)) + 1000)
        now.release()  # no lease: nothing to do
