#!/usr/bin/env python3
"""How a bulk file write disturbs a concurrent small append + fdatasync.

The foreground loop is the WAL's pattern: append SIZE bytes, fdatasync, sleep
GAP, N times. Meanwhile a background process writes FILES files of MB MiB each,
one at a time, in one of three ways:

  whole  write the whole file, then fsync once (what object_store's put did)
  sync   fdatasync after every MiB
  range  sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER) after every MiB, then
         fsync (what lakewriter's local lake writes do now)
  none   no background writer

MODE may end in "+overwrite": the foreground loop then writes over a file
that was written and fsync'd beforehand (what RocksDB's recycled log files
do), so its fdatasync has no file size or extent change to journal.

Usage: fsync_interference.py DIR MODE[+overwrite] [N SIZE GAP FILES MB]
Prints the foreground latency percentiles in ms.
"""
import ctypes
import os
import sys
import time

SYNC_FILE_RANGE = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER


def background(path, mode, files, mb):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    chunk = os.urandom(1 << 20)
    for _ in range(files):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for i in range(mb):
            os.write(fd, chunk)
            if mode == "sync":
                os.fdatasync(fd)
            elif mode == "range":
                libc.sync_file_range(fd, i << 20, 1 << 20, SYNC_FILE_RANGE)
        os.fsync(fd)
        os.close(fd)
        time.sleep(0.5)
    os.unlink(path)


def main():
    d, mode = sys.argv[1], sys.argv[2]
    mode, _, fg_mode = mode.partition("+")
    defaults = ["2000", "190000", "0.004", "8", "40"]
    args = sys.argv[3:8]
    n, size, gap, files, mb = args + defaults[len(args):]
    n, size, gap, files, mb = int(n), int(size), float(gap), int(files), int(mb)
    fg = os.path.join(d, "fsync_interference.wal")
    buf = os.urandom(size)
    if fg_mode == "overwrite":
        fd = os.open(fg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for _ in range(n):
            os.write(fd, buf)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        fd = os.open(fg, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    child = None
    if mode != "none":
        child = os.fork()
        if child == 0:
            background(os.path.join(d, "fsync_interference.bulk"), mode, files, mb)
            os._exit(0)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        os.write(fd, buf)
        os.fdatasync(fd)
        lat.append((time.perf_counter() - t) * 1000)
        time.sleep(gap)
    os.close(fd)
    os.unlink(fg)
    if child:
        os.waitpid(child, 0)
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    print(
        f"mode={mode} fg={fg_mode or 'append'} n={n} size={size} p50={q(.5):.2f} p99={q(.99):.2f} "
        f"p99.9={q(.999):.2f} max={lat[-1]:.2f} over20ms={sum(x > 20 for x in lat)}"
    )


if __name__ == "__main__":
    main()
