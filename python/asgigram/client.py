"""Clients for the daemon's HTTP endpoint, for programs next to the bot (a
Django view, a Celery task, a cron job): push an event into a chat, or make
a Bot API call through the daemon's journal and pacing.

::

    from asgigram.client import Client

    daemon = Client("http://127.0.0.1:8080", token=os.environ["ASGIGRAM_API_TOKEN"])
    daemon.push(123456, "app.order_shipped", order=17)     # -> the event's update_id
    daemon.call("sendMessage", chat_id=123456, text="Daily digest")

:class:`AsyncClient` has the same methods as coroutines. Both use the
standard library only. The token defaults to ``$ASGIGRAM_API_TOKEN``.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Tuple

from .errors import TelegramError

__all__ = ["Client", "AsyncClient", "ClientError", "OutcomeUnknown"]


class ClientError(Exception):
    """The daemon refused the request: ``status`` 400 (the request is wrong;
    ``error`` says how), 401 (the token), 404 (no ``http.api_token`` is
    configured), 503 (starting, full or stopping: try again after
    ``retry_after`` seconds when given), or it could not be reached
    (``status`` 0)."""

    def __init__(self, status: int, error: str, retry_after: Optional[float] = None) -> None:
        super().__init__("%s: %s" % (status, error) if status else error)
        self.status = status
        self.error = error
        self.retry_after = retry_after


class OutcomeUnknown(ClientError):
    """A call got no final answer from Telegram in time (502/504): it may or
    may not have been made. The daemon stored it; do not simply repeat a
    call that must not happen twice."""


class Client:
    """Blocking client (urllib)."""

    def __init__(self, url: str = "http://127.0.0.1:8080", token: Optional[str] = None,
                 timeout: float = 70.0) -> None:
        self.url = url.rstrip("/")
        self._token = token if token is not None else os.environ.get("ASGIGRAM_API_TOKEN", "")
        self.timeout = timeout

    def __repr__(self) -> str:
        return "%s(%r)" % (type(self).__name__, self.url)  # never the token

    def push(self, chat_id: int, type: str, **fields: Any) -> int:
        """Push an ``app.*`` event into the chat's application instance;
        returns its (negative) update_id once the daemon has stored it.
        ``type`` may leave out the ``app.`` prefix."""
        if not type.startswith("app."):
            type = "app." + type
        status, body, headers = self._post("/v1/chats/%d/events" % int(chat_id), dict(fields, type=type))
        return int(self._checked(status, body, headers)["update_id"])

    def call(self, method: str, **params: Any) -> Any:
        """A Bot API call through the daemon (no default chat_id, no files);
        returns its result or raises TelegramError."""
        status, body, headers = self._post("/v1/calls", {"method": method, "params": params})
        return _result(self._checked(status, body, headers))

    def _checked(self, status: int, body: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, Any]:
        return _checked(status, body, headers)

    def _post(self, path: str, payload: Dict[str, Any]) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
        data = json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST", headers={
            "Content-Type": "application/json", "Authorization": "Bearer " + self._token})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, _json(response.read()), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read()), dict(exc.headers or {})
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(0, "cannot reach asgigramd at %s: %s" % (self.url, reason)) from None


class AsyncClient:
    """The same as :class:`Client`, as coroutines (each request runs in a
    thread, so the event loop never blocks)."""

    def __init__(self, url: str = "http://127.0.0.1:8080", token: Optional[str] = None,
                 timeout: float = 70.0) -> None:
        self._sync = Client(url, token, timeout)

    @property
    def url(self) -> str:
        return self._sync.url

    def __repr__(self) -> str:
        return "AsyncClient(%r)" % (self.url,)

    async def push(self, chat_id: int, type: str, **fields: Any) -> int:
        return await asyncio.to_thread(self._sync.push, chat_id, type, **fields)

    async def call(self, method: str, **params: Any) -> Any:
        return await asyncio.to_thread(self._sync.call, method, **params)


def _json(raw: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(raw.decode() or "{}")
    except ValueError:
        return {"error": raw[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"error": repr(value)}


def _checked(status: int, body: Dict[str, Any], headers: Dict[str, str]) -> Dict[str, Any]:
    if status in (200, 202):
        return body
    error = str(body.get("error") or {401: "the API token is missing or wrong",
                                      404: "the daemon has no http.api_token configured"}.get(status, "HTTP %d" % status))
    if status in (502, 504):
        raise OutcomeUnknown(status, error)
    retry = headers.get("Retry-After") or headers.get("retry-after")
    raise ClientError(status, error, float(retry) if retry else None)


def _result(envelope: Dict[str, Any]) -> Any:
    if envelope.get("ok"):
        return envelope.get("result")
    raise TelegramError.from_response(envelope)
