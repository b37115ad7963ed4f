"""The Python worker alone in a burst: its CPU per event, without the daemon.

    python3 benches/bridge_burst.py [EVENTS] [SCOPES] [BRIDGE]

Starts the bridge (src/bridge/asgigram_bridge.py, or BRIDGE: another copy
of it, to compare two versions) with tests/apps/echo3.py on one end of a
socketpair, as the daemon does, starts SCOPES instances (default 1,000) and
writes EVENTS `event` frames (default 50,000) the way the daemon's burst
reaches it: in batches of 100, one event per scope, at most 10 batches
unanswered. Prints the worker's CPU per event (user + system, from
/proc/PID/stat) and events/s. The events look like the sandbox's text
messages.

With WORKER_PYTHON set, that command runs the bridge instead of this
interpreter: e.g. a script that execs `valgrind --tool=callgrind python3
"$@"`, to count the bridge's instructions (the difference between two
EVENTS counts, divided by their difference, leaves start-up out).
"""

import json
import os
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = struct.Struct(">I")
BATCH, WINDOW = 100, 10


def frame(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def memory_kib(pid, field):
    """VmRSS or VmHWM (the peak) of a process, in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Frames:
    """The frames the bridge writes, as they come."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def read(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("the bridge closed the channel")
        self.buf += chunk
        out, pos = [], 0
        while len(self.buf) - pos >= 4:
            (size,) = HEADER.unpack_from(self.buf, pos)
            if len(self.buf) - pos - 4 < size:
                break
            out.append(json.loads(bytes(self.buf[pos + 4:pos + 4 + size])))
            pos += 4 + size
        del self.buf[:pos]
        return out


def event_frame(i, scopes):
    sid = i % scopes + 1
    user = 10000 + sid
    event = {
        "message_id": i + 1,
        "from": {"id": user, "is_bot": False, "first_name": "User %d" % user},
        "chat": {"id": user, "first_name": "U", "type": "private"},
        "date": 1764640000,
        "text": "u%d" % i,
        "type": "telegram.message",
        "update_id": 100000000 + i,
    }
    return frame({"op": "event", "sid": sid, "seq": i // scopes, "event": event})


def main():
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    scopes = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    bridge = sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "src", "bridge", "asgigram_bridge.py")
    with open(bridge, encoding="utf-8") as f:
        source = f.read()
    ours, theirs = socket.socketpair()
    python = os.environ.get("WORKER_PYTHON", sys.executable)
    worker = subprocess.Popen(
        [python, "-u", "-c", source, "--fd", str(theirs.fileno()), "--app", "echo3:app",
         "--app-dir", os.path.join(ROOT, "tests", "apps"), "--lifespan", "off"],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    ours.settimeout(600)
    frames = Frames(ours)
    try:
        while not any(f["op"] == "ready" for f in frames.read()):
            pass
        rss_ready = memory_kib(worker.pid, "VmRSS")
        bot = {"id": 1, "is_bot": True, "first_name": "Bench", "username": "bench_bot"}
        for sid in range(1, scopes + 1):
            chat = {"id": 10000 + sid, "first_name": "U", "type": "private"}
            scope = {"type": "telegram", "chat": chat, "bot": bot, "extensions": {}}
            ours.sendall(frame({"op": "start", "sid": sid, "scope": scope}))
        batches = [b"".join(event_frame(i, scopes) for i in range(b, min(b + BATCH, events)))
                   for b in range(0, events, BATCH)]
        cpu0, t0 = cpu_seconds(worker.pid), time.perf_counter()
        written = replies = 0
        while replies < events:
            while written < len(batches) and written * BATCH - replies < WINDOW * BATCH:
                ours.sendall(batches[written])
                written += 1
            replies += sum(1 for f in frames.read() if f["op"] == "send")
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(worker.pid) - cpu0
        rss, peak = memory_kib(worker.pid, "VmRSS"), memory_kib(worker.pid, "VmHWM")
    finally:
        ours.close()
        worker.wait(timeout=30)
    print("%s: %d events over %d scopes, %.0f events/s, worker CPU %.1f us/event"
          % (os.path.basename(bridge), events, scopes, events / elapsed, cpu * 1e6 / events))
    # Every scope is still live: what each holds, idle, after its events.
    print("  RSS at ready %.1f MB, after %.1f MB (peak %.1f MB), %.0f B per live scope"
          % (rss_ready / 1024, rss / 1024, peak / 1024, (rss - rss_ready) * 1024 / scopes))


if __name__ == "__main__":
    main()
