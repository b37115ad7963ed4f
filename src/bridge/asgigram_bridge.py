"""asgigram worker bridge: runs one Python ASGI application for asgigramd.

The daemon starts every worker process as

    python3 -u -c "<this file's source>" --fd 3 --app module.path:attr \
        --app-dir DIR [--lifespan auto|on|off]

and speaks the protocol described in docs/worker-protocol.md over fd 3 (one
end of a Unix socketpair): 4-byte big-endian length + UTF-8 JSON object per
frame. The bridge imports the app, runs the ASGI lifespan protocol, then
creates one asyncio task per scope instance the daemon `start`s, feeding it
`event`s through receive() and turning its send() calls into `send` frames.

Constraints that shape this file:
- stdlib only, Python >= 3.8, no reliance on __file__ (it runs via -c, and
  argv limits keep the source well under 128 KiB);
- stdout/stderr belong to the app; protocol data only ever goes to the channel;
- throughput matters (>10k events/s per worker), so frames are batched into one
  socket write per event-loop iteration and `received` acks are preformatted.
"""

import argparse
import asyncio
import base64
import collections
import importlib
import inspect
import json
import json.scanner
import math
import os
import platform
import signal
import socket
import struct
import sys
import threading
import traceback

SPEC_VERSION = "1.1"
MAX_FRAME = 64 * 1024 * 1024
# The read buffer's size, and so what one read of the channel may take: a
# burst's reads bring about 30 KiB (100 events); it grows for a larger frame
# and shrinks back after it. Every page of it counts in the worker's RSS.
READ_CHUNK = 64 * 1024
# Bytes queued for the batched flush after which send() flushes right away so
# backpressure (drain) sees them.
FLUSH_THRESHOLD = 256 * 1024
WRITE_HIGH_WATER = 1024 * 1024
MAX_NESTING = 100
CANCEL_WAIT = 5.0  # how long cancelled instances get to unwind at shutdown
LIFESPAN_SHUTDOWN_TIMEOUT = 10.0
EXIT_WATCHDOG = 5.0  # hard exit if interpreter teardown hangs on app threads

EVENT_TYPES = ("telegram.send_message", "telegram.api", "telegram.download")
# The lifespan scope's sid in `send` and `event` frames: instances count from 1.
LIFESPAN_SID = 0

_HEADER = struct.Struct(">I")
_MISSING = object()


class Fatal(Exception):
    """The worker cannot run; str(exc) becomes the `fatal` frame's error."""


def format_exc(exc):
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# ---------------------------------------------------------------------------
# JSON codec

def _json_default(obj):
    if isinstance(obj, bytes):
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    raise TypeError("object of type %s is not JSON serializable" % type(obj).__name__)


