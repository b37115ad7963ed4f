"""How long this disk takes to make a small write durable, at a steady rate.

    python3 benches/fsync_probe.py [COUNT] [INTERVAL_MS] [DIR]

Appends 4 KiB to a file in DIR (default: the system's temporary directory,
where the throughput bench puts the daemon's journal) and calls fdatasync,
COUNT times (default 3000), one every INTERVAL_MS (default 5, the steady
bench's 200/s), and prints the latency percentiles of write + fdatasync.
That is what the journal's append waits for per batch (SQLite in WAL mode
with synchronous = FULL: the WAL frames written, then one fdatasync), so it
is the floor under the time the Poller waits before its next getUpdates.
"""

import os
import sys
import tempfile
import time


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    interval = (float(sys.argv[2]) if len(sys.argv) > 2 else 5.0) / 1000
    where = sys.argv[3] if len(sys.argv) > 3 else tempfile.gettempdir()
    block = b"x" * 4096
    took = []
    with tempfile.NamedTemporaryFile(dir=where) as f:
        fd = f.fileno()
        t0 = time.monotonic()
        for i in range(count):
            due = t0 + i * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            start = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            took.append(time.perf_counter() - start)
            # A WAL is reset after each checkpoint; keep the file small as
            # the journal's WAL stays, so the probe measures appends, not
            # growth of a large file.
            if i % 1000 == 999:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
    took.sort()
    pct = lambda p: took[min(len(took) - 1, int(len(took) * p))] * 1e3
    print(
        f"write 4 KiB + fdatasync in {where}, {count} times every {interval * 1e3:g} ms: "
        f"p50 {pct(0.5):.3f} ms, p90 {pct(0.9):.3f} ms, p99 {pct(0.99):.3f} ms, "
        f"max {took[-1] * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
