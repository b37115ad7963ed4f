"""How long the WAL grows when passive checkpoints run on another connection.

    python3 benches/wal_checkpoints.py [GAP_MS ...]

The journal's shape (src/journal.rs, `Checkpointer`): one connection writes
(a row appended, then deleted, two transactions per update), and a second
one, on a thread of its own, runs `PRAGMA wal_checkpoint(PASSIVE)` when
woken every 16 updates. SQLite's own checkpoint is off here, so what the
WAL reaches shows whether the passive checkpoints alone let it start over.
For each GAP_MS (default 0 2 20: back to back, then 2 and 20 ms between
updates) it prints the WAL's largest size in frames over 3,000 updates and
how many checkpoints ran. Back to back, a passive checkpoint cannot end
between two writes and the WAL does not start over; that is why the
journal keeps SQLite's own checkpoint at 1,000 frames.
"""

import os
import sqlite3
import sys
import tempfile
import threading
import time

UPDATES = 3000
WAKE_EVERY = 16
FRAME = 4096 + 24


def run(gap_s, path):
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA synchronous=NORMAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE updates (id INTEGER PRIMARY KEY, body TEXT)")
    writer.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER)")
    stop, wake = threading.Event(), threading.Event()
    checkpoints = [0]

    def checkpointer():
        conn = sqlite3.connect(path, isolation_level=None)
        while not stop.is_set():
            if wake.wait(0.1):
                wake.clear()
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                checkpoints[0] += 1
        conn.close()

    thread = threading.Thread(target=checkpointer)
    thread.start()
    peak = 0
    for i in range(UPDATES):
        writer.execute("BEGIN")
        writer.execute("INSERT INTO updates VALUES (?, ?)", (i, "x" * 300))
        writer.execute(
            "INSERT INTO meta VALUES ('offset', ?) "
            "ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            (i,),
        )
        writer.execute("COMMIT")
        writer.execute("BEGIN")
        writer.execute("DELETE FROM updates WHERE id = ?", (i,))
        writer.execute("COMMIT")
        if i % WAKE_EVERY == 0:
            wake.set()
        if gap_s:
            time.sleep(gap_s)
        peak = max(peak, os.path.getsize(path + "-wal"))
    stop.set()
    thread.join()
    writer.close()
    return peak // FRAME, checkpoints[0]


def main():
    gaps = [float(a) for a in sys.argv[1:]] or [0, 2, 20]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "journal.sqlite3")
        for gap in gaps:
            frames, checkpoints = run(gap / 1000, path)
            print(
                f"{gap:g} ms between updates: WAL at most {frames} frames, "
                f"{checkpoints} checkpoints, {UPDATES} updates"
            )


if __name__ == "__main__":
    main()
