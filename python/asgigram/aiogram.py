"""Run an aiogram 3 bot on asgigramd, unchanged but for one line::

    from aiogram import Dispatcher
    import asgigram.aiogram

    dp = Dispatcher()
    ...                                   # routers, handlers, middlewares as before
    application = asgigram.aiogram.asgi(dp)

and ``application = "mybot:application"`` in asgigram.toml instead of
``dp.start_polling(bot)``.

Every Bot API call aiogram makes goes through the daemon
(:class:`AsgigramSession`): it is journaled with the update it was made for,
paced under Telegram's limits and kept in the chat's order, and its outcome
comes back as aiogram's own result types or exceptions
(``TelegramBadRequest``, ``TelegramRetryAfter``, ...). ``bot.download(...)``
works: the daemon fetches the file. The worker never holds the token.

FSM: aiogram's default ``MemoryStorage`` is enough for a form: asgigramd keeps
each chat on one worker process (protocol spec 1.1, "Which worker"), so the
state a handler set is there for the chat's next update. It is gone when the
worker restarts; use a persistent storage (Redis, ...) for state that must
outlive that.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, List, Optional

from aiogram import Bot, Dispatcher
from aiogram.client.session.base import BaseSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramConflictError, TelegramNetworkError
from aiogram.methods import GetFile, Response, TelegramMethod
from aiogram.methods.base import TelegramType
from aiogram.types import InputFile, Update, User

from ._bridge import PLACEHOLDER_SECRET, FileIds, current_session, run_instance, run_lifespan
from ._session import Receive, Scope, Send, Session
from .errors import TelegramError

if TYPE_CHECKING:  # pragma: no cover
    from aiogram.client.session.aiohttp import AiohttpSession

__all__ = ["asgi", "AsgigramSession", "AiogramApplication", "SERVER"]

# URLs that only this session understands: the token is never in them, and
# a file URL is resolved through the file_path a getFile returned.
SERVER = TelegramAPIServer(
    base="asgigramd:{method}",
    file="asgigramd-file:{path}",
)
_FILE_PREFIX = "asgigramd-file:"
GET_UPDATES_REFUSED = "Conflict: asgigramd delivers the updates; getUpdates is not available to the application"


class AsgigramSession(BaseSession):
    """An aiogram session whose requests are ``telegram.api`` events of the
    current asgigramd instance.

    One session serves every instance of the process (aiogram keeps one Bot
    and one session); each call finds the instance it belongs to through
    :func:`asgigram._bridge.current_session`. Request middlewares
    (``bot.session.middleware(...)``) run as with any aiogram session.
    The ``timeout`` of a call is not applied: the daemon retries and paces
    on its own, and a call's outcome is final when it comes.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("api", SERVER)
        super().__init__(**kwargs)
        self.file_ids = FileIds()
        self._web: Optional["AiohttpSession"] = None

    async def make_request(
        self,
        bot: Bot,
        method: TelegramMethod[TelegramType],
        timeout: Optional[int] = None,
    ) -> TelegramType:
        name = method.__api_method__
        if name == "getUpdates":
            # Telegram's own word for a second poller, said before it can take updates away.
            raise TelegramConflictError(method=method, message=GET_UPDATES_REFUSED)
        session = current_session()
        params = await self.build_params(bot, method)
        if name == "getMe" and isinstance(session.scope.get("bot"), dict):
            # The daemon asked getMe before any scope started; no need to ask again.
            return self._result(bot, method, session.scope["bot"])
        try:
            result = await session.call(name, params)
        except TelegramError as exc:
            raise self._error(bot, method, exc) from None
        if isinstance(method, GetFile):
            self.file_ids.remember(result)
        return self._result(bot, method, result)

    async def build_params(self, bot: Bot, method: TelegramMethod[Any]) -> Dict[str, Any]:
        """The call's parameters as the protocol takes them: plain values,
        aiogram's defaults filled in, and each InputFile as a named upload
        (also inside ``media``, where the daemon makes it an attach:// part)."""
        files: Dict[str, InputFile] = {}
        params: Dict[str, Any] = {}
        for key, value in method.model_dump(warnings=False).items():
            prepared = self.prepare_value(value, bot=bot, files=files, _dumps_json=False)
            if prepared is not None:
                params[key] = prepared
        if not files:
            return params
        uploads: Dict[str, Dict[str, Any]] = {}
        for key, file in files.items():
            content = b"".join([chunk async for chunk in file.read(bot)])
            uploads["attach://" + key] = {"filename": file.filename or key, "content": content}
        return _attach(params, uploads)

    def _result(self, bot: Bot, method: TelegramMethod[TelegramType], result: Any) -> TelegramType:
        response_type = Response[method.__returning__]  # type: ignore[name-defined]
        response = response_type.model_validate({"ok": True, "result": result}, context={"bot": bot})
        return response.result  # type: ignore[return-value]

    def _error(self, bot: Bot, method: TelegramMethod[Any], exc: TelegramError) -> Exception:
        """aiogram's exception for Telegram's answer, chosen by aiogram itself."""
        if exc.error_code == 0:
            # No answer from Telegram settled the call: aiogram's word for that.
            return TelegramNetworkError(method=method, message=exc.description)
        body: Dict[str, Any] = {"ok": False, "error_code": exc.error_code, "description": exc.description}
        if exc.parameters:
            body["parameters"] = exc.parameters
        try:
            self.check_response(bot, method, exc.error_code, self.json_dumps(body))
        except Exception as mapped:
            return mapped
        return exc  # check_response raises for every error answer; kept for type checkers

    async def stream_content(
        self,
        url: str,
        headers: Optional[Dict[str, Any]] = None,
        timeout: int = 30,
        chunk_size: int = 65536,
        raise_for_status: bool = True,
    ) -> AsyncGenerator[bytes, None]:
        if not url.startswith(_FILE_PREFIX):
            # URLInputFile: a file from the web, fetched by the worker itself.
            async for chunk in self._web_session().stream_content(
                url, headers=headers, timeout=timeout, chunk_size=chunk_size, raise_for_status=raise_for_status
            ):
                yield chunk
            return
        file_id = self.file_ids.file_id(url[len(_FILE_PREFIX):])
        if file_id is None:
            raise TelegramNetworkError(
                method=GetFile(file_id=""),
                message="asgigramd downloads files by file_id: call bot.download(file) or "
                "bot.get_file(file_id) before bot.download_file(file_path)",
            )
        try:
            content = await current_session().download(file_id)
        except TelegramError as exc:
            raise self._error(None, GetFile(file_id=file_id), exc) from None  # type: ignore[arg-type]
        stream = io.BytesIO(content)
        while chunk := stream.read(chunk_size):
            yield chunk

    def _web_session(self) -> "AiohttpSession":
        if self._web is None:
            from aiogram.client.session.aiohttp import AiohttpSession

            self._web = AiohttpSession()
        return self._web

    async def close(self) -> None:
        if self._web is not None:
            await self._web.close()
            self._web = None


