"""The first-party API: a bot as an ASGI application with decorators.

::

    import asgigram

    bot = asgigram.Bot()

    @bot.command("start")
    async def start(chat, message):
        await chat.reply("Hi!", reply_markup=asgigram.inline_keyboard([[("Go", "go")]]))

    @bot.callback("go")
    async def go(chat, query):
        await query.answer()
        await query.edit_text("Gone.")

    @bot.message()
    async def echo(chat, message):
        await chat.reply(message.text)

``bot`` is the application asgigramd runs (``application = "mybot:bot"``).
Every chat gets its own instance, which takes the chat's updates one at a
time and hands each to the first handler that matches it. A handler's calls
belong to its update: the daemon makes them once, even across a crash.

Handlers are ``async def`` or plain ``def``; a plain one runs in a thread,
where the same methods (``chat.reply``, ``query.answer``, ...) block and
return their result instead of being awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from typing import Any, Awaitable, Callable, Dict, List, Optional, Pattern, Tuple, TypeVar, Union

from ._session import Session
from .errors import Disconnected
from .types import Message, TelegramObject, wrap

__all__ = ["Bot", "Chat", "CallbackQuery"]

logger = logging.getLogger("asgigram")

Handler = Callable[..., Any]
F = TypeVar("F", bound=Handler)
Filter = Union[None, str, Pattern[str], Callable[[Any], Any]]


def _blocking_or_awaitable(loop: Optional[asyncio.AbstractEventLoop], coro: Awaitable[Any]) -> Any:
    """In the event loop, the awaitable; in a sync handler's thread, its
    result (run on the loop that owns the instance)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if loop is None:
            raise RuntimeError("no event loop runs this bot yet") from None
        return asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]
    return coro


def _matches(filter_: Filter, text: Optional[str], obj: Any) -> Any:
    if filter_ is None:
        return True
    if isinstance(filter_, str):
        return text == filter_
    if isinstance(filter_, re.Pattern):
        return filter_.search(text) if text is not None else None
    return filter_(obj)


def _kind(name: str) -> str:
    """``"telegram.edited_message"`` and ``"edited_message"`` are one kind;
    ``"app.*"`` names stay as pushed."""
    return name[len("telegram."):] if name.startswith("telegram.") else name


