"""Run a python-telegram-bot 22 bot on asgigramd, unchanged but for two lines::

    import asgigram.ptb

    app = asgigram.ptb.builder().build()        # was: ApplicationBuilder().token(TOKEN).build()
    app.add_handler(...)                         # handlers, ConversationHandler, error handlers as before
    application = asgigram.ptb.asgi(app)         # was: app.run_polling()

and ``application = "mybot:application"`` in asgigram.toml.

Every Bot API call goes through the daemon (:class:`AsgigramRequest`):
journaled with the update it was made for, paced under Telegram's limits, in
the chat's order; its outcome comes back as PTB's own results and exceptions
(``BadRequest``, ``RetryAfter``, ``Forbidden``, ...). ``File.download_*``
works: the daemon fetches the file. The worker never holds the token.

An update counts as handled once ``Application.process_update`` returned,
that is once its blocking handlers finished (a handler with ``block=False``
runs on in a task the daemon does not wait for). ``chat_data``,
``user_data`` and conversation states live in the worker's memory, which is
enough because asgigramd keeps each chat on one worker process (protocol spec
1.1, "Which worker"); use a persistence (``PicklePersistence``, ...) for state
that must outlive a worker restart.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, Optional, Tuple
from urllib.parse import unquote

from telegram import Update
from telegram.error import Conflict, NetworkError
from telegram.ext import Application, ApplicationBuilder
from telegram.request import BaseRequest, RequestData

from ._bridge import PLACEHOLDER_SECRET, FileIds, current_session, run_instance, run_lifespan
from ._session import Receive, Scope, Send, Session
from .errors import TelegramError

__all__ = ["builder", "asgi", "AsgigramRequest", "PTBApplication", "BASE_URL", "BASE_FILE_URL"]

# URLs only AsgigramRequest understands: the method is the last part, and a
# file URL ends in the file_path a getFile returned.
BASE_URL = "asgigramd:bot"
BASE_FILE_URL = "asgigramd-file:bot"
_FILE_PREFIX = "asgigramd-file:"
# PTB wants a token of this shape; the real one stays with the daemon.
PLACEHOLDER_TOKEN = "0:" + PLACEHOLDER_SECRET


class AsgigramRequest(BaseRequest):
    """A PTB request object whose requests are ``telegram.api`` events of the
    current asgigramd instance.

    One object serves every instance of the process (PTB keeps one Bot);
    each request finds the instance it belongs to through
    :func:`asgigram._bridge.current_session`. The answer is Telegram's JSON
    envelope, so PTB's own code turns it into results and exceptions. PTB's
    timeouts are not applied: the daemon retries and paces on its own, and a
    call's outcome is final when it comes.
    """

    def __init__(self, file_ids: Optional[FileIds] = None, *, get_updates: bool = False) -> None:
        self.file_ids = file_ids if file_ids is not None else FileIds()
        self._get_updates = get_updates

    @property
    def read_timeout(self) -> Optional[float]:
        return None

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: Optional[RequestData] = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> Tuple[int, bytes]:
        name = url.rsplit("/", 1)[-1]
        if self._get_updates or name == "getUpdates":
            # Telegram's own word for a second poller, said before it can take updates away.
            raise Conflict("asgigramd delivers the updates; getUpdates is not available to the application")
        session = current_session()
        if method == "GET":
            return await self._download(session, url)
        if name == "getMe" and isinstance(session.scope.get("bot"), dict):
            # The daemon asked getMe before any scope started; no need to ask again.
            return _envelope({"ok": True, "result": session.scope["bot"]})
        params = _params(request_data)
        try:
            result = await session.call(name, params)
        except TelegramError as exc:
            return _error(exc)
        if name == "getFile":
            self.file_ids.remember(result)
        return _envelope({"ok": True, "result": result})

    async def _download(self, session: Session, url: str) -> Tuple[int, bytes]:
        file_id = self.file_ids.file_id(unquote(url)) if url.startswith(_FILE_PREFIX) else None
        if file_id is None:
            raise NetworkError(
                "asgigramd downloads only files it knows by file_id: get the File with "
                "bot.get_file() (or message.document.get_file()) and download that"
            )
        try:
            return 200, await session.download(file_id)
        except TelegramError as exc:
            return _error(exc)


def _envelope(body: Dict[str, Any]) -> Tuple[int, bytes]:
    return 200, json.dumps(body).encode("utf-8")


def _error(exc: TelegramError) -> Tuple[int, bytes]:
    """Telegram's error answer, with its error code as the HTTP status PTB
    reads it from (0, no answer at all, becomes PTB's NetworkError)."""
    body: Dict[str, Any] = {"ok": False, "error_code": exc.error_code, "description": exc.description}
    if exc.parameters:
        body["parameters"] = exc.parameters
    return exc.error_code, json.dumps(body).encode("utf-8")


def _params(request_data: Optional[RequestData]) -> Dict[str, Any]:
    """The call's parameters as the protocol takes them: PTB's JSON-ready
    values, and each file as a named upload, in its parameter or where its
    attach:// name stands (``media``; the daemon makes it a part again)."""
    if request_data is None:
        return {}
    params: Dict[str, Any] = dict(request_data.parameters)
    uploads: Dict[str, Dict[str, Any]] = {}
    for name, field in request_data.multipart_data.items():
        filename, content = field[0], field[1]
        if not isinstance(content, (bytes, bytearray)):
            content = content.read()  # a file handle (PTB 21.5+)
        uploads[name] = {"filename": filename or name, "content": bytes(content)}
    if not uploads:
        return params
    attached = {"attach://" + name: upload for name, upload in uploads.items()}
    params = _attach(params, attached)
    for name, upload in uploads.items():
        if not _mentions(params, upload):
            params[name] = upload
    return params


def _attach(value: Any, uploads: Dict[str, Dict[str, Any]]) -> Any:
    if isinstance(value, str):
        return uploads.get(value, value)
    if isinstance(value, dict):
        return {k: _attach(v, uploads) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_attach(v, uploads) for v in value]
    return value


def _mentions(value: Any, upload: Dict[str, Any]) -> bool:
    if value is upload:
        return True
    if isinstance(value, dict):
        return any(_mentions(v, upload) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, upload) for v in value)
    return False


