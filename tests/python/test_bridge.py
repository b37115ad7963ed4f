"""Tests for src/bridge/asgigram_bridge.py.

Each test starts the real bridge the way asgigramd does (`python3 -u -c <source>
--fd 3 ...`, one end of a socketpair as fd 3), writes a small ASGI app into a
temp dir, and speaks the framing from docs/worker-protocol.md over the other end.
Every wait is bounded; a stuck bridge fails the test instead of hanging it.

Run from the repository root:  python3 -m unittest discover -s tests/python -v
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BRIDGE_PATH = os.path.join(ROOT, "src", "bridge", "asgigram_bridge.py")
with open(BRIDGE_PATH, encoding="utf-8") as _f:
    BRIDGE_SOURCE = _f.read()

TIMEOUT = 5.0
HEADER = struct.Struct(">I")
# What the daemon sends as soon as getMe answered; the lifespan waits for it.
TEST_BOT = {"id": 4242, "is_bot": True, "first_name": "Test", "username": "test_bot"}
_NO_BOT = object()


def b64(data):
    return base64.b64encode(data).decode("ascii")


class Bridge:
    """A running bridge process plus the daemon's end of its channel."""

    def __init__(self, app_source, spec="app:app", lifespan=None, files=None, bot=TEST_BOT):
        self.dir = tempfile.mkdtemp(prefix="asgigram-bridge-test-")
        self.app_dir = os.path.join(self.dir, "app")
        os.mkdir(self.app_dir)
        files = dict(files or {})
        files.setdefault("app.py", app_source)
        for name, text in files.items():
            path = os.path.join(self.app_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(textwrap.dedent(text))
        self.stdout_path = os.path.join(self.dir, "stdout")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        child_fd = child.fileno()

        def put_channel_on_fd3():
            # Runs in the child between fork and exec: dup2 clears CLOEXEC on the
            # target, so fd 3 survives exec (close_fds=False keeps it open).
            if child_fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(child_fd, 3)

        argv = [sys.executable, "-u", "-c", BRIDGE_SOURCE, "--fd", "3",
                "--app", spec, "--app-dir", self.app_dir]
        if lifespan:
            argv += ["--lifespan", lifespan]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                close_fds=False, preexec_fn=put_channel_on_fd3, cwd=self.dir,
            )
        child.close()
        self.frames = []  # every frame read, in order
        self._buf = b""
        if bot is not _NO_BOT:
            self.send(op="bot", bot=bot)

    # -- framing

    def send_raw(self, body):
        self.sock.sendall(HEADER.pack(len(body)) + body)

    def send(self, **frame):
        self.send_raw(json.dumps(frame).encode("utf-8"))

    def _recv_exact(self, n, deadline):
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("channel closed")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_frame(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        (size,) = HEADER.unpack(self._recv_exact(4, deadline))
        frame = json.loads(self._recv_exact(size, deadline))
        self.frames.append(frame)
        return frame

    def expect(self, op, timeout=TIMEOUT, **match):
        """Read until a frame with `op` (and the given key values) arrives."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no %r frame matching %r; got %r" % (op, match, self.frames))
            try:
                frame = self.read_frame(remaining)
            except (socket.timeout, EOFError) as exc:
                raise AssertionError("no %r frame matching %r (%s); got %r"
                                     % (op, match, exc, self.frames)) from None
            if frame.get("op") == op and all(frame.get(k) == v for k, v in match.items()):
                return frame

    def ready(self):
        return self.expect("ready")

    def read_all_until_eof(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        out = []
        while True:
            try:
                out.append(self.read_frame(max(0.01, deadline - time.monotonic())))
            except EOFError:
                return out

    def start(self, sid, scope=None):
        self.send(op="start", sid=sid, scope=scope if scope is not None else chat_scope())

    def event(self, sid, seq, event):
        self.send(op="event", sid=sid, seq=seq, event=event)

    def response(self, sid, event):
        self.send(op="response", sid=sid, event=event)

    # -- process

    def wait(self, timeout=TIMEOUT):
        return self.proc.wait(timeout)

    def stdout(self):
        with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def chat_scope(**extra):
    scope = {"type": "telegram.message", "chat": {"id": 42, "type": "private"},
             "user": {"id": 7, "first_name": "Ann"}}
    scope.update(extra)
    return scope


def user_scope():
    return {"type": "telegram.inline_query", "user": {"id": 7, "first_name": "Ann"}}


ECHO_APP = """
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return
        event = await receive()
        await send({"type": "telegram.send_message",
                    "text": "%s|%s" % (scope["asgi"]["version"], event["text"])})
"""


class BridgeTestCase(unittest.TestCase):
    def bridge(self, app_source, **kwargs):
        bridge = Bridge(app_source, **kwargs)
        self.addCleanup(bridge.cleanup)
        return bridge

    def reply_text(self, bridge, sid):
        return bridge.expect("send", sid=sid)["event"]["text"]


class AppStyles(BridgeTestCase):
    def test_asgi3_function_echo(self):
        b = self.bridge(ECHO_APP)
        ready = b.ready()
        self.assertEqual(ready["asgi_version"], "3.0")
        self.assertEqual(ready["pid"], b.proc.pid)
        self.assertIs(ready["lifespan"], False)
        self.assertIsInstance(ready["python"], str)
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "hi"})
        self.assertEqual(b.expect("received", sid=1), {"op": "received", "sid": 1, "seq": 1})
        send = b.expect("send", sid=1)
        self.assertEqual(send["event"], {"type": "telegram.send_message", "text": "3.0|hi"})
        self.assertEqual(b.expect("ended", sid=1), {"op": "ended", "sid": 1, "error": None, "cancelled": False})

    def test_asgi3_class_instance_with_async_call(self):
        b = self.bridge("""
            class App:
                async def __call__(self, scope, receive, send):
                    if scope["type"] == "lifespan":
                        return
                    event = await receive()
                    await send({"type": "telegram.send_message",
                                "text": "%s|%s" % (scope["asgi"]["version"], event["text"])})
            app = App()
        """)
        self.assertEqual(b.ready()["asgi_version"], "3.0")
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "x"})
        self.assertEqual(self.reply_text(b, 1), "3.0|x")

    def test_asgi2_double_callable_class(self):
        b = self.bridge("""
            class App:
                def __init__(self, scope):
                    self.scope = scope
                async def __call__(self, receive, send):
                    if self.scope["type"] == "lifespan":
                        return
                    event = await receive()
                    asgi = self.scope["asgi"]
                    await send({"type": "telegram.send_message",
                                "text": "%s/%s|%s" % (asgi["version"], asgi["spec_version"], event["text"])})
            app = App
        """)
        self.assertEqual(b.ready()["asgi_version"], "2.0")
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "old"})
        self.assertEqual(self.reply_text(b, 1), "2.0/1.1|old")

    def test_single_callable_marker_and_dotted_attr(self):
        # A plain function returning a coroutine would count as ASGI 2 without the marker.
        b = self.bridge("""
            async def _impl(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                await send({"type": "telegram.send_message", "text": scope["asgi"]["version"]})
            def wrapped(scope, receive, send):
                return _impl(scope, receive, send)
            wrapped._asgi_single_callable = True
            class holder:
                app = staticmethod(wrapped)
        """, spec="app:holder.app")
        self.assertEqual(b.ready()["asgi_version"], "3.0")
        b.start(1)
        self.assertEqual(self.reply_text(b, 1), "3.0")

    def test_app_dir_is_first_on_sys_path(self):
        b = self.bridge("""
            import sys, json
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                await send({"type": "telegram.send_message", "text": json.dumps(sys.path[:2])})
        """, spec="pkg.mod:app", files={"pkg/__init__.py": "", "pkg/mod.py": "from app import app\n"})
        b.ready()
        b.start(1)
        path = json.loads(self.reply_text(b, 1))
        self.assertEqual(path[0], b.app_dir)
        self.assertNotIn("", path)
        self.assertNotIn(b.dir, path)  # the cwd the -c entry would have added


class Loading(BridgeTestCase):
    def test_import_error_is_fatal_with_traceback(self):
        b = self.bridge("import does_not_exist_xyz\n")
        fatal = b.expect("fatal")
        self.assertIn("Traceback", fatal["error"])
        self.assertIn("ModuleNotFoundError", fatal["error"])
        self.assertIn("does_not_exist_xyz", fatal["error"])
        self.assertEqual(b.wait(), 1)
        self.assertNotIn("ready", [f["op"] for f in b.frames])

    def test_syntax_error_is_fatal(self):
        b = self.bridge("def broken(:\n")
        fatal = b.expect("fatal")
        self.assertIn("SyntaxError", fatal["error"])
        self.assertEqual(b.wait(), 1)

    def test_missing_attribute_is_fatal(self):
        b = self.bridge(ECHO_APP, spec="app:nope.deeper")
        fatal = b.expect("fatal")
        self.assertIn("'nope.deeper'", fatal["error"])
        self.assertIn("AttributeError", fatal["error"])
        self.assertEqual(b.wait(), 1)

    def test_bad_spec_is_fatal(self):
        b = self.bridge(ECHO_APP, spec="app")
        fatal = b.expect("fatal")
        self.assertIn("module.path:attr", fatal["error"])
        self.assertEqual(b.wait(), 1)


class Instances(BridgeTestCase):
    def test_app_exception_reported_in_ended(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                raise ValueError("boom in handler")
        """)
        b.ready()
        b.start(3)
        ended = b.expect("ended", sid=3)
        self.assertIs(ended["cancelled"], False)
        self.assertIn("Traceback", ended["error"])
        self.assertIn("ValueError: boom in handler", ended["error"])
        # The daemon logs the traceback; the bridge must not print it as well.
        b.send(op="shutdown", grace=0)
        self.assertEqual(b.wait(), 0)
        self.assertNotIn("boom in handler", b.stderr())

    def test_unreceived_events_stay_unacked(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                await receive()
                raise RuntimeError("stop after first")
        """)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "a"})
        b.event(1, 2, {"type": "telegram.message", "text": "b"})
        b.expect("ended", sid=1)
        acks = [f["seq"] for f in b.frames if f["op"] == "received"]
        self.assertEqual(acks, [1])
        # Events for an ended sid are ignored, and nothing else arrives for it.
        b.event(1, 3, {"type": "telegram.message", "text": "c"})
        b.send(op="ping", n=1)
        b.expect("pong", n=1)
        self.assertEqual([f["seq"] for f in b.frames if f["op"] == "received"], [1])

    def test_idle_says_the_app_asked_for_more_with_nothing_queued(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                while True:
                    event = await receive()
                    await send({"type": "telegram.send_message", "text": event["text"]})
        """)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "a"})
        b.expect("send", sid=1)
        # Done with "a" and waiting: one idle, after the send it made.
        self.assertEqual(b.expect("idle", sid=1), {"op": "idle", "sid": 1})
        ops = [f["op"] for f in b.frames if f.get("sid") == 1]
        self.assertEqual(ops, ["received", "send", "idle"])
        b.event(1, 2, {"type": "telegram.message", "text": "b"})
        b.expect("received", sid=1, seq=2)
        b.expect("idle", sid=1)
        ops = [f["op"] for f in b.frames if f.get("sid") == 1]
        self.assertEqual(ops, ["received", "send", "idle", "received", "send", "idle"])

    AWAITING_APP = """
        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                return
            while True:
                event = await receive()
                if event["type"] == "telegram.disconnect":
                    await send({"type": "telegram.send_message", "text": "bye"})
                    return
                await send({"type": "telegram.api", "method": "sendMessage",
                            "params": {"text": "a:" + event["text"]}, "request_id": event["text"]})
                reply = await receive()
                await send({"type": "telegram.send_message",
                            "text": "b:%s got %s" % (event["text"], reply.get("request_id"))})
    """

    def test_a_response_comes_before_the_events_queued_ahead_of_it(self):
        b = self.bridge(self.AWAITING_APP)
        b.ready()
        b.start(1)
        # Both written before the app made its call, as a burst would be.
        b.event(1, 1, {"type": "telegram.message", "text": "x"})
        b.event(1, 2, {"type": "telegram.message", "text": "y"})
        self.assertEqual(b.expect("send", sid=1)["event"]["request_id"], "x")
        b.send(op="response", sid=1,
               event={"type": "telegram.api.response", "request_id": "x", "ok": True, "result": {}})
        self.assertEqual(b.expect("send", sid=1)["event"]["text"], "b:x got x")
        self.assertEqual(b.expect("send", sid=1)["event"]["request_id"], "y")
        b.send(op="response", sid=1,
               event={"type": "telegram.api.response", "request_id": "y", "ok": True, "result": {}})
        self.assertEqual(b.expect("send", sid=1)["event"]["text"], "b:y got y")
        b.expect("idle", sid=1)
        # "y" was received only after the second call of "x" was sent, and no
        # idle was written while a response was owed.
        ops = [(f["op"], f.get("seq")) for f in b.frames if f.get("sid") == 1]
        self.assertEqual(ops, [("received", 1), ("send", None), ("send", None),
                               ("received", 2), ("send", None), ("send", None), ("idle", None)])

    def test_a_disconnect_waits_behind_an_owed_response(self):
        b = self.bridge(self.AWAITING_APP)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "x"})
        b.expect("send", sid=1)
        b.event(1, 2, {"type": "telegram.disconnect", "reason": "shutdown"})
        b.send(op="ping", n=1)
        b.expect("pong", n=1)
        self.assertNotIn(2, [f.get("seq") for f in b.frames if f["op"] == "received"])
        b.send(op="response", sid=1,
               event={"type": "telegram.api.response", "request_id": "x", "ok": True, "result": {}})
        self.assertEqual(b.expect("send", sid=1)["event"]["text"], "b:x got x")
        b.expect("received", sid=1, seq=2)
        self.assertEqual(b.expect("send", sid=1)["event"]["text"], "bye")
        b.expect("ended", sid=1)

    def test_a_response_for_an_unknown_sid_is_ignored(self):
        b = self.bridge(ECHO_APP)
        b.ready()
        b.send(op="response", sid=9, event={"type": "telegram.api.response", "request_id": 1, "ok": True})
        b.send(op="response", sid=9, event="not an object")
        b.send(op="ping", n=1)
        b.expect("pong", n=1)
        warnings = [f for f in b.frames if f["op"] == "log" and f["level"] != "debug"]
        self.assertEqual(warnings, [])

    def test_close_with_grace_cancels_app_ignoring_disconnect(self):
        b = self.bridge("""
            import asyncio
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                await receive()
                await asyncio.sleep(60)
        """)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.disconnect"})
        b.expect("received", sid=1, seq=1)
        started = time.monotonic()
        b.send(op="close", sid=1, grace=0.3)
        ended = b.expect("ended", sid=1)
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual(ended, {"op": "ended", "sid": 1, "error": None, "cancelled": True})
        self.assertEqual(len([f for f in b.frames if f["op"] == "ended"]), 1)

    def test_close_when_app_returns_on_disconnect_is_not_cancelled(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                while (await receive())["type"] != "telegram.disconnect":
                    pass
        """)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.disconnect"})
        b.send(op="close", sid=1, grace=5)
        self.assertEqual(b.expect("ended", sid=1)["cancelled"], False)

    def test_receive_after_disconnect_keeps_returning_disconnect(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                first = await receive()
                again = [await receive() for _ in range(3)]
                await send({"type": "telegram.send_message",
                            "text": ",".join(e["type"] for e in [first] + again)
                                    + "|same=%s" % all(e is first for e in again)})
        """)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.disconnect"})
        b.send(op="close", sid=1, grace=5)
        self.assertEqual(self.reply_text(b, 1),
                         ",".join(["telegram.disconnect"] * 4) + "|same=True")
        b.expect("ended", sid=1)
        self.assertEqual([f["seq"] for f in b.frames if f["op"] == "received"], [1])

    def test_many_events_throughput(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                while True:
                    event = await receive()
                    if event["type"] == "telegram.disconnect":
                        return
                    await send({"type": "telegram.send_message", "text": event["text"]})
        """)
        b.ready()
        n = 5000
        b.start(1)
        started = time.monotonic()
        chunk = []
        for seq in range(1, n + 1):
            body = json.dumps({"op": "event", "sid": 1, "seq": seq,
                               "event": {"type": "telegram.message", "text": str(seq)}}).encode()
            chunk.append(HEADER.pack(len(body)) + body)
        chunk.append(HEADER.pack(0))  # ignore: keep reading working after a bad frame
        b.sock.sendall(b"".join(chunk))
        b.event(1, n + 1, {"type": "telegram.disconnect"})
        b.expect("ended", sid=1, timeout=20)
        elapsed = time.monotonic() - started
        sends = [f["event"]["text"] for f in b.frames if f["op"] == "send"]
        acks = [f["seq"] for f in b.frames if f["op"] == "received"]
        self.assertEqual(sends, [str(i) for i in range(1, n + 1)])
        self.assertEqual(acks, list(range(1, n + 2)))
        sys.stderr.write("[%d events in %.2fs = %.0f/s] " % (n, elapsed, n / elapsed))

    def test_pause_makes_send_wait_and_resume_releases_it_in_order(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                while True:
                    event = await receive()
                    if event["type"] == "telegram.disconnect":
                        return
                    await send({"type": "telegram.send_message", "text": event["text"]})
        """)
        b.ready()
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "before"})
        b.expect("send", sid=1)
        b.send(op="pause")
        b.event(1, 2, {"type": "telegram.message", "text": "a"})
        b.event(1, 3, {"type": "telegram.message", "text": "b"})
        # The app received "a" (acked) but its send() waits: no send frame.
        b.expect("received", sid=1, seq=2)
        b.send(op="ping", n=7)
        b.expect("pong", n=7)
        self.assertEqual([f["event"]["text"] for f in b.frames if f["op"] == "send"], ["before"])
        b.send(op="resume")
        b.expect("send", sid=1, timeout=5)
        b.event(1, 4, {"type": "telegram.disconnect"})
        b.expect("ended", sid=1)
        sends = [f["event"]["text"] for f in b.frames if f["op"] == "send"]
        self.assertEqual(sends, ["before", "a", "b"])


