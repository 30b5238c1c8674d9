"""An s3:// lake on an S3-compatible server (moto, in process): flush publishes
Parquet objects, the SQL endpoint reads them back through DataFusion, DuckDB
reads the downloaded objects, acked data survives kill -9, compaction
merges objects, and retention deletes them."""
import json
import time
import urllib.request

import boto3
import duckdb
import pytest
from moto.server import ThreadedMotoServer

from conftest import ADMIN_KEY, Server
from test_otel_exporter import export_spans


@pytest.fixture
def s3():
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: bound, then read
    moto.start()
    try:
        endpoint = "http://127.0.0.1:%d" % moto.get_host_and_port()[1]
        env = {
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
        }
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        client.create_bucket(Bucket="lake")
        yield client, env
    finally:
        moto.stop()


def post_logs(server, n: int, start: int) -> None:
    records = [{"timeUnixNano": str(1763000000000000000 + i), "severityNumber": 9,
                "body": {"stringValue": f"log {i}"}} for i in range(start, start + n)]
    doc = {"resourceLogs": [{"scopeLogs": [{"logRecords": records}]}]}
    req = urllib.request.Request(f"{server.http}/v1/logs", data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-API-Key": ADMIN_KEY})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def test_s3_lake_publish_query_and_crash(s3, tmp_path):
    client, env = s3
    server = Server(tmp_path / "data", "--lake-url", "s3://lake/prod", env=env)
    try:
        export_spans(server, "s3-svc")
        post_logs(server, 5, 0)
        flushed = server.flush()
        assert flushed["rows"] == 7

        keys = [o["Key"] for o in client.list_objects_v2(Bucket="lake", Prefix="prod/")["Contents"]]
        assert any(k.startswith("prod/tenant=default/endpoint=spans/date=") for k in keys), keys
        assert any(k.startswith("prod/tenant=default/endpoint=logs/") for k in keys), keys
        assert not (tmp_path / "data" / "lake").exists()

        # The SQL endpoint reads the objects from S3 (plus the memtables).
        post_logs(server, 3, 5)
        assert server.sql("SELECT count(*) FROM spans") == [[2]]
        assert server.sql("SELECT count(*), count(DISTINCT body) FROM logs") == [[8, 8]]

        # DuckDB reads the same objects (downloaded; httpfs needs the network).
        local = tmp_path / "download"
        for k in keys:
            dest = local / k
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file("lake", k, str(dest))
        n = duckdb.connect().execute(
            f"SELECT count(*) FROM read_parquet('{local}/prod/*/endpoint=spans/**/*.parquet', hive_partitioning = true)"
        ).fetchone()[0]
        assert n == 2

        # Acked but unflushed logs survive kill -9; replay publishes them once.
        server.kill9()
        server = Server(tmp_path / "data", "--lake-url", "s3://lake/prod", env=env)
        assert server.sql("SELECT count(*), count(DISTINCT body) FROM logs") == [[8, 8]]
        server.flush()
        assert server.sql("SELECT count(*), count(DISTINCT body) FROM logs") == [[8, 8]]

        # Compaction merges the two log objects of that hour into one, on S3
        # too; the inputs are deleted once no query reads them.
        def log_keys():
            listed = client.list_objects_v2(Bucket="lake", Prefix="prod/tenant=default/endpoint=logs/")
            return [o["Key"] for o in listed.get("Contents", [])]

        assert len(log_keys()) == 2
        done = server.post("/api/v1/admin/compact", headers={"X-API-Key": ADMIN_KEY})
        assert done == {"merged": 2, "written": 1, "rows": 8}
        assert server.sql("SELECT count(*), count(DISTINCT body) FROM logs") == [[8, 8]]
        deadline = time.time() + 10
        while len(log_keys()) > 1:
            assert time.time() < deadline, log_keys()
            time.sleep(0.1)
        dest = tmp_path / "merged.parquet"
        client.download_file("lake", log_keys()[0], str(dest))
        assert duckdb.connect().execute(f"SELECT count(*) FROM '{dest}'").fetchone()[0] == 8
        # A lake snapshot names the objects by their s3:// URLs.
        snap = server.post("/api/v1/lake/snapshot", {"table": "logs", "lease_seconds": 0},
                           headers={"X-API-Key": ADMIN_KEY})
        assert [f["location"] for f in snap["files"]] == [f"s3://lake/{k}" for k in log_keys()], snap

        # Retention deletes the expired log object (its hour is in 2025)
        # from S3; the spans, of this hour, stay.
        server.stop()
        server = Server(tmp_path / "data", "--lake-url", "s3://lake/prod",
                        "--lake-retention-endpoint", "logs=1d", "--lake-retention-interval", "1h", env=env)
        done = server.post("/api/v1/admin/retention", headers={"X-API-Key": ADMIN_KEY})
        assert (done["files"], done["partitions"], done["rows"]) == (1, 1, 8), done
        deadline = time.time() + 10
        while log_keys():
            assert time.time() < deadline, log_keys()
            time.sleep(0.1)
        assert server.sql("SELECT count(*) FROM logs") == [[0]]
        assert server.sql("SELECT count(*) FROM spans") == [[2]]
    finally:
        server.stop()


def test_bad_lake_url_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="use file:///path or s3://bucket/prefix"):
        Server(tmp_path / "data", "--lake-url", "ftp://x/y")
