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