VALIDATION_APP = """
    import asyncio
    CASES = {
        "nondict": ["telegram.send_message"],
        "notype": {"text": "x"},
        "unknown": {"type": "telegram.fly", "text": "x"},
        "missing_text": {"type": "telegram.send_message", "chat_id": 1},
        "int_text": {"type": "telegram.send_message", "chat_id": 1, "text": 5},
        "bad_chat_id": {"type": "telegram.send_message", "chat_id": 1.5, "text": "x"},
        "set_value": {"type": "telegram.api", "method": "sendPhoto", "params": {"photo": {1, 2}}},
        "nested_bad": {"type": "telegram.api", "method": "sendMediaGroup",
                       "params": {"media": [{"type": "photo"}, {"media": object()}]}},
        "int_key": {"type": "telegram.api", "method": "x", "params": {1: "a"}},
        "nan": {"type": "telegram.api", "method": "x", "params": {"v": float("nan")}},
        "no_method": {"type": "telegram.api", "params": {}},
        "empty_method": {"type": "telegram.api", "method": ""},
        "params_list": {"type": "telegram.api", "method": "getMe", "params": [1]},
        "bad_request_id": {"type": "telegram.api", "method": "getMe", "request_id": 1.5},
        "no_chat_id": {"type": "telegram.send_message", "text": "hello"},
        "tuple_ok": {"type": "telegram.api", "method": "x", "params": {"t": (1, (2, "3"))},
                     "request_id": "r1"},
        "download_no_file_id": {"type": "telegram.download", "request_id": 1},
        "download_int_file_id": {"type": "telegram.download", "file_id": 5, "request_id": 1},
        "download_no_request_id": {"type": "telegram.download", "file_id": "AgAD"},
        "download_bad_request_id": {"type": "telegram.download", "file_id": "AgAD", "request_id": None},
        "download_ok": {"type": "telegram.download", "file_id": "AgAD", "request_id": "d1"},
    }
    saved_send = []
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return
        while True:
            event = await receive()
            if event["type"] == "telegram.disconnect":
                saved_send.append(send)
                return
            case = event["case"]
            try:
                if case == "after_end":
                    await saved_send[0]({"type": "telegram.send_message", "chat_id": 1, "text": "x"})
                else:
                    await send(CASES[case])
            except Exception as exc:
                text = "%s: %s" % (type(exc).__name__, exc)
            else:
                text = "ok"
            await send({"type": "telegram.send_message", "chat_id": 1, "text": text})
"""


