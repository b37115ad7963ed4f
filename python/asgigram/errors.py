"""Exceptions the package raises."""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ["TelegramError", "Disconnected"]


class TelegramError(Exception):
    """A Bot API call failed: Telegram's answer was ``ok: false``.

    ``error_code`` and ``description`` are Telegram's (``error_code`` is 0
    when the daemon could not get an answer at all), ``parameters`` its
    ResponseParameters where it gave them, and ``retry_after`` (seconds) is
    taken from them for a flood-limit answer. The daemon has already retried
    what it retries on its own, so this outcome is final.
    """

    def __init__(
        self,
        error_code: int,
        description: str,
        retry_after: Optional[int] = None,
        parameters: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(error_code, description)
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after
        self.parameters: dict[str, Any] = dict(parameters or {})

    @classmethod
    def from_response(cls, event: Mapping[str, Any]) -> "TelegramError":
        """The error a ``telegram.api.response`` with ``ok: false`` stands for."""
        parameters = event.get("parameters") or {}
        retry_after = parameters.get("retry_after") if isinstance(parameters, Mapping) else None
        return cls(
            int(event.get("error_code") or 0),
            str(event.get("description") or ""),
            retry_after,
            parameters if isinstance(parameters, Mapping) else None,
        )

    def __str__(self) -> str:
        return "%s (error %d)" % (self.description or "Telegram error", self.error_code)

    def __repr__(self) -> str:
        return "TelegramError(%r, %r, retry_after=%r)" % (
            self.error_code,
            self.description,
            self.retry_after,
        )


class Disconnected(Exception):
    """The scope ended (``telegram.disconnect`` or ``lifespan.shutdown`` came
    while waiting): no response or update will come any more."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        super().__init__(event.get("reason") or event.get("type"))
        self.event = dict(event)