class Chat:
    """The scope a handler runs in: one chat (or, for inline queries and the
    like, one user), with the calls a handler makes.

    ``id`` is the chat's id (the user's for a user scope: their private chat
    with the bot), ``scope`` the ASGI scope, ``state`` the lifespan state,
    ``me`` the bot's own User.
    """

    def __init__(self, bot: "Bot", session: Session, loop: asyncio.AbstractEventLoop) -> None:
        self.bot = bot
        self.session = session
        self._loop = loop
        scope = session.scope
        self.scope = scope
        self.chat: Optional[TelegramObject] = wrap(scope.get("chat"))
        self.user: Optional[TelegramObject] = wrap(scope.get("user"))
        self.id: int = (self.chat or self.user or {}).get("id")  # type: ignore[assignment]
        self.me: Optional[TelegramObject] = wrap(scope.get("bot"))
        self.state: Dict[str, Any] = scope.get("state") or {}

    def __repr__(self) -> str:
        return "Chat(%r)" % (self.id,)

    def call(self, method: str, **params: Any) -> Any:
        """Any Bot API method; returns its result or raises TelegramError.
        ``chat_id`` defaults to this chat."""
        return _blocking_or_awaitable(self._loop, self._call(method, params))

    async def _call(self, method: str, params: Dict[str, Any]) -> Any:
        if self.chat is None and "chat_id" not in params and method.startswith("send"):
            # A user scope has no chat the daemon could fill in; the user's
            # private chat with the bot has the user's id.
            params = dict(params, chat_id=self.id)
        return await self.session.call(method, params)

    def reply(self, text: str, **params: Any) -> Any:
        """Send a message to this chat; returns the sent Message."""
        return _blocking_or_awaitable(self._loop, self._reply(text, params))

    async def _reply(self, text: str, params: Dict[str, Any]) -> Any:
        return wrap(await self._call("sendMessage", dict(params, text=text)))

    def download(self, file_id: str) -> Any:
        """The bytes of a file (``message.file_id``, a ``document.file_id``, ...)."""
        return _blocking_or_awaitable(self._loop, self.session.download(file_id))

    def next_message(self, timeout: Optional[float] = None) -> Any:
        """Wait for this chat's next message, so a conversation reads as code::

            await chat.reply("Your name?")
            name = (await chat.next_message(timeout=300)).text

        Asking finishes the update in hand (its calls are made by then).
        Other updates that come meanwhile (a button press, an edit) go to
        their handlers; a command is a message like any other and is
        returned. Raises ``TimeoutError`` when none comes in time, and
        :class:`~asgigram.Disconnected` when the scope ends (the user went
        idle for ``scopes.idle_timeout``, or the daemon stops).
        """
        return _blocking_or_awaitable(self._loop, self._next_message(timeout))

    async def _next_message(self, timeout: Optional[float]) -> Message:
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - self._loop.time())
            try:
                event = await asyncio.wait_for(self.session.next_event(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError("no message within %s s" % timeout) from None
            etype = event.get("type")
            if etype == "telegram.disconnect":
                raise Disconnected(event)
            if etype == "telegram.message":
                return Message(event)
            await self.bot._dispatch(self, event)


class CallbackQuery(TelegramObject):
    """A button press, with ``answer`` and the edits of its message."""

    __slots__ = ("_chat",)

    def __init__(self, event: Dict[str, Any], chat: Chat) -> None:
        super().__init__(event)
        object.__setattr__(self, "_chat", chat)

    @property
    def message(self) -> Optional[Message]:
        message = self.get("message")
        return Message(message) if message else None

    def answer(self, text: Optional[str] = None, show_alert: bool = False, **params: Any) -> Any:
        """Stop the button's spinner, optionally with a notice or an alert."""
        params = dict(params, callback_query_id=self["id"], text=text)
        if show_alert:
            params["show_alert"] = True
        return self._chat.call("answerCallbackQuery", **params)

    def _target(self) -> Dict[str, Any]:
        message = self.get("message")
        if message:
            return {"chat_id": message["chat"]["id"], "message_id": message["message_id"]}
        return {"inline_message_id": self["inline_message_id"]}

    def edit_text(self, text: str, **params: Any) -> Any:
        """Replace the text of the message the button is on."""
        return self._chat.call("editMessageText", **dict(params, text=text, **self._target()))

    def edit_reply_markup(self, reply_markup: Optional[Dict[str, Any]] = None) -> Any:
        """Replace (or, with None, take away) the message's buttons."""
        return self._chat.call("editMessageReplyMarkup", reply_markup=reply_markup, **self._target())


class Bot:
    """An ASGI application that routes each update to a handler.

    Handlers take ``(chat, obj)``: the :class:`Chat` and the update's object
    (a :class:`~asgigram.types.Message`, a :class:`CallbackQuery`, or a
    :class:`~asgigram.types.TelegramObject` for other kinds). The first
    matching handler takes an update; one nothing matches is skipped.
    """

    def __init__(self) -> None:
        self._commands: Dict[str, Handler] = {}
        self._handlers: Dict[str, List[Tuple[Filter, Handler]]] = {}
        self._callbacks: List[Tuple[Callable[[Optional[str]], Any], Handler]] = []
        self._error_handlers: List[Handler] = []
        self._startup: List[Handler] = []
        self._shutdown: List[Handler] = []
        self._lifespan: Optional[Session] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.state: Dict[str, Any] = {}
        self.me: Optional[TelegramObject] = None

    # -- registering handlers

    def command(self, *names: str) -> Callable[[F], F]:
        """``/name``, ``/name@thisbot`` and ``/name payload`` (read the
        payload as ``message.args``)."""
        if not names:
            raise TypeError("command() needs at least one command name")

        def register(func: F) -> F:
            for name in names:
                self._commands[name.lstrip("/")] = func
            return func

        return register

    def callback(self, data: Filter = None, *, prefix: Optional[str] = None) -> Callable[[F], F]:
        """A button press whose ``callback_data`` is ``data`` (a str), matches
        it (a compiled regex, searched), starts with ``prefix``, or, with
        neither, any press."""

        def test(value: Optional[str]) -> Any:
            if prefix is not None and not (value or "").startswith(prefix):
                return False
            return _matches(data, value, value)

        def register(func: F) -> F:
            self._callbacks.append((test, func))
            return func

        return register

    def message(self, filter: Filter = None) -> Callable[[F], F]:
        """A message no command took: any, or those whose text equals a str,
        matches a compiled regex, or for which ``filter(message)`` is true."""
        return self.on("message", filter)

    def on(self, kind: str, filter: Filter = None) -> Callable[[F], F]:
        """Any update kind by its Update field (``"edited_message"``,
        ``"inline_query"``, ``"my_chat_member"``, a kind newer than this
        package, ...) or a pushed event by its type (``"app.order_shipped"``).
        ``filter`` as for :meth:`message`, tested on the object."""
        key = _kind(kind)

        def register(func: F) -> F:
            self._handlers.setdefault(key, []).append((filter, func))
            return func

        return register

    def on_error(self, func: F) -> F:
        """``handler(chat, event, exc)`` for an exception a handler raised.
        Without one, the exception is logged and the bot goes on."""
        self._error_handlers.append(func)
        return func

    def on_startup(self, func: F) -> F:
        """Runs once per worker process before it takes updates; it may make
        calls with :meth:`call` (``setMyCommands``). Raising stops the daemon."""
        self._startup.append(func)
        return func

    def on_shutdown(self, func: F) -> F:
        """Runs once per worker process when it stops (no calls any more)."""
        self._shutdown.append(func)
        return func

    # -- calls from outside a chat

    def call(self, method: str, **params: Any) -> Any:
        """A call from outside any chat, through the lifespan scope: for
        startup hooks and background tasks (give ``chat_id``). In a handler,
        use ``chat.call``: its calls belong to the update."""
        if self._lifespan is None:
            raise RuntimeError(
                "bot.call works from lifespan startup on; is app.lifespan off? In a handler use chat.call"
            )
        return _blocking_or_awaitable(self._loop, self._lifespan.call(method, params))

    # -- ASGI

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        self._loop = asyncio.get_running_loop()
        kind = scope.get("type")
        if kind == "lifespan":
            await self._run_lifespan(Session(scope, receive, send))
        elif kind == "telegram":
            await self._run_chat(Session(scope, receive, send))
        else:
            raise ValueError("asgigram.Bot serves telegram and lifespan scopes, not %r" % (kind,))

    async def _run_chat(self, session: Session) -> None:
        assert self._loop is not None  # set by __call__
        chat = Chat(self, session, self._loop)
        try:
            while True:
                event = await session.next_event()
                if event.get("type") == "telegram.disconnect":
                    return
                await self._dispatch(chat, event)
        except Disconnected:
            return

    async def _run_lifespan(self, session: Session) -> None:
        scope = session.scope
        self.state = scope.setdefault("state", {})
        self.me = wrap(scope.get("bot"))
        self._lifespan = session
        await session.next_event()  # lifespan.startup
        try:
            for hook in self._startup:
                await self._invoke(hook)
        except Exception as exc:
            logger.exception("a startup hook raised")
            await session.send({"type": "lifespan.startup.failed", "message": "%s: %s" % (type(exc).__name__, exc)})
            return
        await session.send({"type": "lifespan.startup.complete"})
        while (await session.next_event()).get("type") != "lifespan.shutdown":
            pass  # responses nobody awaits any more
        try:
            for hook in self._shutdown:
                await self._invoke(hook)
        except Exception as exc:
            logger.exception("a shutdown hook raised")
            await session.send({"type": "lifespan.shutdown.failed", "message": "%s: %s" % (type(exc).__name__, exc)})
            return
        await session.send({"type": "lifespan.shutdown.complete"})

    # -- routing

    def _route(self, chat: Chat, event: Dict[str, Any]) -> Tuple[Optional[Handler], Any]:
        kind = _kind(str(event.get("type", "")))
        if kind == "message":
            message = Message(event)
            name = message.command
            if name is not None and name in self._commands:
                addressed = message.command_bot
                mine = (chat.me or {}).get("username")
                if addressed is None or mine is None or addressed.lower() == mine.lower():
                    return self._commands[name], message
            return self._first(kind, message, message.get("text")), message
        if kind == "callback_query":
            query = CallbackQuery(event, chat)
            for test, handler in self._callbacks:
                if test(query.get("data")):
                    return handler, query
            return self._first(kind, query, query.get("data")), query
        obj = TelegramObject(event)
        return self._first(kind, obj, obj.get("text")), obj

    def _first(self, kind: str, obj: Any, text: Optional[str]) -> Optional[Handler]:
        for filter_, handler in self._handlers.get(kind, ()):
            if _matches(filter_, text, obj):
                return handler
        return None

    async def _dispatch(self, chat: Chat, event: Dict[str, Any]) -> None:
        handler, obj = self._route(chat, event)
        if handler is None:
            return
        try:
            await self._invoke(handler, chat, obj)
        except Disconnected:
            raise
        except Exception as exc:
            await self._handle_error(chat, event, exc)

    async def _handle_error(self, chat: Chat, event: Dict[str, Any], exc: Exception) -> None:
        if not self._error_handlers:
            logger.error("a handler raised on %s %s", event.get("type"), event.get("update_id"), exc_info=exc)
            return
        for handler in self._error_handlers:
            try:
                await self._invoke(handler, chat, event, exc)
            except Disconnected:
                raise
            except Exception:
                logger.exception("the error handler raised on %s %s", event.get("type"), event.get("update_id"))

    @staticmethod
    async def _invoke(handler: Handler, *args: Any) -> Any:
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None)):
            return await handler(*args)
        # A plain function may block: it runs in a thread, and the methods
        # it calls come back to this loop (see _blocking_or_awaitable).
        result = await asyncio.to_thread(handler, *args)
        if inspect.isawaitable(result):
            return await result
        return result
