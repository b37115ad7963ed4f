"""The transport under everything else: one ASGI instance's ``receive`` and
``send`` as Bot API calls that return their result.

A :class:`Session` wraps the ``(scope, receive, send)`` of one connection
scope (a chat or a user) or of the lifespan scope. ``await session.call(...)``
sends a ``telegram.api`` event with a fresh ``request_id`` and returns the
``result`` of its ``telegram.api.response``, or raises
:class:`~asgigram.TelegramError`. Several calls may be awaited at once, from
several coroutines: whichever of them is waiting reads ``receive()`` (one at
a time; the protocol has one stream) and hands each response to the call it
answers. Events that are not responses to its calls are kept, in order, for
:meth:`Session.next_event`.

``receive()`` is read only while a response is owed or when the application
asks for its next event. That matters: the daemon counts an update finished
when the instance asks for the next one, and the calls made before that
belong to the update (made once, even across a crash). A session never reads
ahead while a handler still runs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, Mapping, Optional, Union

from .errors import Disconnected, TelegramError

__all__ = ["InputFile", "Session", "Receive", "Send", "Scope"]

Scope = Dict[str, Any]
Event = Dict[str, Any]
Receive = Callable[[], Awaitable[Event]]
Send = Callable[[Event], Awaitable[None]]
RequestId = Union[str, int]

# Events after which receive() gives nothing new: a call still awaiting its
# response when one comes will never get it.
_ENDING = ("telegram.disconnect",)


class InputFile:
    """A file to upload, with the name Telegram shows for it.

    Pass it (or plain ``bytes``) as any file parameter of a call, also inside
    ``media`` lists: ``await chat.call("sendDocument", document=InputFile("report.pdf", data))``.
    """

    __slots__ = ("filename", "content")

    def __init__(self, filename: str, content: bytes) -> None:
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise TypeError("InputFile content must be bytes, got %s" % type(content).__name__)
        self.filename = filename
        self.content = bytes(content)

    @classmethod
    def from_path(cls, path: Any, filename: Optional[str] = None) -> "InputFile":
        """Read a file from disk; its name is the path's last part unless given."""
        import os

        with open(path, "rb") as f:
            content = f.read()
        return cls(filename or os.path.basename(os.fspath(path)), content)

    def to_asgi(self) -> Dict[str, Any]:
        """The protocol's form of a named upload."""
        return {"filename": self.filename, "content": self.content}

    def __repr__(self) -> str:
        return "InputFile(%r, <%d bytes>)" % (self.filename, len(self.content))


def encode_params(value: Any) -> Any:
    """``params`` in the protocol's form: InputFile becomes the
    ``{"filename", "content"}`` dict, bytearray/memoryview become bytes, and
    objects with a ``to_dict()`` (keyboards) become dicts; ``None`` values of
    dicts are left out, as Telegram treats a missing optional parameter."""
    if isinstance(value, InputFile):
        return value.to_asgi()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Mapping):
        return {str(k): encode_params(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [encode_params(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return encode_params(to_dict())
    return value


class Session:
    """Bot API calls and events over one ASGI instance's ``receive``/``send``.

    Works the same on a connection scope and on the lifespan scope; on the
    lifespan scope nothing is filled in by the daemon, so a call needs its
    ``chat_id``.
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._ids = itertools.count(1)
        self._pending: Dict[RequestId, "asyncio.Future[Event]"] = {}
        self._events: Deque[Event] = deque()
        # Set while some coroutine is inside receive(); done when it returns,
        # so that the others look again at what they wait for.
        self._reading: Optional["asyncio.Future[None]"] = None
        self._ended: Optional[Event] = None

    @property
    def is_lifespan(self) -> bool:
        return self.scope.get("type") == "lifespan"

    def _new_id(self) -> str:
        # A prefix keeps them apart from ids an app picks for its own raw sends.
        return "asgigram:%d" % next(self._ids)

    # -- calls

    async def call(self, method: str, params: Optional[Mapping[str, Any]] = None) -> Any:
        """Make a Bot API call and return its result.

        Raises :class:`TelegramError` when Telegram (or the daemon) answers
        ``ok: false``, and :class:`Disconnected` when the scope ends before
        the answer comes.
        """
        event = {"type": "telegram.api", "method": method, "params": encode_params(params or {})}
        return (await self._request(event))["result"]

    async def send_message(self, text: str, **params: Any) -> Any:
        """``sendMessage`` with this text; returns the sent Message."""
        return await self.call("sendMessage", dict(params, text=text))

    async def download(self, file_id: str) -> bytes:
        """The bytes of a file Telegram has (a document, photo size, voice, ...).

        The daemon fetches it with the token only it holds; Telegram lets bots
        download files of up to 20 MB (a larger one raises TelegramError).
        """
        result = await self._request({"type": "telegram.download", "file_id": file_id})
        return bytes(result["result"]["content"])

    async def send(self, event: Event) -> None:
        """Send a raw event (no response is asked for)."""
        await self._send(event)

    async def _request(self, event: Event) -> Event:
        if self._ended is not None:
            raise Disconnected(self._ended)
        request_id = self._new_id()
        loop = asyncio.get_running_loop()
        future: "asyncio.Future[Event]" = loop.create_future()
        self._pending[request_id] = future
        try:
            await self._send(dict(event, request_id=request_id))
            await self._pump(future.done)
            response = future.result()
        finally:
            self._pending.pop(request_id, None)
        if not response.get("ok"):
            raise TelegramError.from_response(response)
        return response

    # -- events

    async def next_event(self) -> Event:
        """The next event that is not a response to one of this session's
        calls: an update, an ``app.*`` event, ``telegram.disconnect``, a
        lifespan event, or a response to a raw ``send`` with a request_id.

        Asking for it tells the daemon the previous update is finished.
        """
        await self._pump(lambda: bool(self._events))
        return self._events.popleft()

    def pending_events(self) -> int:
        """Events already read from ``receive()`` and not yet taken."""
        return len(self._events)

    async def _pump(self, ready: Callable[[], bool]) -> None:
        """Read receive() until ``ready()``; one reader at a time, the others
        wait for it to hand over what it read."""
        while not ready():
            reading = self._reading
            if reading is not None:
                # Someone else is reading: wait for the event it gets, then
                # look again (it may be ours). shield: a waiter cancelled
                # here must not cancel the reader's marker.
                await asyncio.shield(reading)
                continue
            if self._ended is not None and not self._events:
                # receive() keeps returning the disconnect; give it again.
                self._events.append(self._ended)
                continue
            marker: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
            self._reading = marker
            try:
                event = await self._receive()
            finally:
                self._reading = None
                marker.set_result(None)
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        if event.get("type") == "telegram.api.response":
            future = self._pending.get(event.get("request_id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(event)
                return
        self._events.append(event)
        if event.get("type") in _ENDING:
            self._ended = event
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(Disconnected(event))
