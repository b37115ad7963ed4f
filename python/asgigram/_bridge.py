"""What the aiogram and python-telegram-bot adapters share.

A framework keeps one ``Bot`` (and one HTTP session or request object) per
process, while asgigramd gives each chat its own ASGI instance with its own
``receive``/``send``. The bridge between the two is a context variable: each
instance (and the lifespan scope) sets it to its :class:`~asgigram.Session`
while it runs the framework's code, so a Bot API call made anywhere below a
handler, in whatever task that handler's context was copied into, goes out
through the instance that handles the update, and belongs to that update.
"""

from __future__ import annotations

import contextvars
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Dict, Optional

from ._session import Receive, Scope, Send, Session
from .errors import Disconnected

__all__ = ["current_session", "FileIds", "run_lifespan", "run_instance", "PLACEHOLDER_SECRET"]

logger = logging.getLogger("asgigram")

# The worker never holds the bot token; frameworks insist on one, so they get
# "<bot id>:" followed by this, which Telegram would reject and the daemon
# never sends anywhere.
PLACEHOLDER_SECRET = "asgigramd-holds-the-token"

_current: "contextvars.ContextVar[Session]" = contextvars.ContextVar("asgigram_session")
# The lifespan scope's session, for calls made outside any instance (a task
# the application started at import time, a thread's event loop): they are
# outside-chat calls, which the lifespan scope is there for.
_lifespan: Optional[Session] = None


def current_session() -> Session:
    """The session of the instance (or lifespan scope) running this code.

    Raises RuntimeError outside both: a Bot API call then has no way to the
    daemon.
    """
    session = _current.get(None)
    if session is not None:
        return session
    if _lifespan is not None:
        return _lifespan
    raise RuntimeError(
        "a Bot API call outside any asgigramd scope: make calls from handlers, "
        "startup/shutdown hooks, or tasks they start"
    )


class FileIds:
    """Which ``file_id`` a ``file_path`` from ``getFile`` belongs to.

    Frameworks download in two steps, ``getFile`` and then a GET of the
    file's URL, which needs the token. The daemon does both with
    ``telegram.download``, given the ``file_id``; the frameworks only hand the
    second step the ``file_path``, so the answers of ``getFile`` are
    remembered (the last ``size`` of them: a download follows its
    ``getFile`` closely).
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._ids: "OrderedDict[str, str]" = OrderedDict()

    def remember(self, result: Any) -> None:
        """Note the File object a ``getFile`` returned."""
        if isinstance(result, dict):
            path, file_id = result.get("file_path"), result.get("file_id")
            if isinstance(path, str) and isinstance(file_id, str):
                self._ids[path] = file_id
                self._ids.move_to_end(path)
                while len(self._ids) > self._size:
                    self._ids.popitem(last=False)

    def file_id(self, url: str) -> Optional[str]:
        """The file_id for a download URL ending in a known file_path."""
        for path, file_id in reversed(self._ids.items()):
            if url == path or url.endswith("/" + path):
                return file_id
        return None


Hook = Callable[[Session], Awaitable[None]]


async def run_lifespan(scope: Scope, receive: Receive, send: Send, startup: Hook, shutdown: Hook) -> None:
    """The ASGI lifespan protocol around a framework's startup and shutdown.

    ``startup`` runs with the lifespan session current (its calls are
    outside-chat calls); when it raises, ``lifespan.startup.failed`` carries
    the error and the daemon stops with it.
    """
    global _lifespan
    session = Session(scope, receive, send)
    token = _current.set(session)
    try:
        event = await session.next_event()
        if event.get("type") != "lifespan.startup":
            return
        try:
            await startup(session)
        except Exception as exc:
            logger.exception("startup failed")
            await send({"type": "lifespan.startup.failed", "message": "%s: %s" % (type(exc).__name__, exc)})
            return
        _lifespan = session
        await send({"type": "lifespan.startup.complete"})
        while (await session.next_event()).get("type") != "lifespan.shutdown":
            pass  # a response to a raw send nobody awaits
        try:
            await shutdown(session)
        except Exception as exc:
            logger.exception("shutdown failed")
            await send({"type": "lifespan.shutdown.failed", "message": "%s: %s" % (type(exc).__name__, exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})
    finally:
        if _lifespan is session:
            _lifespan = None
        _current.reset(token)


Handle = Callable[[Dict[str, Any]], Awaitable[None]]


async def run_instance(scope: Scope, receive: Receive, send: Send, handle: Handle) -> None:
    """One connection scope: each update, as Telegram's Update dict, to
    ``handle``, one at a time, until the scope ends.

    The next event is asked for only once ``handle`` returned, so the calls
    the framework made for an update belong to it (made once, even across a
    crash). An exception from ``handle`` is logged and the instance goes on
    with the next update, as the frameworks' own polling loops do.
    """
    session = Session(scope, receive, send)
    token = _current.set(session)
    try:
        while True:
            event = await session.next_event()
            kind = str(event.get("type", ""))
            if kind == "telegram.disconnect":
                return
            update = as_update(event)
            if update is None:
                continue  # app.* events and stray responses: no framework has a handler for them
            try:
                await handle(update)
            except Disconnected:
                return
            except Exception:
                logger.exception("update %s: the handler raised", update.get("update_id"))
    finally:
        _current.reset(token)


def as_update(event: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Telegram's Update object for a ``telegram.<kind>`` event, else None."""
    kind = str(event.get("type", ""))
    if not kind.startswith("telegram.") or kind == "telegram.api.response" or "update_id" not in event:
        return None
    body = {k: v for k, v in event.items() if k not in ("type", "update_id")}
    return {"update_id": event["update_id"], kind[len("telegram."):]: body}
