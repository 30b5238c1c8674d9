#!/usr/bin/env python3
"""Measures this disk's fsync latency: N x (append 4 KiB, fsync) on one file.

Usage: python3 benches/fsync_latency.py [DIR] [N]   (default DIR=/tmp, N=2000)
This is the physical floor of a synced WAL write; lakewriter's group commit
amortises one fsync over every request that arrived while the previous one ran.
"""
import os
import statistics
import sys
import tempfile
import time

directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
path = os.path.join(directory, f"fsync-probe-{os.getpid()}")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
block = os.urandom(4096)
samples = []
try:
    for _ in range(n):
        os.write(fd, block)
        t = time.perf_counter()
        os.fsync(fd)
        samples.append((time.perf_counter() - t) * 1e6)
finally:
    os.close(fd)
    os.unlink(path)
samples.sort()
q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]
print(f"fsync of a 4 KiB append on {directory}: n={n} mean={statistics.mean(samples):.0f}us "
      f"p50={q(0.5):.0f}us p99={q(0.99):.0f}us max={samples[-1]:.0f}us => {1e6 / statistics.mean(samples):.0f} fsyncs/s")