class Validation(BridgeTestCase):
    def setUp(self):
        self.b = self.bridge(VALIDATION_APP)
        self.b.ready()
        self.seq = 0

    def outcome(self, case, sid=1):
        """Run one case; return the error text the app sent back, checking that
        the failed send wrote nothing."""
        self.seq += 1
        self.b.event(sid, self.seq, {"type": "telegram.message", "case": case})
        send = self.b.expect("send", sid=sid)
        self.assertEqual(send["event"]["chat_id"], 1, "a rejected event was written: %r" % send)
        return send["event"]["text"]

    def test_rejected_events(self):
        self.b.start(1)
        expected = {
            "nondict": "TypeError: send() takes a dict event, got list",
            "notype": "ValueError: event has no 'type'",
            "unknown": "ValueError: unknown event type 'telegram.fly'",
            "missing_text": "ValueError: telegram.send_message requires 'text'",
            "int_text": "TypeError: telegram.send_message requires 'text' to be a str, got int",
            "bad_chat_id": "TypeError: telegram.send_message 'chat_id' must be an int or str, got float",
            "set_value": "TypeError: value at params.photo is of type set, which is not an ASGI type",
            "nested_bad": "TypeError: value at params.media[1].media is of type object, which is not an ASGI type",
            "int_key": "TypeError: key 1 at params is of type int; dict keys must be str",
            "nan": "ValueError: value at params.v is nan",
            "no_method": "ValueError: telegram.api requires 'method'",
            "empty_method": "TypeError: telegram.api requires 'method' to be a non-empty str",
            "params_list": "TypeError: telegram.api 'params' must be a dict, got list",
            "bad_request_id": "TypeError: 'request_id' must be a str or int, got float",
            "download_no_file_id": "ValueError: telegram.download requires 'file_id'",
            "download_int_file_id": "TypeError: telegram.download requires 'file_id' to be a non-empty str, got int",
            "download_no_request_id": "ValueError: telegram.download requires a 'request_id'",
            "download_bad_request_id": "TypeError: 'request_id' must be a str or int, got NoneType",
        }
        for case, prefix in expected.items():
            with self.subTest(case=case):
                self.assertTrue(self.outcome(case).startswith(prefix), self.b.frames[-1])

    def test_user_scope_requires_chat_id(self):
        self.b.start(2, user_scope())
        text = self.outcome("no_chat_id", sid=2)
        self.assertTrue(text.startswith("ValueError: "), text)
        self.assertIn("chat_id", text)
        self.assertIn("user scope", text)

    def test_chat_scope_defaults_chat_id(self):
        self.b.start(1)
        self.seq += 1
        self.b.event(1, self.seq, {"type": "telegram.message", "case": "no_chat_id"})
        self.assertEqual(self.b.expect("send", sid=1)["event"], {"type": "telegram.send_message", "text": "hello"})
        self.assertEqual(self.b.expect("send", sid=1)["event"]["text"], "ok")

    def test_tuples_become_lists(self):
        self.b.start(1)
        self.seq += 1
        self.b.event(1, self.seq, {"type": "telegram.message", "case": "tuple_ok"})
        event = self.b.expect("send", sid=1)["event"]
        self.assertEqual(event["params"], {"t": [1, [2, "3"]]})
        self.assertEqual(event["request_id"], "r1")

    def test_a_download_with_file_id_and_request_id_goes_out(self):
        self.b.start(1)
        self.seq += 1
        self.b.event(1, self.seq, {"type": "telegram.message", "case": "download_ok"})
        self.assertEqual(
            self.b.expect("send", sid=1)["event"],
            {"type": "telegram.download", "file_id": "AgAD", "request_id": "d1"},
        )
        self.assertEqual(self.b.expect("send", sid=1)["event"]["text"], "ok")

    def test_send_after_instance_ended_raises(self):
        self.b.start(1)
        self.b.event(1, 1, {"type": "telegram.disconnect"})
        self.b.expect("ended", sid=1)
        self.b.start(2)
        text = self.outcome("after_end", sid=2)
        self.assertTrue(text.startswith("RuntimeError: "), text)
        self.assertIn("ended", text)


