"""Fixtures that start the real lakewriter binary on free ports with a temp data dir."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest


ADMIN_KEY = "lw_test_admin_key_0123456789abcdefghij"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def binary() -> str:
    path = os.environ.get("LAKEWRITER_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/lakewriter-target"))
        path = str(Path(target) / "debug" / "lakewriter")
    assert Path(path).exists(), f"build the server first (cargo build): {path} missing"
    return path


class Server:
    """The binary with every listener on port 0 (no port can be taken between
    choosing and binding it); the bound ports come from its "lakewriter ready"
    log line."""

    def __init__(self, data_dir: Path, *args: str, env: dict | None = None):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "server.log"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        cmd = [
            binary(), "serve", "--data-dir", str(data_dir),
            "--grpc-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:0",
            "--internal-grpc-addr", "127.0.0.1:0",
            *args,
        ]
        # No test measures latency: skip faulting in 512 MiB of heap per server.
        env = {**os.environ, "LAKEWRITER_BOOTSTRAP_API_KEY": ADMIN_KEY,
               "LAKEWRITER_PRETOUCH_MEMORY": "0", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while True:
            log = ANSI.sub("", self.log_path.read_bytes()[offset:].decode(errors="replace"))
            ready = next((line for line in log.splitlines() if "lakewriter ready" in line), None)
            if ready:
                ports = {k: int(v) for k, v in re.findall(r"\b(grpc_addr|internal_grpc_addr|http_addr)=\S+:(\d+)", ready)}
                self.grpc_port, self.http_port = ports["grpc_addr"], ports["http_addr"]
                self.internal_port = ports["internal_grpc_addr"]
                try:
                    with urllib.request.urlopen(f"{self.http}/health", timeout=1) as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                self.proc.wait(timeout=60)
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def lake(self) -> Path:
        return self.data_dir / "lake"

    def post(self, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.http + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def create_key(self, tenant: str, scopes=("write", "read")) -> str:
        """A new API key of `tenant` (made with the admin key)."""
        return self.post("/api/v1/apikeys", {"tenant": tenant, "name": "py", "scopes": list(scopes)},
                         headers={"X-API-Key": ADMIN_KEY})["key"]

    def flush(self) -> dict:
        return self.post("/api/v1/admin/flush", headers={"X-API-Key": ADMIN_KEY})

    def metric(self, name: str) -> float:
        """The value of an unlabelled Prometheus metric of GET /metrics."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=30) as r:
            line = next(l for l in r.read().decode().splitlines() if l.split(" ")[0] == name)
        return float(line.split()[1])

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)

    def sql(self, sql: str) -> list:
        return self.post("/api/v1/query", {"sql": sql}, headers={"X-API-Key": ADMIN_KEY})["rows"]

    def stop(self) -> None:
        """SIGTERM; the server must exit cleanly (it flushes first) within two minutes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
                raise AssertionError(f"no exit within 2 min of SIGTERM:\n{self.log_path.read_text()}")
            assert self.proc.returncode == 0, f"exit {self.proc.returncode}:\n{self.log_path.read_text()}"


def block_lake(server: Server) -> Path:
    """A file where the default tenant's lake directory would go: flushes fail
    (and are retried), so memtables stay over a small budget until the file
    is removed. Returns its path."""
    server.lake.mkdir(parents=True, exist_ok=True)
    blocker = server.lake / "tenant=default"
    blocker.write_text("not a directory")
    return blocker


def deliver_after_refusal(server: Server, blocker: Path, send):
    """Runs `send()` on a thread, waits until the server has refused a write
    (lakewriter_ingest_rejected_total grows), removes `blocker` so flushes
    succeed again, and returns what `send` returned (re-raising its error)."""
    before = server.metric("lakewriter_ingest_rejected_total")
    outcome = {}

    def run():
        try:
            outcome["result"] = send()
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    sender = threading.Thread(target=run)
    sender.start()
    deadline = time.time() + 60
    while server.metric("lakewriter_ingest_rejected_total") == before:
        assert time.time() < deadline, "the write was never refused"
        time.sleep(0.05)
    blocker.unlink()
    sender.join(timeout=120)
    assert not sender.is_alive(), "the write was not delivered within 2 min"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "data")
    yield s
    s.stop()
