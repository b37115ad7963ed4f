"""Run any Telegram ASGI application without the daemon, the way Channels'
``WebsocketCommunicator`` runs a consumer: send it updates, see the calls it
makes, answer them.

::

    from asgigram.testing import TelegramCommunicator

    async def test_start():
        async with TelegramCommunicator(bot, chat_id=1) as chat:
            await chat.send_message("/start")
            call = await chat.receive_call()
            assert call.method == "sendMessage" and call.params["text"] == "Hi!"

The communicator stands where asgigramd does and keeps its rules: while the
application awaits a response, ``receive()`` returns responses before any
later update, and an update is *finished* once the application asks for the
next event with nothing owed (:meth:`TelegramCommunicator.finished`).

Calls are answered at once with a plausible result (a Message for the
``send*`` methods, ``True`` otherwise), or as :attr:`answers` says per method;
with ``auto_answer=False`` the test answers each :class:`Call` itself.
Downloads are answered from :attr:`files`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Union

from .errors import TelegramError

__all__ = ["Call", "TelegramCommunicator", "LifespanCommunicator", "DEFAULT_BOT"]

DEFAULT_BOT: Dict[str, Any] = {"id": 42, "is_bot": True, "first_name": "Test bot", "username": "test_bot"}
DEFAULT_TIMEOUT = 2.0

Answer = Union[Any, TelegramError, Callable[["Call"], Any]]


class Call:
    """One call the application made: ``method`` and ``params`` (for
    ``telegram.send_message``, method ``sendMessage``; for
    ``telegram.download``, method ``download`` and ``params["file_id"]``)."""

    def __init__(self, communicator: "_Communicator", event: Dict[str, Any]) -> None:
        self._communicator = communicator
        self.event = event
        self.request_id = event.get("request_id")
        etype = event["type"]
        if etype == "telegram.send_message":
            self.method = "sendMessage"
            self.params = {k: v for k, v in event.items() if k not in ("type", "request_id")}
        elif etype == "telegram.download":
            self.method = "download"
            self.params = {"file_id": event["file_id"]}
        else:
            self.method = event["method"]
            self.params = dict(event.get("params") or {})
        self.answered = False

    @property
    def text(self) -> Optional[str]:
        return self.params.get("text")

    def __repr__(self) -> str:
        return "Call(%r, %r)" % (self.method, self.params)

    def respond(self, result: Any = True) -> None:
        """Answer ``ok: true`` with this result (ignored for a call that
        asked for no response)."""
        self._answer({"ok": True, "result": result})

    def fail(self, error_code: int, description: str, **parameters: Any) -> None:
        """Answer ``ok: false`` as Telegram would."""
        response: Dict[str, Any] = {"ok": False, "error_code": error_code, "description": description}
        if parameters:
            response["parameters"] = parameters
        self._answer(response)

    def _answer(self, response: Dict[str, Any]) -> None:
        if self.answered:
            raise RuntimeError("%r is answered already" % (self,))
        self.answered = True
        if self.request_id is not None:
            self._communicator._respond(dict(response, type="telegram.api.response", request_id=self.request_id))


class _Communicator:
    """What both communicators share: the fake daemon's receive and send."""

    def __init__(
        self,
        app: Any,
        scope: Dict[str, Any],
        *,
        auto_answer: bool = True,
        answers: Optional[Dict[str, Answer]] = None,
        files: Optional[Dict[str, bytes]] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.app = app
        self.scope = scope
        self.auto_answer = auto_answer
        #: per method: a result, a TelegramError to fail with, or a function
        #: of the Call returning either.
        self.answers: Dict[str, Answer] = dict(answers or {})
        #: file_id -> content, for ``telegram.download``.
        self.files: Dict[str, bytes] = dict(files or {})
        self.timeout = timeout
        #: every call made, in order.
        self.calls: List[Call] = []
        self._unread: Deque[Call] = deque()
        self._events: Deque[Dict[str, Any]] = deque()
        self._responses: Deque[Dict[str, Any]] = deque()
        self._awaiting = 0
        # Futures of whoever waits for a change (the app in receive(), the
        # test in _until); made before awaiting, so no wake-up is missed.
        self._waiters: List["asyncio.Future[None]"] = []
        self._task: Optional["asyncio.Task[Any]"] = None
        self._message_ids = itertools.count(1000)

    # -- the application's side

    async def _receive(self) -> Dict[str, Any]:
        while True:
            if self._responses:
                if self._awaiting:
                    self._awaiting -= 1
                return self._responses.popleft()
            if self._events and not self._awaiting:
                event = self._events.popleft()
                self._took(event)
                return event
            self._asked_with_nothing()
            await self._changed()

    def _took(self, event: Dict[str, Any]) -> None:
        pass

    def _asked_with_nothing(self) -> None:
        pass

    async def _send(self, event: Dict[str, Any]) -> None:
        if not isinstance(event, dict):
            raise TypeError("send() takes a dict event, got %s" % type(event).__name__)
        if not self._send_other(event):
            self._check(event)
            call = Call(self, event)
            if call.request_id is not None:
                self._awaiting += 1
            self.calls.append(call)
            self._unread.append(call)
            if self.auto_answer:
                self._auto(call)
        self._wake()

    def _send_other(self, event: Dict[str, Any]) -> bool:
        return False

    def _check(self, event: Dict[str, Any]) -> None:
        etype = event.get("type")
        if etype == "telegram.send_message":
            if not isinstance(event.get("text"), str):
                raise ValueError("telegram.send_message needs a str 'text'")
        elif etype == "telegram.api":
            if not isinstance(event.get("method"), str) or not event["method"]:
                raise ValueError("telegram.api needs a 'method'")
            if not isinstance(event.get("params", {}), dict):
                raise TypeError("telegram.api 'params' must be a dict")
        elif etype == "telegram.download":
            if not isinstance(event.get("file_id"), str) or not event["file_id"]:
                raise ValueError("telegram.download needs a non-empty str 'file_id'")
            if "request_id" not in event:
                raise ValueError("telegram.download needs a 'request_id'")
        else:
            raise ValueError("unknown event type %r" % (etype,))
        request_id = event.get("request_id")
        if request_id is not None and not isinstance(request_id, (str, int)):
            raise TypeError("request_id must be a str or int")

    def _auto(self, call: Call) -> None:
        answer = self.answers.get(call.method, _DEFAULT)
        if callable(answer) and not isinstance(answer, TelegramError):
            answer = answer(call)
        if answer is _DEFAULT:
            answer = self._default_result(call)
        if isinstance(answer, TelegramError):
            call.fail(answer.error_code, answer.description, **answer.parameters)
        elif not call.answered:
            call.respond(answer)

    def _default_result(self, call: Call) -> Any:
        if call.method == "download":
            content = self.files.get(call.params["file_id"])
            if content is None:
                return TelegramError(400, "Bad Request: invalid file_id")
            return {"file_id": call.params["file_id"], "file_unique_id": "u" + call.params["file_id"],
                    "file_size": len(content), "file_path": "documents/file", "content": content}
        if call.method.startswith("send") or call.method.startswith("copyMessage"):
            message: Dict[str, Any] = {"message_id": next(self._message_ids), "date": 0,
                                       "chat": {"id": call.params.get("chat_id", self._chat_id())}}
            if "text" in call.params:
                message["text"] = call.params["text"]
            return message
        return True

    def _chat_id(self) -> Any:
        return (self.scope.get("chat") or self.scope.get("user") or {}).get("id")

    def _respond(self, response: Dict[str, Any]) -> None:
        self._responses.append(response)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _changed(self) -> "asyncio.Future[None]":
        waiter: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    # -- the test's side

    async def _start(self) -> None:
        self._task = asyncio.ensure_future(_call_app(self.app, self.scope, self._receive, self._send))
        self._task.add_done_callback(lambda _: self._wake())

    def _raise_if_ended(self) -> None:
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise exc

    async def _until(self, ready: Callable[[], bool], what: str, timeout: Optional[float]) -> None:
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            self._raise_if_ended()
            if self._task is not None and self._task.done():
                raise AssertionError("the application ended while waiting for %s" % what)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError("no %s within %g s" % (what, timeout))
            try:
                await asyncio.wait_for(self._changed(), remaining)
            except asyncio.TimeoutError:
                pass

    async def receive_call(self, timeout: Optional[float] = None) -> Call:
        """The next call the application made (waits for it)."""
        await self._until(lambda: bool(self._unread), "call", timeout)
        return self._unread.popleft()

    async def receive_text(self, timeout: Optional[float] = None) -> Optional[str]:
        """The text of the next call (a sendMessage's, an edit's)."""
        return (await self.receive_call(timeout)).text

    def calls_left(self) -> List[Call]:
        """The calls made that :meth:`receive_call` has not returned yet."""
        return list(self._unread)

    async def wait_ended(self, timeout: Optional[float] = None) -> None:
        """Wait for the application instance to return; raises what it raised."""
        await self._until(lambda: self._task is not None and self._task.done(), "end of the application", timeout)
        self._raise_if_ended()

    async def close(self) -> None:
        """Cancel the application if it still runs."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass


_DEFAULT = object()


class TelegramCommunicator(_Communicator):
    """One chat (or user) scope of an application.

    ``chat_id`` makes a chat scope (``chat``, a private chat by default, may
    give the whole Chat object); ``user_id`` alone makes a user scope. Use it
    as ``async with``: the instance starts on entry (its first
    ``receive()`` waits for your first update) and is disconnected
    (``reason="ended"``) and awaited on exit.
    """

    def __init__(
        self,
        app: Any,
        chat_id: Optional[int] = 1,
        *,
        chat: Optional[Dict[str, Any]] = None,
        user_id: Optional[int] = None,
        user: Optional[Dict[str, Any]] = None,
        bot: Optional[Dict[str, Any]] = None,
        state: Optional[Dict[str, Any]] = None,
        **options: Any,
    ) -> None:
        self.user = user or {"id": user_id or (chat_id if chat_id and chat_id > 0 else 7), "is_bot": False,
                             "first_name": "Test"}
        scope: Dict[str, Any] = {"type": "telegram", "asgi": {"version": "3.0", "spec_version": "1.1"},
                                 "bot": dict(bot or DEFAULT_BOT), "extensions": {}}
        if chat is not None or (chat_id is not None and user_id is None):
            scope["chat"] = chat or {"id": chat_id, "type": "private" if chat_id and chat_id > 0 else "group"}
        else:
            scope["user"] = self.user
        if state is not None:
            scope["state"] = dict(state)
        super().__init__(app, scope, **options)
        self._update_ids = itertools.count(1)
        self._message_counter = itertools.count(1)
        self._in_hand: Optional[Dict[str, Any]] = None
        #: update_ids of the updates the application finished, in order.
        self.finished_updates: List[int] = []

    async def __aenter__(self) -> "TelegramCommunicator":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None and not self._task.done():
            await self.disconnect(raise_errors=exc[0] is None)
        await self.close()

    async def start(self) -> None:
        """Start the application instance (``async with`` does)."""
        await self._start()

    def _took(self, event: Dict[str, Any]) -> None:
        self._finish_in_hand()
        self._in_hand = event

    def _asked_with_nothing(self) -> None:
        if not self._awaiting and not self._responses:
            self._finish_in_hand()

    def _finish_in_hand(self) -> None:
        if self._in_hand is not None and "update_id" in self._in_hand:
            self.finished_updates.append(self._in_hand["update_id"])
            self._wake()
        self._in_hand = None

    # -- updates

    def send_update(self, kind: str, obj: Dict[str, Any], update_id: Optional[int] = None) -> int:
        """Deliver an update of any kind (``"edited_message"``, ...) with its
        object as Telegram sends it; returns its update_id."""
        uid = next(self._update_ids) if update_id is None else update_id
        self._events.append(dict(obj, type="telegram." + kind, update_id=uid))
        self._wake()
        return uid

    def message(self, text: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
        """A Message from the test user in this chat, as Telegram sends one."""
        message: Dict[str, Any] = {"message_id": next(self._message_counter), "date": 0,
                                   "chat": self.scope.get("chat") or {"id": self.user["id"], "type": "private"},
                                   "from": self.user}
        if text is not None:
            message["text"] = text
            if text.startswith("/"):
                word = text.split(None, 1)[0]
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(word)}]
        message.update(fields)
        return message

    async def send_message(self, text: Optional[str] = None, **fields: Any) -> int:
        """Deliver a message (text, or other fields: ``document={...}``)."""
        return self.send_update("message", self.message(text, **fields))

    async def send_callback(self, data: str, message: Optional[Dict[str, Any]] = None, **fields: Any) -> int:
        """Deliver a press of a button with this ``callback_data`` on
        ``message`` (by default a message of the bot's in this chat)."""
        if message is None and "inline_message_id" not in fields:
            message = self.message("(buttons)", **{"from": self.scope["bot"]})
        query: Dict[str, Any] = {"id": "cq%d" % next(self._update_ids), "from": self.user,
                                 "chat_instance": "1", "data": data}
        if message is not None:
            query["message"] = message
        query.update(fields)
        return self.send_update("callback_query", query)

    async def push(self, type: str, **fields: Any) -> int:
        """Deliver an ``app.*`` event as another program would push it."""
        if not type.startswith("app."):
            type = "app." + type
        uid = -next(self._update_ids)
        self._events.append(dict(fields, type=type, update_id=uid))
        self._wake()
        return uid

    async def finished(self, update_id: Optional[int] = None, timeout: Optional[float] = None) -> None:
        """Wait until the application finished this update (by default the
        last one sent): it asked for the next event with no response owed, or
        ended. Raises what the application raised."""
        target = update_id
        if target is None:
            pending = [e["update_id"] for e in self._events if "update_id" in e]
            target = pending[-1] if pending else (self._in_hand or {}).get("update_id")
        if target is None:
            return

        def done() -> bool:
            return target in self.finished_updates or (self._task is not None and self._task.done())

        await self._until(done, "finish of update %s" % target, timeout)
        self._raise_if_ended()

    async def disconnect(self, reason: str = "ended", raise_errors: bool = True,
                         timeout: Optional[float] = None) -> None:
        """Send ``telegram.disconnect`` (after the queued updates) and wait
        for the instance to return."""
        self._events.append({"type": "telegram.disconnect", "reason": reason})
        self._wake()
        try:
            await self.wait_ended(timeout)
        except AssertionError:
            raise
        except Exception:
            if raise_errors:
                raise


class LifespanCommunicator(_Communicator):
    """The lifespan scope of an application: ``await startup()`` sends
    ``lifespan.startup`` and waits for its answer (raising on
    ``startup.failed``), ``await shutdown()`` likewise. Calls made from it
    are received and answered as a chat's are."""

    def __init__(self, app: Any, *, bot: Optional[Dict[str, Any]] = None, **options: Any) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "1.1"},
                 "state": {}, "bot": dict(bot or DEFAULT_BOT)}
        super().__init__(app, scope, **options)
        self.lifespan_events: List[Dict[str, Any]] = []

    @property
    def state(self) -> Dict[str, Any]:
        return self.scope["state"]  # type: ignore[no-any-return]

    def _send_other(self, event: Dict[str, Any]) -> bool:
        if str(event.get("type", "")).startswith("lifespan."):
            self.lifespan_events.append(event)
            return True
        return False

    def _check(self, event: Dict[str, Any]) -> None:
        if event.get("type") == "telegram.send_message" and "chat_id" not in event:
            raise ValueError("telegram.send_message on the lifespan scope needs a chat_id")
        super()._check(event)

    async def _answer_of(self, prefix: str, timeout: Optional[float]) -> Dict[str, Any]:
        def answered() -> bool:
            return any(e["type"].startswith(prefix) for e in self.lifespan_events)

        await self._until(answered, prefix + "complete", timeout)
        event = next(e for e in self.lifespan_events if e["type"].startswith(prefix))
        if event["type"].endswith(".failed"):
            raise RuntimeError("%s: %s" % (event["type"], event.get("message")))
        return event

    async def startup(self, timeout: Optional[float] = None) -> None:
        if self._task is None:
            await self._start()
        self._events.append({"type": "lifespan.startup"})
        self._wake()
        await self._answer_of("lifespan.startup.", timeout)

    async def shutdown(self, timeout: Optional[float] = None) -> None:
        self._events.append({"type": "lifespan.shutdown"})
        self._wake()
        await self._answer_of("lifespan.shutdown.", timeout)
        await self.close()

    async def __aenter__(self) -> "LifespanCommunicator":
        await self.startup()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if exc[0] is None:
            await self.shutdown()
        await self.close()


async def _call_app(app: Any, scope: Dict[str, Any], receive: Any, send: Any) -> Any:
    """ASGI 3 or ASGI 2, told apart as asgiref does."""
    if inspect.isclass(app):
        return await app(scope)(receive, send)
    target = app.__call__ if not inspect.isfunction(app) and not inspect.ismethod(app) else app
    if inspect.iscoroutinefunction(target) or _is_consumer_app(app):
        return await app(scope, receive, send)
    result = app(scope)
    if inspect.isawaitable(result):
        return await result
    return await result(receive, send)


def _is_consumer_app(app: Any) -> bool:
    return hasattr(app, "consumer_class")