def builder() -> ApplicationBuilder:
    """An ``ApplicationBuilder`` set up for asgigramd: no token (a
    placeholder, the daemon holds the real one), no Updater (the daemon
    polls), requests through the daemon, and updates of different chats
    processed concurrently (the daemon already keeps each chat's updates in
    order; call ``.concurrent_updates(False)`` to process one at a time).
    Go on configuring it as usual (``.post_init(...)``, ``.persistence(...)``,
    ``.defaults(...)``, ...), then ``.build()``.
    """
    file_ids = FileIds()
    return (
        ApplicationBuilder()
        .token(PLACEHOLDER_TOKEN)
        .base_url(BASE_URL)
        .base_file_url(BASE_FILE_URL)
        .request(AsgigramRequest(file_ids))
        .get_updates_request(AsgigramRequest(file_ids, get_updates=True))
        .updater(None)
        .concurrent_updates(True)
    )


class PTBApplication:
    """The ASGI application :func:`asgi` returns."""

    def __init__(self, app: Application) -> None:  # type: ignore[type-arg]
        if app.updater is not None:
            raise ValueError("build the Application with asgigram.ptb.builder(): the daemon polls, not an Updater")
        self.app = app
        self._started = False
        self._lock: Optional[asyncio.Lock] = None

    async def _start(self) -> None:
        """What ``run_polling`` does before it polls: initialize, post_init, start."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._started:
                return
            await self.app.initialize()
            if self.app.post_init:
                await self.app.post_init(self.app)
            await self.app.start()
            self._started = True

    async def _stop(self) -> None:
        """What ``run_polling`` does after it polled: stop, post_stop, shutdown, post_shutdown."""
        if not self._started:
            return
        self._started = False
        if self.app.running:
            await self.app.stop()
        if self.app.post_stop:
            await self.app.post_stop(self.app)
        await self.app.shutdown()
        if self.app.post_shutdown:
            await self.app.post_shutdown(self.app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":

            async def startup(_: Session) -> None:
                await self._start()

            async def shutdown(_: Session) -> None:
                await self._stop()

            await run_lifespan(scope, receive, send, startup, shutdown)
            return
        if scope["type"] != "telegram":
            return

        async def handle(raw: Dict[str, Any]) -> None:
            if not self._started:
                await self._start()  # app.lifespan = "off": start on the first update
            update = Update.de_json(raw, self.app.bot)
            await self.app.update_processor.process_update(update, self.app.process_update(update))

        await run_instance(scope, receive, send, handle)


def asgi(app: Application) -> PTBApplication:  # type: ignore[type-arg]
    """An ASGI application for asgigramd that hands each update to ``app``
    (built with :func:`builder`). Its ``post_init``, ``post_stop`` and
    ``post_shutdown`` run in lifespan, as ``run_polling`` runs them."""
    return PTBApplication(app)
