"""The worker channel and Python bridge on their own, without the daemon.

    python3 benches/bridge_roundtrip.py [EVENTS] [GAP_MS] [SCOPES]

Starts the bridge (src/bridge/asgigram_bridge.py) with tests/apps/echo3.py on
one end of a socketpair, as the daemon does, then writes EVENTS `event`
frames (default 3,000) round robin over SCOPES instances (default 200), one
every GAP_MS milliseconds (default 5, i.e. 200/s), and times each from the
write of its frame to the arrival of the app's `send` frame. That is the
daemon's channel write, the worker's wake-up, the bridge and the app, and
the wake-up back, with this script's own frame encoding and decoding (a few
microseconds) instead of the daemon's. Also prints the worker's CPU per event (user + system, from
/proc/PID/stat): at a steady rate most of it is waking up from idle.
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


def frame(obj):
    body = json.dumps(obj).encode()
    return HEADER.pack(len(body)) + body


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Channel:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def read(self):
        while True:
            if len(self.buf) >= 4:
                (size,) = HEADER.unpack(self.buf[:4])
                if len(self.buf) >= 4 + size:
                    msg = json.loads(self.buf[4:4 + size])
                    self.buf = self.buf[4 + size:]
                    return msg
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the bridge closed the channel")
            self.buf += chunk


def main():
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    gap = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.005
    scopes = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    worker = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "src", "bridge", "asgigram_bridge.py"),
         "--fd", str(theirs.fileno()), "--app", "echo3:app",
         "--app-dir", os.path.join(ROOT, "tests", "apps"), "--lifespan", "off"],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    channel = Channel(ours)
    try:
        while channel.read()["op"] != "ready":
            pass
        for sid in range(1, scopes + 1):
            scope = {"type": "telegram", "chat": {"id": sid, "type": "private"}}
            ours.sendall(frame({"op": "start", "sid": sid, "scope": scope}))
        times = []
        cpu0 = cpu_seconds(worker.pid)
        for i in range(events):
            sid = i % scopes + 1
            event = {"type": "telegram.message", "text": "hi %d" % i, "chat": {"id": sid}}
            data = frame({"op": "event", "sid": sid, "seq": i // scopes, "event": event})
            start = time.perf_counter()
            ours.sendall(data)
            while True:
                msg = channel.read()
                if msg["op"] == "send":
                    break
                if msg["op"] not in ("received", "idle", "log"):
                    raise RuntimeError("unexpected frame: %r" % (msg,))
            times.append(time.perf_counter() - start)
            time.sleep(gap)
        cpu = cpu_seconds(worker.pid) - cpu0
    finally:
        ours.close()
        worker.wait(timeout=10)
    times.sort()

    def pct(p):
        return times[min(len(times) - 1, int(len(times) * p))] * 1e6

    print("bridge round trip over %d events (%d scopes, one every %.1f ms): "
          "p50 %.0f us, p90 %.0f us, p99 %.0f us; worker CPU %.0f us/event"
          % (events, scopes, gap * 1000, pct(0.5), pct(0.9), pct(0.99), cpu * 1e6 / events))


if __name__ == "__main__":
    main()