def _attach(value: Any, uploads: Dict[str, Dict[str, Any]]) -> Any:
    if isinstance(value, str):
        return uploads.get(value, value)
    if isinstance(value, dict):
        return {k: _attach(v, uploads) for k, v in value.items()}
    if isinstance(value, list):
        return [_attach(v, uploads) for v in value]
    return value


def placeholder_bot(bot_user: Optional[Dict[str, Any]] = None, **kwargs: Any) -> Bot:
    """A Bot for asgigramd: its token carries the real bot id (aiogram keys
    FSM storage by ``bot.id``) and no secret."""
    bot_id = int((bot_user or {}).get("id") or 0)
    bot = Bot(token="%d:%s" % (bot_id, PLACEHOLDER_SECRET), session=AsgigramSession(), **kwargs)
    if bot_user:
        bot._me = User.model_validate(bot_user, context={"bot": bot})
    return bot


class AiogramApplication:
    """The ASGI application :func:`asgi` returns."""

    def __init__(self, dispatcher: Dispatcher, bot: Optional[Bot] = None, **workflow_data: Any) -> None:
        self.dispatcher = dispatcher
        self.bot = bot
        self.workflow_data = workflow_data
        if bot is not None and not isinstance(bot.session, AsgigramSession):
            # A Bot the application built (for its defaults, say) still
            # speaks only to the daemon.
            bot.session = AsgigramSession()

    def _bot(self, scope: Scope) -> Bot:
        if self.bot is None:
            self.bot = placeholder_bot(scope.get("bot"))
        elif isinstance(scope.get("bot"), dict) and self.bot._me is None:
            self.bot._me = User.model_validate(scope["bot"], context={"bot": self.bot})
        return self.bot

    def _data(self, bot: Bot) -> Dict[str, Any]:
        bots: List[Bot] = [bot]
        data = {"dispatcher": self.dispatcher, "bots": bots, **self.dispatcher.workflow_data, **self.workflow_data}
        data.pop("bot", None)
        return data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        bot = self._bot(scope)
        if scope["type"] == "lifespan":

            async def startup(_: Session) -> None:
                await self.dispatcher.emit_startup(bot=bot, **self._data(bot))

            async def shutdown(_: Session) -> None:
                try:
                    await self.dispatcher.emit_shutdown(bot=bot, **self._data(bot))
                finally:
                    await bot.session.close()

            await run_lifespan(scope, receive, send, startup, shutdown)
            return
        if scope["type"] != "telegram":
            return

        async def handle(raw: Dict[str, Any]) -> None:
            kind = next(k for k in raw if k != "update_id")
            if kind not in Update.model_fields:
                return  # a kind newer than this aiogram: it has no handler for it
            update = Update.model_validate(raw, context={"bot": bot})
            await self.dispatcher.feed_update(bot, update, **self.workflow_data)

        await run_instance(scope, receive, send, handle)


def asgi(dispatcher: Dispatcher, bot: Optional[Bot] = None, **workflow_data: Any) -> AiogramApplication:
    """An ASGI application for asgigramd that feeds each update to ``dispatcher``.

    ``bot``: the Bot handlers get; by default one made here, with no token.
    A Bot given here keeps its defaults (``DefaultBotProperties``) but its
    session is replaced: its requests go to the daemon, never to Telegram.
    ``workflow_data`` is passed to handlers, as ``start_polling(**kwargs)``
    would. The dispatcher's startup and shutdown hooks run in lifespan.
    """
    return AiogramApplication(dispatcher, bot, **workflow_data)