class Bytes(BridgeTestCase):
    def test_bytes_round_trip(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                event = await receive()
                data = event["file"]["data"]
                await send({"type": "telegram.api", "method": "sendDocument",
                            "params": {"document": data + b"!", "caption": type(data).__name__,
                                       "nested": [{"b": b""}], "not_bytes": {"$bytes": 1, "x": 2}}})
        """)
        b.ready()
        payload = bytes(range(256))
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "file": {"data": {"$bytes": b64(payload)}}})
        params = b.expect("send", sid=1)["event"]["params"]
        self.assertEqual(params["caption"], "bytes")
        self.assertEqual(params["document"], {"$bytes": b64(payload + b"!")})
        self.assertEqual(params["nested"], [{"b": {"$bytes": ""}}])
        self.assertEqual(params["not_bytes"], {"$bytes": 1, "x": 2})


LIFESPAN_APP = """
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["db"] = "connected"
                    print("STARTUP-RAN")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    print("SHUTDOWN-RAN")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            seen = "%s,%s" % (scope["state"].get("db"), scope["state"].get("mine"))
            scope["state"]["db"] = "mutated"
            scope["state"]["mine"] = "leaked"
            await send({"type": "telegram.send_message", "text": seen})
"""


class LifespanTests(BridgeTestCase):
    def test_startup_complete_and_state(self):
        b = self.bridge(LIFESPAN_APP)
        self.assertIs(b.ready()["lifespan"], True)
        for sid in (1, 2):  # each scope gets its own shallow copy
            b.start(sid)
            self.assertEqual(self.reply_text(b, sid), "connected,None")
        b.send(op="shutdown", grace=1)
        self.assertEqual(b.wait(), 0)
        out = b.stdout()
        self.assertIn("STARTUP-RAN", out)
        self.assertIn("SHUTDOWN-RAN", out)

    def test_startup_failed_is_fatal(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                assert scope["type"] == "lifespan"
                await receive()
                await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
        """)
        fatal = b.expect("fatal")
        self.assertIn("database unreachable", fatal["error"])
        self.assertEqual(b.wait(), 1)

    def test_app_raising_on_lifespan_runs_without_it(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] != "telegram.message":
                    raise ValueError("Unsupported scope type %s" % scope["type"])
                await send({"type": "telegram.send_message", "text": "state=%s" % ("state" in scope)})
        """)
        ready = b.ready()
        self.assertIs(ready["lifespan"], False)
        logs = [f for f in b.frames if f["op"] == "log"]
        self.assertTrue(any(f["level"] == "debug" and "Unsupported scope type lifespan" in f["message"]
                            for f in logs), logs)
        b.start(1)
        self.assertEqual(self.reply_text(b, 1), "state=False")
        b.send(op="shutdown", grace=0)
        self.assertEqual(b.wait(), 0)

    def test_app_ignoring_lifespan_events_runs_without_it(self):
        # Written for the original protocol: loops on receive() and ignores
        # event types it does not know, lifespan.startup included.
        b = self.bridge("""
            async def app(scope, receive, send):
                while True:
                    event = await receive()
                    if event["type"] == "telegram.message":
                        await send({"type": "telegram.send_message", "text": "got " + event["text"]})
        """)
        self.assertIs(b.ready()["lifespan"], False)
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "x"})
        self.assertEqual(self.reply_text(b, 1), "got x")
        b.send(op="shutdown", grace=0)
        self.assertEqual(b.wait(), 0)

    def test_lifespan_on_makes_exception_fatal(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                raise ValueError("no lifespan here")
        """, lifespan="on")
        fatal = b.expect("fatal")
        self.assertIn("no lifespan here", fatal["error"])
        self.assertEqual(b.wait(), 1)

    def test_lifespan_off_skips_it(self):
        b = self.bridge(LIFESPAN_APP.replace('scope["state"]', 'scope.get("state", {})'), lifespan="off")
        self.assertIs(b.ready()["lifespan"], False)
        b.start(1)
        self.assertEqual(self.reply_text(b, 1), "None,None")
        b.send(op="shutdown", grace=0)
        self.assertEqual(b.wait(), 0)
        self.assertNotIn("STARTUP-RAN", b.stdout())