# One shared encoder: building a JSONEncoder per frame is measurable overhead.
# allow_nan=False because the daemon's JSON parser rejects NaN/Infinity.
_encode = json.JSONEncoder(
    default=_json_default, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode

try:
    from json.encoder import c_make_encoder as _c_make_encoder
except ImportError:  # interpreters without the C accelerator
    _c_make_encoder = None

if _c_make_encoder is not None:
    # The same encoder's C core, built once instead of on every encode()
    # (which also builds a closure and a circular-reference table each time:
    # about two thirds of a small frame's cost). It has no circular check:
    # what it encodes is either built here or validated first, and
    # validation refuses anything nested more than MAX_NESTING deep.
    _c_encode = _c_make_encoder(
        None, _json_default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def _encode_fast(obj):
        return "".join(_c_encode(obj, 0))
else:
    _encode_fast = _encode


def _bytes_hook(obj):
    if len(obj) == 1 and "$bytes" in obj:
        value = obj["$bytes"]
        if isinstance(value, str):
            return base64.b64decode(value.encode("ascii"), validate=True)
    return obj


# The decoders' scanners, called directly: json.loads() would first sniff the
# encoding of bytes and match whitespace around the value on every frame.
_scan = json.scanner.make_scanner(json.JSONDecoder())
_scan_bytes = json.scanner.make_scanner(json.JSONDecoder(object_hook=_bytes_hook))


def encode_frame(obj):
    body = _encode_fast(obj).encode("utf-8")
    return _HEADER.pack(len(body)) + body


def decode_body(body):
    """The JSON value of a frame's body (bytes); ValueError if it is not JSON."""
    # The object_hook runs for every dict; skip it for the (common) frames that
    # cannot contain a $bytes marker.
    scan = _scan_bytes if b'"$bytes"' in body else _scan
    text = body.decode("utf-8")
    try:
        value, end = scan(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        # Leading or trailing whitespace, extra data, or not JSON at all:
        # the full decoder accepts the first and words the errors.
        return json.loads(text, object_hook=_bytes_hook if scan is _scan_bytes else None)
    return value


def decode_frame(channel, body):
    """A frame's body as a dict, or None (logged on the channel) if it is not one."""
    try:
        msg = decode_body(body)
    except (ValueError, RecursionError) as exc:
        channel.log("warning", "dropped a malformed frame (%s): %r" % (exc, bytes(body[:200])))
        return None
    if not isinstance(msg, dict):
        channel.log("warning", "dropped a frame that is not a JSON object: %r" % (bytes(body[:200]),))
        return None
    return msg


# ---------------------------------------------------------------------------
# Outgoing event validation (docs/worker-protocol.md, "Outgoing event validation")

def _tname(value):
    return type(value).__name__


class _BadValue(Exception):
    """Raised deep inside _check_value; each level prepends its key on the way out
    so the happy path never builds path strings."""

    def __init__(self, value, problem):
        Exception.__init__(self)
        self.value = value
        self.problem = problem
        self.path = []


# Leaf types that need no further look, by exact type: most values sent are
# these, and checking them where their container is walked saves a call each.
_PLAIN = frozenset((str, int, bool, type(None), bytes))


def _check_value(value, depth):
    kind = type(value)
    if kind in _PLAIN:
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _BadValue(value, "nonfinite")
        return
    if isinstance(value, (str, int, bytes)):
        return
    if isinstance(value, dict):
        if depth >= MAX_NESTING:
            raise _BadValue(value, "deep")
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise _BadValue(key, "key")
            if type(item) in _PLAIN:
                continue
            try:
                _check_value(item, depth + 1)
            except _BadValue as bad:
                bad.path.append(key)
                raise
        return
    if isinstance(value, (list, tuple)):
        if depth >= MAX_NESTING:
            raise _BadValue(value, "deep")
        for index, item in enumerate(value):
            if type(item) in _PLAIN:
                continue
            try:
                _check_value(item, depth + 1)
            except _BadValue as bad:
                bad.path.append(index)
                raise
        return
    raise _BadValue(value, "type")


def _format_path(parts):
    out = ""
    for part in reversed(parts):
        if isinstance(part, int):
            out += "[%d]" % part
        elif part.isidentifier():
            out += ("." if out else "") + part
        else:
            out += "[%r]" % part
    return out


def _bad_value_error(bad):
    where = _format_path(bad.path)
    if bad.problem == "key":
        return TypeError(
            "key %r %s is of type %s; dict keys must be str"
            % (bad.value, "at " + where if where else "in the event", _tname(bad.value))
        )
    if bad.problem == "nonfinite":
        return ValueError("value at %s is %r; NaN and infinities cannot be sent" % (where, bad.value))
    if bad.problem == "deep":
        return ValueError(
            "value at %s is nested more than %d levels deep (does it contain itself?)"
            % (where, MAX_NESTING)
        )
    return TypeError("value at %s is of type %s, which is not an ASGI type" % (where, _tname(bad.value)))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_event(event, scope):
    """Raise TypeError/ValueError naming the problem if `event` may not be sent."""
    if not isinstance(event, dict):
        raise TypeError("send() takes a dict event, got %s" % _tname(event))
    etype = event.get("type", _MISSING)
    if etype is _MISSING:
        raise ValueError("event has no 'type'; expected one of %s" % ", ".join(map(repr, EVENT_TYPES)))
    if etype == "telegram.send_message":
        text = event.get("text", _MISSING)
        if text is _MISSING:
            raise ValueError("telegram.send_message requires 'text' (a str), but it is missing")
        if not isinstance(text, str):
            raise TypeError("telegram.send_message requires 'text' to be a str, got %s" % _tname(text))
        chat_id = event.get("chat_id", _MISSING)
        if chat_id is _MISSING:
            if scope.get("type") == "lifespan":
                raise ValueError(
                    "telegram.send_message requires 'chat_id' in the lifespan scope "
                    "(it belongs to no chat to default to)"
                )
            if scope.get("chat") is None:
                raise ValueError(
                    "telegram.send_message requires 'chat_id' in a user scope "
                    "(this scope has no 'chat' to default to)"
                )
        elif not (_is_int(chat_id) or isinstance(chat_id, str)):
            raise TypeError("telegram.send_message 'chat_id' must be an int or str, got %s" % _tname(chat_id))
    elif etype == "telegram.api":
        method = event.get("method", _MISSING)
        if method is _MISSING:
            raise ValueError("telegram.api requires 'method' (a non-empty str), but it is missing")
        if not isinstance(method, str) or not method:
            raise TypeError(
                "telegram.api requires 'method' to be a non-empty str, got %s"
                % (repr(method) if isinstance(method, str) else _tname(method))
            )
        params = event.get("params", _MISSING)
        if params is not _MISSING and not isinstance(params, dict):
            raise TypeError("telegram.api 'params' must be a dict, got %s" % _tname(params))
    elif etype == "telegram.download":
        file_id = event.get("file_id", _MISSING)
        if file_id is _MISSING:
            raise ValueError("telegram.download requires 'file_id' (a non-empty str), but it is missing")
        if not isinstance(file_id, str) or not file_id:
            raise TypeError(
                "telegram.download requires 'file_id' to be a non-empty str, got %s"
                % (repr(file_id) if isinstance(file_id, str) else _tname(file_id))
            )
        if "request_id" not in event:
            raise ValueError(
                "telegram.download requires a 'request_id' (a str or int): the file comes back "
                "only in the telegram.api.response with that request_id"
            )
    else:
        raise ValueError(
            "unknown event type %r; expected one of %s" % (etype, ", ".join(map(repr, EVENT_TYPES)))
        )
    request_id = event.get("request_id", _MISSING)
    if request_id is not _MISSING and not (_is_int(request_id) or isinstance(request_id, str)):
        raise TypeError("'request_id' must be a str or int, got %s" % _tname(request_id))
    try:
        _check_value(event, 0)
    except _BadValue as bad:
        raise _bad_value_error(bad) from None


def encode_send_frame(sid, event, scope):
    """Validate and encode a `send` frame; tuples become lists, bytes become $bytes."""
    validate_event(event, scope)
    try:
        # The same bytes as encoding the whole frame, with the event encoded alone.
        body = b'{"op":"send","sid":%d,"event":%s}' % (sid, _encode_fast(event).encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError("event contains a str that is not valid Unicode: %s" % exc) from None
    if len(body) > MAX_FRAME:
        raise ValueError("event is too large to send (%d bytes encoded, limit %d)" % (len(body), MAX_FRAME))
    return _HEADER.pack(len(body)) + body


# ---------------------------------------------------------------------------
# Loading the application

def _is_coroutine_function(func):
    if inspect.iscoroutinefunction(func):
        return True
    # Before Python 3.12, asgiref marks sync_to_async wrappers with this attribute.
    marker = getattr(asyncio.coroutines, "_is_coroutine", _MISSING)
    return marker is not _MISSING and getattr(func, "_is_coroutine", None) is marker


def is_double_callable(app):
    """Same decision as asgiref.compatibility.is_double_callable."""
    if getattr(app, "_asgi_single_callable", False):
        return False
    if getattr(app, "_asgi_double_callable", False):
        return True
    if inspect.isclass(app):
        return True
    if hasattr(app, "__call__") and _is_coroutine_function(app.__call__):
        return False
    return not _is_coroutine_function(app)


def load_app(spec, app_dir):
    """Import `module.path:attr` (attr may be dotted) from app_dir; raise Fatal."""
    # `-c` puts '' (the cwd) first on sys.path; the app dir replaces it.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    app_dir = os.path.abspath(app_dir)
    sys.path.insert(0, app_dir)

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or any(not p for p in attr.split(".")):
        raise Fatal("--app must look like 'module.path:attr', got %r" % (spec,))
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # SyntaxError, SystemExit at import, ... all fatal
        raise Fatal(
            "could not import module %r (app dir %s):\n%s" % (module_name, app_dir, format_exc(exc))
        ) from None
    app = module
    try:
        for part in attr.split("."):
            app = getattr(app, part)
    except Exception as exc:
        raise Fatal(
            "module %r has no attribute %r:\n%s" % (module_name, attr, format_exc(exc))
        ) from None
    if not callable(app):
        raise Fatal("%s is not callable (got %s)" % (spec, _tname(app)))
    return app


# ---------------------------------------------------------------------------
# The channel

class Channel(asyncio.BufferedProtocol):
    """Framed JSON over the daemon's socket.

    A buffered protocol rather than a StreamReader: the socket is read into
    one buffer allocated once (asyncio's fresh 256 KiB bytes object per read
    costs an mmap, a page fault and an munmap each time, which is most of an event's
    cost when events come one at a time), and every read is cut into frames
    and dispatched in one pass, without a coroutine resumed per frame.

    Writes are appended to a pending list and flushed once per event-loop
    iteration (call_soon), so a burst of acks and sends costs one syscall."""

    def __init__(self, loop):
        self._loop = loop
        self._transport = None
        self._pending = []
        self.pending_size = 0
        self._flush_scheduled = False
        self.closed = False
        # Bytes read and not yet dispatched are _buffer[_start:_end].
        self._buffer = bytearray(READ_CHUNK)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._skipping = 0  # bytes of an oversized frame still to drop
        self._on_frame = None  # set by start(); until then frames wait in the buffer
        self.congested = False  # the transport holds more than WRITE_HIGH_WATER
        self._drain_waiters = []
        self._lost = loop.create_future()
        # Resolved at EOF or when the connection is lost.
        self.eof = loop.create_future()

    @classmethod
    async def open(cls, fd):
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        channel = cls(loop)
        await loop.connect_accepted_socket(lambda: channel, sock)
        return channel

    def start(self, on_frame):
        """Dispatch frames (dicts) to on_frame from now on, beginning with any
        that came before."""
        self._on_frame = on_frame
        self._frames()

    def stop(self):
        """No more frames are dispatched."""
        self._on_frame = None

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport):
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def get_buffer(self, sizehint):
        if self._end == len(self._buffer):
            self._make_room(1)
        return self._view[self._end:]

    def buffer_updated(self, nbytes):
        self._end += nbytes
        if self._on_frame is not None:
            self._frames()

    def eof_received(self):
        self._at_eof()
        return False  # close the transport

    def connection_lost(self, exc):
        self._at_eof()
        if not self._lost.done():
            self._lost.set_result(None)
        self.congested = False
        self._wake_drainers()

    def pause_writing(self):
        self.congested = True

    def resume_writing(self):
        self.congested = False
        self._wake_drainers()

    def _at_eof(self):
        if not self.eof.done():
            self.eof.set_result(None)

    def _wake_drainers(self):
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- reading

    def _frames(self):
        buf = self._buffer
        pos, end = self._start, self._end
        if self._skipping:
            dropped = min(self._skipping, end - pos)
            self._skipping -= dropped
            pos += dropped
        unpack = _HEADER.unpack_from
        while end - pos >= 4 and self._on_frame is not None:
            (length,) = unpack(buf, pos)
            if length > MAX_FRAME:
                self.log("warning", "dropped a %d-byte frame (limit is %d bytes)" % (length, MAX_FRAME))
                dropped = min(length, end - pos - 4)
                self._skipping = length - dropped
                pos += 4 + dropped
                continue
            if pos + 4 + length > end:
                break
            msg = decode_frame(self, buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            if msg is not None:
                self._on_frame(msg)
        if pos == end:
            self._start = self._end = 0
            if len(buf) > READ_CHUNK:
                self._replace(bytearray(READ_CHUNK))  # let a large frame's buffer go
        else:
            self._start = pos
            if end - pos >= 4:
                # A frame in part: make room for the whole of it.
                self._make_room(4 + unpack(buf, pos)[0] - (end - pos))

    def _make_room(self, more):
        """At least `more` bytes free after _end, moving or growing the buffer."""
        held = self._end - self._start
        if len(self._buffer) - self._end >= more:
            return
        if len(self._buffer) - held >= max(more, len(self._buffer) // 4):
            buf = self._buffer
            buf[:held] = buf[self._start:self._end]  # same size: allowed with the view
        else:
            buf = bytearray(max(READ_CHUNK, held + more))
            buf[:held] = self._view[self._start:self._end]
            self._replace(buf)
        self._start, self._end = 0, held

    def _replace(self, buf):
        self._view.release()
        self._buffer = buf
        self._view = memoryview(buf)

    # -- writing

    def write_raw(self, frame):
        if self.closed:
            return
        self._pending.append(frame)
        self.pending_size += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def write(self, obj):
        self.write_raw(encode_frame(obj))

    def log(self, level, message):
        self.write({"op": "log", "level": level, "message": message})

    def flush(self):
        self._flush_scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        self.pending_size = 0
        # Writing to a transport that lost its peer makes asyncio log warnings
        # to stderr, which belongs to the app.
        if not self.closed and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self):
        if self.pending_size >= FLUSH_THRESHOLD:
            self.flush()
        if self.congested and not self._lost.done():
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    async def close(self):
        self.flush()
        self.closed = True
        self._on_frame = None
        if self._transport is not None:
            self._transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), 5.0)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------
# Application instances

class Instance:
    """One scope: its task, its event queue, and the receive/send it hands the app."""

    __slots__ = ("worker", "channel", "sid", "scope", "events", "responses", "awaiting", "_waiters",
                 "disconnect", "ended", "task", "_cancel_at", "_in_hand", "eager")

    def __init__(self, worker, sid, scope, eager=False):
        self.worker = worker
        self.channel = worker.channel
        self.sid = sid
        self.scope = scope
        self.events = collections.deque()  # (seq, event) from `event` frames
        self.responses = collections.deque()  # from `response` frames
        # Calls sent with a request_id whose response receive() has not
        # returned yet: until it has, receive() returns nothing else, so the
        # calls the app makes after reading it belong to the update in hand.
        self.awaiting = 0
        self._waiters = []  # futures of receive() calls waiting for something to return
        self.disconnect = None
        self.ended = False
        self.task = None
        self._cancel_at = None  # TimerHandle of a pending `close`
        self._in_hand = False  # received an event and not asked for another since
        # Acks written before receive() returns (not batched), so that if the
        # app then kills the worker the daemon knows which event it had.
        self.eager = eager

    def put_event(self, seq, event):
        self.events.append((seq, event))
        if self._waiters:
            self._wake()

    def put_response(self, event):
        self.responses.append(event)
        if self._waiters:
            self._wake()

    def _wake(self):
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def receive(self):
        # Once the app saw the disconnect, the scope is over: keep telling it so
        # instead of blocking on a queue nothing will feed again.
        if self.disconnect is not None:
            return self.disconnect
        # Asking for the next event means the app is done with the last one,
        # unless a response is still owed. With one queued, its `received`
        # says so; with none, `idle` does, so the daemon need not wait for
        # the chat's next message.
        if self._in_hand and not self.events and not self.awaiting and not self.responses:
            body = b'{"op":"idle","sid":%d}' % self.sid
            self.channel.write_raw(_HEADER.pack(len(body)) + body)
            # This frame waits below for the next event, idle scopes for
            # long: every local it still holds costs each of them its size.
            del body
        while True:
            if self.responses:
                if self.awaiting:
                    self.awaiting -= 1
                return self.responses.popleft()
            # Events queued before a call was made wait behind its response.
            if self.events and not self.awaiting:
                break
            waiter = self.worker.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:  # cancelled while waiting
                    self._waiters.remove(waiter)
        seq, event = self.events.popleft()
        self._in_hand = True
        # Acks are the most frequent frame: formatted here, without the JSON
        # encoder or a call (kept per instance, they would cost every idle
        # scope about 100 bytes).
        body = b'{"op":"received","sid":%d,"seq":%d}' % (self.sid, seq)
        self.channel.write_raw(_HEADER.pack(len(body)) + body)
        if self.eager:
            self.channel.flush()
        if event.get("type") == "telegram.disconnect":
            self.disconnect = event
        return event

    async def send(self, event):
        if self.ended:
            raise RuntimeError("send() called after the application instance for this scope ended")
        frame = encode_send_frame(self.sid, event, self.scope)  # validates first
        # Backpressure: while the daemon's sender queue is full (`pause`),
        # send() waits here instead of queueing more; nothing is dropped.
        if self.worker.paused:
            await self.worker.resumed.wait()
            if self.ended:
                raise RuntimeError("send() called after the application instance for this scope ended")
        channel = self.channel
        channel.write_raw(frame)
        if "request_id" in event:
            self.awaiting += 1
        if channel.congested or channel.pending_size >= FLUSH_THRESHOLD:
            await channel.drain()

    def close(self, grace):
        if self.ended:
            return
        loop = self.worker.loop
        when = loop.time() + grace
        if self._cancel_at is not None:
            if self._cancel_at.when() <= when:
                return  # an earlier close already set a sooner deadline
            self._cancel_at.cancel()
        self._cancel_at = loop.call_at(when, self.task.cancel)

    async def run(self):
        error = None
        cancelled = False
        try:
            await self.worker.call_app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException as exc:
            error = format_exc(exc)
            if not isinstance(exc, Exception):
                raise  # SystemExit / KeyboardInterrupt end the worker
        finally:
            self.ended = True
            if self._cancel_at is not None:
                self._cancel_at.cancel()
            self.worker.instance_ended(self, error, cancelled)


class Lifespan:
    """Runs the app with a lifespan scope for the worker's whole life.

    From lifespan.startup until lifespan.shutdown the app may also send
    telegram.* events on it: calls from outside any chat, written as `send`
    frames with LIFESPAN_SID; their responses come back through the same
    receive() as the lifespan events."""

    _ALLOWED = {
        "startup": ("lifespan.startup.complete", "lifespan.startup.failed"),
        "running": (),
        "shutdown": ("lifespan.shutdown.complete", "lifespan.shutdown.failed"),
        "done": (),
    }

    def __init__(self, worker, required, bot):
        self.worker = worker
        self.required = required  # --lifespan on
        self.state = {}
        self.scope = {"type": "lifespan", "asgi": worker.asgi_info(), "state": self.state}
        if bot is not None:
            self.scope["bot"] = bot
        self.phase = "startup"
        self.task = None
        # The app sent a telegram.* event during startup: it speaks this
        # protocol, so a second receive() awaits a response, not an answer
        # to an event type it ignores.
        self._called = False
        self._to_app = asyncio.Queue()
        # What happened on the app's side: ("sent", event), ("raised", tb), ("returned", None)
        self._from_app = asyncio.Queue()
        self._receives = 0

    async def _receive(self):
        self._receives += 1
        if self.phase == "startup" and self._receives > 1 and not self._called:
            # The app took lifespan.startup and asked for more without
            # answering: it ignores event types it does not know (apps written
            # for the original asgigram do). Treat lifespan as unsupported
            # rather than waiting for an answer that never comes.
            self._from_app.put_nowait(("ignored", None))
            await asyncio.Future()  # cancelled by startup()
        return await self._to_app.get()

    async def _send(self, event):
        if not isinstance(event, dict):
            raise TypeError("lifespan send() takes a dict event, got %s" % _tname(event))
        etype = event.get("type")
        if etype in EVENT_TYPES:
            return await self._call(event)
        if etype not in self._ALLOWED[self.phase]:
            raise ValueError("unexpected lifespan event %r during %s" % (etype, self.phase))
        self.phase = "running" if self.phase == "startup" else "done"
        self._from_app.put_nowait(("sent", event))

    async def _call(self, event):
        if self.phase not in ("startup", "running"):
            raise RuntimeError(
                "%s sent on the lifespan scope after lifespan.shutdown; calls are taken until then"
                % event["type"]
            )
        frame = encode_send_frame(LIFESPAN_SID, event, self.scope)  # validates first
        self._called = True
        # Backpressure holds it like an instance's send().
        if self.worker.paused:
            await self.worker.resumed.wait()
        channel = self.worker.channel
        channel.write_raw(frame)
        if channel.congested or channel.pending_size >= FLUSH_THRESHOLD:
            await channel.drain()

    def deliver(self, event):
        """A response to one of the app's calls, for its receive()."""
        if self.phase != "done":
            self._to_app.put_nowait(event)

    async def _main(self):
        try:
            await self.worker.call_app(self.scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._from_app.put_nowait(("raised", format_exc(exc)))
        else:
            self._from_app.put_nowait(("returned", None))

    async def startup(self):
        """True if the app completed startup, False if it does not do lifespan.
        Raises Fatal for startup.failed, or for no support with --lifespan on."""
        self.task = asyncio.ensure_future(self._main())
        self._to_app.put_nowait({"type": "lifespan.startup"})
        kind, value = await self._from_app.get()
        if kind == "sent":
            if value["type"] == "lifespan.startup.complete":
                return True
            raise Fatal("lifespan startup failed: %s" % (value.get("message") or "(no message)",))
        if kind == "raised":
            return self._unsupported("raised on the lifespan scope", ":\n" + value)
        if kind == "ignored":
            self.abort()
            return self._unsupported("ignored lifespan.startup")
        return self._unsupported("returned without completing startup")

    def _unsupported(self, how, detail=""):
        """Auto mode runs on without lifespan; --lifespan on makes it fatal."""
        if self.required:
            raise Fatal("lifespan is required (--lifespan on) but the app %s%s" % (how, detail))
        self.worker.channel.log(
            "debug",
            "ASGI lifespan appears unsupported by the app (it %s); continuing without lifespan%s" % (how, detail),
        )
        return False

    async def shutdown(self, timeout):
        log = self.worker.channel.log
        if self.task.done():
            # The lifespan coroutine ended while the worker ran; report how.
            while not self._from_app.empty():
                kind, value = self._from_app.get_nowait()
                if kind == "raised":
                    log("error", "the app's lifespan task raised after startup:\n" + value)
            return
        self.phase = "shutdown"
        self._to_app.put_nowait({"type": "lifespan.shutdown"})
        try:
            kind, value = await asyncio.wait_for(self._from_app.get(), timeout)
        except asyncio.TimeoutError:
            log("warning", "lifespan shutdown did not complete within %g s" % timeout)
        else:
            if kind == "sent" and value["type"] == "lifespan.shutdown.failed":
                log("error", "lifespan shutdown failed: %s" % (value.get("message") or "(no message)",))
            elif kind == "raised":
                log("error", "lifespan shutdown raised an exception:\n" + value)
        if not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=1.0)

    def abort(self):
        if self.task is not None and not self.task.done():
            self.task.cancel()


# ---------------------------------------------------------------------------
# The worker

class Worker:
    def __init__(self, args):
        self.args = args
        self.loop = None
        self.channel = None
        self.app = None
        self.double = False
        self.asgi_version = "3.0"
        self.lifespan = None
        # The Lifespan from its startup on, for the responses to its calls
        # (self.lifespan is set only once startup is complete).
        self._lifespan_calls = None
        self.state = None  # lifespan state; None means scopes get no "state"
        self.instances = {}
        self.stopping = False
        self._stop = None  # future: grace seconds for shutdown
        self._eof = None
        self._bot = None  # future: the bot's User from the `bot` frame (None: not known)
        # Set unless the daemon said `pause`; created in run(), inside the loop.
        self.resumed = None
        self.paused = False  # the daemon said `pause` (resumed is clear): a flag send() reads without a call
        self._handlers = {
            "event": self._on_event,
            "response": self._on_response,
            "start": self._on_start,
            "close": self._on_close,
            "ping": self._on_ping,
            "shutdown": self._on_shutdown,
            "pause": self._on_pause,
            "resume": self._on_resume,
            "bot": self._on_bot,
        }

    def asgi_info(self):
        return {"version": self.asgi_version, "spec_version": SPEC_VERSION}

    def call_app(self, scope, receive, send):
        if self.double:
            return self.app(scope)(receive, send)
        return self.app(scope, receive, send)

    async def run(self):
        self.loop = asyncio.get_running_loop()
        try:
            self.channel = await Channel.open(self.args.fd)
        except OSError as exc:
            # No channel to report on; stderr is the only place the daemon reads.
            sys.stderr.write("asgigram bridge: cannot use fd %d as the channel: %s\n" % (self.args.fd, exc))
            return 1
        self._stop = self.loop.create_future()
        self._eof = self.loop.create_future()
        self._bot = self.loop.create_future()
        self.resumed = asyncio.Event()
        self.resumed.set()
        try:
            self.app = load_app(self.args.app, self.args.app_dir)
        except Fatal as exc:
            return await self._fail(str(exc))
        self.double = is_double_callable(self.app)
        self.asgi_version = "2.0" if self.double else "3.0"

        # Read from the start so pings are answered and EOF noticed during startup.
        self.channel.start(self._dispatch)
        watch_eof = asyncio.ensure_future(self._watch_eof())
        if self.args.lifespan != "off":
            # The lifespan scope carries the bot, which the daemon sends once
            # getMe answered.
            await asyncio.wait({self._bot, self._stop}, return_when=asyncio.FIRST_COMPLETED)
            if not self._bot.done():  # shutdown or EOF before the bot came
                watch_eof.cancel()
                await self.channel.close()
                return 0
            lifespan = Lifespan(self, required=self.args.lifespan == "on", bot=self._bot.result())
            self._lifespan_calls = lifespan
            startup = asyncio.ensure_future(lifespan.startup())
            await asyncio.wait({startup, self._stop}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # shutdown or EOF before the app was ready
                startup.cancel()
                lifespan.abort()
                watch_eof.cancel()
                await self.channel.close()
                return 0
            try:
                supported = startup.result()
            except Fatal as exc:
                lifespan.abort()
                watch_eof.cancel()
                return await self._fail(str(exc))
            if supported:
                self.lifespan = lifespan
                self.state = lifespan.state
            else:
                self._lifespan_calls = None

        self.channel.write({
            "op": "ready",
            "pid": os.getpid(),
            "asgi_version": self.asgi_version,
            "lifespan": self.lifespan is not None,
            "python": platform.python_version(),
        })
        grace = await self._stop
        await self._shutdown(grace)
        watch_eof.cancel()
        await self.channel.close()
        return 0

    async def _fail(self, error):
        self.channel.write({"op": "fatal", "error": error})
        await self.channel.close()
        return 1

    def _request_stop(self, grace):
        # Refuse `start`s from here on, not only once _shutdown gets to run.
        self.stopping = True
        if not self._stop.done():
            self._stop.set_result(grace)

    async def _shutdown(self, grace):
        self.stopping = True
        running = [inst.task for inst in self.instances.values()]
        if running and grace > 0:
            all_done = asyncio.ensure_future(asyncio.wait(running))
            # EOF cuts the grace short: nobody is left to receive the replies.
            await asyncio.wait({all_done, self._eof}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            all_done.cancel()
        for inst in list(self.instances.values()):
            inst.task.cancel()
        running = [inst.task for inst in self.instances.values()]
        if running:
            await asyncio.wait(running, timeout=CANCEL_WAIT)
        if self.lifespan is not None:
            await self.lifespan.shutdown(LIFESPAN_SHUTDOWN_TIMEOUT)

    def instance_ended(self, inst, error, cancelled):
        if self.instances.get(inst.sid) is inst:
            del self.instances[inst.sid]
        self.channel.write({"op": "ended", "sid": inst.sid, "error": error, "cancelled": cancelled})

    # -- reading and dispatch

    async def _watch_eof(self):
        await self.channel.eof
        if not self._eof.done():
            self._eof.set_result(None)
        self._request_stop(0.0)

    def _dispatch(self, msg):
        op = msg.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self.channel.log("warning", "ignored a frame with unknown op %r" % (op,))
            return
        try:
            handler(msg)
        except Exception as exc:
            self.channel.log("warning", "ignored a malformed %r frame (%s: %s)" % (op, _tname(exc), exc))

    def _on_event(self, msg):
        sid = msg["sid"]
        inst = self.instances.get(sid)
        if inst is None:
            return  # unknown or already ended: the daemon may race with `ended`
        seq = msg["seq"]
        event = msg["event"]
        if type(seq) is not int or not isinstance(event, dict):
            raise ValueError("'seq' must be an int and 'event' an object")
        inst.put_event(seq, event)

    def _on_response(self, msg):
        sid = msg["sid"]
        inst = self.instances.get(sid)
        if inst is None and sid != LIFESPAN_SID:
            return  # ended: nobody is left to read it
        event = msg["event"]
        if not isinstance(event, dict):
            raise ValueError("'event' must be an object")
        if inst is None:
            if self._lifespan_calls is not None:
                self._lifespan_calls.deliver(event)
            return
        inst.put_response(event)

    def _on_start(self, msg):
        sid = msg["sid"]
        scope = msg["scope"]
        if type(sid) is not int:
            raise ValueError("'sid' must be an int")
        if sid in self.instances:
            raise ValueError("sid %d is already running" % sid)
        if self.stopping or not isinstance(scope, dict):
            # Still answer with `ended`: the daemon expects one per started sid.
            reason = "the worker is shutting down" if self.stopping else "'scope' is not an object"
            self.channel.write({"op": "ended", "sid": sid, "error": "instance not started: " + reason,
                                "cancelled": False})
            return
        scope["asgi"] = self.asgi_info()
        if self.state is not None:
            scope["state"] = dict(self.state)
        inst = Instance(self, sid, scope, eager=msg.get("eager") is True)
        self.instances[sid] = inst
        inst.task = self.loop.create_task(inst.run())

    def _on_close(self, msg):
        inst = self.instances.get(msg["sid"])
        if inst is not None:
            inst.close(_grace(msg))

    def _on_ping(self, msg):
        self.channel.write({"op": "pong", "n": msg.get("n")})

    def _on_shutdown(self, msg):
        self._request_stop(_grace(msg))

    def _on_pause(self, msg):
        self.paused = True
        self.resumed.clear()

    def _on_resume(self, msg):
        self.paused = False
        self.resumed.set()

    def _on_bot(self, msg):
        bot = msg["bot"]
        if bot is not None and not isinstance(bot, dict):
            raise ValueError("'bot' must be an object or null")
        if not self._bot.done():
            self._bot.set_result(bot)


def _grace(msg):
    grace = msg.get("grace", 0)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise ValueError("'grace' must be a non-negative number, got %r" % (grace,))
    return float(grace)


# ---------------------------------------------------------------------------
# Entry point

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="asgigram_bridge", description="asgigramd worker bridge")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the channel socket")
    parser.add_argument("--app", required=True, help="module.path:attr of the ASGI application")
    parser.add_argument("--app-dir", required=True, help="directory put first on sys.path")
    parser.add_argument("--lifespan", choices=("auto", "on", "off"), default="auto")
    return parser.parse_args(argv)


def _cancel_leftovers(loop):
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 1.0))
    except Exception:
        pass


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Ctrl-C in the daemon's terminal reaches the whole process group; the
    # daemon drives shutdown itself (the `shutdown` op, or EOF if it dies).
    # A no-op handler rather than SIG_IGN, which the app's subprocesses would inherit.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(Worker(args).run())
    finally:
        _cancel_leftovers(loop)
        loop.close()
    # Interpreter teardown joins non-daemon threads (e.g. executor threads stuck
    # in app code); never let that keep a dead worker around.
    watchdog = threading.Timer(EXIT_WATCHDOG, os._exit, args=(code,))
    watchdog.daemon = True
    watchdog.start()
    sys.exit(code)


if __name__ == "__main__":
    main()
