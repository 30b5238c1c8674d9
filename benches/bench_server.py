"""A fresh lakewriter server for the Python benchmarks: temp data dir, free
loopback ports, a bootstrap admin key; stopped with SIGTERM, then its data dir
is deleted (a 10 M-span run leaves ~4 GB)."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/lakewriter-target"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    def __init__(self, binary: str, key: str, *args: str, prefix: str = "lw-bench-"):
        self.data = Path(tempfile.mkdtemp(prefix=prefix))
        self.grpc, self.http, internal = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", str(self.data), "--grpc-addr", f"127.0.0.1:{self.grpc}",
             "--http-addr", f"127.0.0.1:{self.http}", "--internal-grpc-addr", f"127.0.0.1:{internal}",
             "--log", "warn", *args],
            env={**os.environ, "LAKEWRITER_BOOTSTRAP_API_KEY": key},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_target(self) -> str:
        return f"http://127.0.0.1:{self.grpc}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=300)
        shutil.rmtree(self.data, ignore_errors=True)