LIFESPAN_CALLS_APP = """
    import asyncio

    async def app(scope, receive, send):
        if scope["type"] != "lifespan":
            await send({"type": "telegram.send_message", "text": "chat"})
            return
        state = scope["state"]
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            await send({"type": "telegram.send_message", "text": "to whom?"})
        except ValueError as exc:
            print("REJECTED", exc)
        await send({"type": "telegram.api", "method": "setMyCommands",
                    "params": {"commands": [{"command": "start", "description": "go"}]},
                    "request_id": "cmds"})
        reply = await receive()
        print("STARTUP-REPLY", reply["type"], reply["request_id"], reply["ok"], scope["bot"]["username"])
        await send({"type": "lifespan.startup.complete"})
        await send({"type": "telegram.send_message", "chat_id": 5, "text": "after startup"})
        while True:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                break
            print("LATER", message["type"], message["request_id"])
        await send({"type": "lifespan.shutdown.complete"})
        try:
            await send({"type": "telegram.send_message", "chat_id": 5, "text": "too late"})
        except RuntimeError as exc:
            print("AFTER-SHUTDOWN", exc)
"""


class LifespanCalls(BridgeTestCase):
    def test_calls_from_the_lifespan_scope_and_their_responses(self):
        b = self.bridge(LIFESPAN_CALLS_APP)
        call = b.expect("send", sid=0)["event"]
        self.assertEqual(call["method"], "setMyCommands")
        self.assertEqual(call["request_id"], "cmds")
        # The second receive() during startup awaits the response: the app
        # is not taken for one that ignores lifespan events.
        b.response(0, {"type": "telegram.api.response", "request_id": "cmds", "ok": True, "result": True})
        self.assertIs(b.ready()["lifespan"], True)
        # Sent right after startup.complete: it may come before `ready` does.
        sent = [f["event"] for f in b.frames if f["op"] == "send" and f["sid"] == 0]
        after = sent[1] if len(sent) > 1 else b.expect("send", sid=0)["event"]
        self.assertEqual((after["chat_id"], after["text"]), (5, "after startup"))
        # After startup, receive() gets responses as well as lifespan.shutdown.
        b.response(0, {"type": "telegram.api.response", "request_id": 9, "ok": True, "result": []})
        b.start(1)
        self.assertEqual(self.reply_text(b, 1), "chat")
        b.send(op="shutdown", grace=1)
        self.assertEqual(b.wait(), 0)
        self.assertFalse([f for f in b.frames if f["op"] == "send" and f["event"].get("text") == "to whom?"])
        out = b.stdout()
        self.assertIn("REJECTED telegram.send_message requires 'chat_id' in the lifespan scope", out)
        self.assertIn("STARTUP-REPLY telegram.api.response cmds True test_bot", out)
        self.assertIn("LATER telegram.api.response 9", out)
        self.assertIn("AFTER-SHUTDOWN telegram.send_message sent on the lifespan scope after lifespan.shutdown", out)

    def test_lifespan_starts_once_the_bot_is_given(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    await receive()
                    print("BOT", scope.get("bot", "absent"))
                    await send({"type": "lifespan.startup.complete"})
                    await receive()
                    await send({"type": "lifespan.shutdown.complete"})
        """, bot=_NO_BOT)
        b.send(op="ping", n=1)
        b.expect("pong", n=1)  # the channel is served meanwhile
        self.assertFalse([f for f in b.frames if f["op"] == "ready"])
        b.send(op="bot", bot=None)  # --check: no getMe, no bot
        self.assertIs(b.ready()["lifespan"], True)
        b.send(op="shutdown", grace=0)
        self.assertEqual(b.wait(), 0)
        self.assertIn("BOT absent", b.stdout())

    def test_pause_holds_lifespan_calls_too(self):
        b = self.bridge("""
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    await receive()
                    await send({"type": "lifespan.startup.complete"})
                    await receive()  # a response: the daemon says when to go on
                    await send({"type": "telegram.api", "method": "getMe", "request_id": 1})
                    await receive()
                    await send({"type": "lifespan.shutdown.complete"})
        """)
        b.ready()
        b.send(op="pause")
        b.response(0, {"type": "telegram.api.response", "request_id": 0, "ok": True, "result": True})
        b.send(op="ping", n=1)
        b.expect("pong", n=1)
        self.assertFalse([f for f in b.frames if f["op"] == "send"])
        b.send(op="resume")
        self.assertEqual(b.expect("send", sid=0)["event"]["method"], "getMe")
        b.send(op="shutdown", grace=0)
        self.assertEqual(b.wait(), 0)


class ChannelTests(BridgeTestCase):
    def test_ping_pong(self):
        b = self.bridge(ECHO_APP)
        b.ready()
        b.send(op="ping", n=12345)
        self.assertEqual(b.expect("pong"), {"op": "pong", "n": 12345})

    def test_print_goes_to_stdout_not_channel(self):
        b = self.bridge("""
            import sys
            print("IMPORT-PRINT")
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                print("HANDLER-PRINT")
                print("HANDLER-STDERR", file=sys.stderr)
                await send({"type": "telegram.send_message", "text": "done"})
        """)
        b.ready()
        b.start(1)
        self.assertEqual(self.reply_text(b, 1), "done")
        b.expect("ended", sid=1)
        b.send(op="shutdown", grace=0)
        frames = b.read_all_until_eof()
        self.assertEqual(b.wait(), 0)
        self.assertNotIn("PRINT", json.dumps(b.frames + frames))
        self.assertIn("IMPORT-PRINT", b.stdout())
        self.assertIn("HANDLER-PRINT", b.stdout())
        self.assertIn("HANDLER-STDERR", b.stderr())

    def test_shutdown_cancels_running_instances_and_exits_0(self):
        b = self.bridge("""
            import asyncio
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    return
                await asyncio.sleep(60)
        """)
        b.ready()
        b.start(1)
        b.start(2)
        b.send(op="shutdown", grace=0.2)
        b.start(3)  # too late: answered with `ended` right away
        frames = b.read_all_until_eof()
        ended = sorted((f["sid"], f["cancelled"]) for f in frames if f["op"] == "ended")
        self.assertEqual(ended, [(1, True), (2, True), (3, False)])
        late = [f for f in frames if f["op"] == "ended" and f["sid"] == 3][0]
        self.assertIn("shutting down", late["error"])
        self.assertEqual(b.wait(), 0)

    def test_eof_exits_0(self):
        b = self.bridge(ECHO_APP)
        b.ready()
        b.start(1)  # left waiting in receive()
        b.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(b.wait(), 0)

    def test_eof_before_ready_exits_0(self):
        b = self.bridge("""
            import asyncio
            async def app(scope, receive, send):
                await asyncio.sleep(60)  # lifespan startup never answers
        """)
        time.sleep(0.2)
        b.sock.close()
        self.assertEqual(b.wait(), 0)

    def test_frames_split_anywhere_and_larger_than_one_read_arrive_whole(self):
        b = self.bridge(ECHO_APP)
        b.ready()
        texts = ["short", "x" * 300000, "after the large one", "é" * 1000]
        data = b""
        for sid, text in enumerate(texts, 1):
            for frame in ({"op": "start", "sid": sid, "scope": {"type": "telegram", "chat": {"id": sid}}},
                          {"op": "event", "sid": sid, "seq": 1, "event": {"type": "telegram.message", "text": text}}):
                body = json.dumps(frame).encode("utf-8")
                data += HEADER.pack(len(body)) + body
        # Cut inside headers and bodies, in pieces of 1 to 4,096 bytes, each
        # written on its own so the bridge reads them one by one.
        pos, step = 0, 1
        while pos < len(data):
            b.sock.sendall(data[pos:pos + step])
            pos += step
            step = step * 3 % 4093 + 1
            if pos < 200 or step < 8:
                time.sleep(0.001)
        for sid, text in enumerate(texts, 1):
            self.assertEqual(self.reply_text(b, sid), "3.0|" + text)

    def test_a_frame_over_the_limit_is_skipped_and_the_next_one_read(self):
        b = self.bridge(ECHO_APP)
        b.ready()
        limit = 64 * 1024 * 1024
        b.sock.sendall(HEADER.pack(limit + 1))
        chunk = b" " * (1 << 20)
        for _ in range(64):
            b.sock.sendall(chunk)
        b.sock.sendall(b" ")
        log = b.expect("log")
        self.assertEqual(log["level"], "warning")
        self.assertIn("dropped a %d-byte frame" % (limit + 1), log["message"])
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "still here"})
        self.assertEqual(self.reply_text(b, 1), "3.0|still here")

    def test_malformed_frames_are_logged_and_ignored(self):
        b = self.bridge(ECHO_APP)
        b.ready()
        b.send_raw(b"{not json")
        b.send_raw(b"[1, 2, 3]")
        b.send(op="frobnicate")
        b.send(op="event", seq=1)  # no sid
        b.send(op="start", sid="one", scope={})
        b.send(op="close", sid=99, grace=-1)  # unknown sid: ignored silently
        for _ in range(5):
            log = b.expect("log")
            self.assertEqual(log["level"], "warning")
        messages = " ".join(f["message"] for f in b.frames if f["op"] == "log")
        self.assertIn("malformed", messages)
        self.assertIn("not a JSON object", messages)
        self.assertIn("frobnicate", messages)
        self.assertIn("'event'", messages)
        # ...and the worker still works.
        b.start(1)
        b.event(1, 1, {"type": "telegram.message", "text": "still here"})
        self.assertEqual(self.reply_text(b, 1), "3.0|still here")
        self.assertIsNone(b.proc.poll())


if __name__ == "__main__":
    unittest.main()
