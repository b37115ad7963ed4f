"""Telegram objects as read-only views with attribute access.

Updates arrive as plain dicts (the Bot API's JSON). :class:`TelegramObject`
is a ``dict`` that also answers ``message.text`` or ``message.chat.id``; an
optional field Telegram left out reads as ``None``, as in aiogram and
python-telegram-bot. ``from`` is a keyword in Python: read it as
``message.from_user``.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["TelegramObject", "Message", "wrap"]


def wrap(value: Any) -> Any:
    """Dicts (also inside lists) as TelegramObjects; anything else as is."""
    if isinstance(value, dict) and not isinstance(value, TelegramObject):
        return TelegramObject(value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


class TelegramObject(dict):  # type: ignore[type-arg]
    """A Bot API object: a dict whose keys also read as attributes."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        key = "from" if name == "from_user" else name
        return wrap(self.get(key))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Telegram objects are read-only; copy with dict(obj) to change one")


class Message(TelegramObject):
    """A Message, with what a command handler needs."""

    __slots__ = ()

    @property
    def command(self) -> Optional[str]:
        """``"start"`` for ``/start``, ``/start@mybot`` or ``/start payload``; else None."""
        text = self.get("text") or ""
        if not text.startswith("/"):
            return None
        word = text.split(None, 1)[0][1:]
        return word.split("@", 1)[0] or None

    @property
    def command_bot(self) -> Optional[str]:
        """The bot named in ``/start@mybot`` (``"mybot"``), else None."""
        text = self.get("text") or ""
        if not text.startswith("/"):
            return None
        word = text.split(None, 1)[0]
        return word.split("@", 1)[1] if "@" in word else None

    @property
    def args(self) -> str:
        """The text after the command: the deep-link payload of ``/start``."""
        text = self.get("text") or ""
        parts = text.split(None, 1)
        return parts[1].strip() if len(parts) > 1 and text.startswith("/") else ""

    @property
    def file_id(self) -> Optional[str]:
        """The file of a document, the largest photo size, a voice, audio,
        video, animation, video note or sticker; None for other messages."""
        photo = self.get("photo")
        if photo:
            return photo[-1]["file_id"]  # type: ignore[no-any-return]
        for kind in ("document", "voice", "audio", "video", "animation", "video_note", "sticker"):
            obj = self.get(kind)
            if obj:
                return obj["file_id"]  # type: ignore[no-any-return]
        return None
