"""``reply_markup`` values without writing the Bot API's dicts by hand.

Each function returns the plain dict Telegram takes, so it can be passed as
``reply_markup=`` to any call (and printed or compared in tests)::

    asgigram.inline_keyboard([[("Yes", "yes"), ("No", "no")],
                              [asgigram.button("Docs", url="https://core.telegram.org/bots")]])
    asgigram.reply_keyboard([["Red", "Green"], ["Cancel"]], one_time=True)
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

__all__ = ["button", "inline_keyboard", "reply_keyboard", "remove_keyboard", "force_reply"]

Button = Dict[str, Any]
InlineCell = Union[Button, Tuple[str, str]]
ReplyCell = Union[Button, str]


def button(text: str, callback_data: Optional[str] = None, **fields: Any) -> Button:
    """One button: ``button("Go", "go")`` for a callback, or any other kind
    with its field: ``button("Site", url=...)``, ``button("Share", request_contact=True)``."""
    result: Button = {"text": text}
    if callback_data is not None:
        result["callback_data"] = callback_data
    result.update(fields)
    return result


def _inline(cell: InlineCell) -> Button:
    if isinstance(cell, dict):
        return cell
    text, data = cell
    return {"text": text, "callback_data": data}


def inline_keyboard(rows: Iterable[Sequence[InlineCell]]) -> Dict[str, Any]:
    """Buttons under a message. A cell is ``(text, callback_data)`` or a
    :func:`button` dict; callback data is at most 64 bytes (Telegram's limit)."""
    keyboard = [[_inline(cell) for cell in row] for row in rows]
    for row in keyboard:
        for cell in row:
            data = cell.get("callback_data")
            if data is not None and len(str(data).encode()) > 64:
                raise ValueError("callback_data %r is longer than Telegram's 64 bytes" % data)
    return {"inline_keyboard": keyboard}


def reply_keyboard(
    rows: Iterable[Sequence[ReplyCell]],
    *,
    resize: bool = True,
    one_time: bool = False,
    placeholder: Optional[str] = None,
    selective: bool = False,
    persistent: bool = False,
) -> Dict[str, Any]:
    """A keyboard in place of the user's: a cell is its text, or a
    :func:`button` dict (``request_contact``, ``request_location``, ...)."""
    markup: Dict[str, Any] = {
        "keyboard": [[{"text": c} if isinstance(c, str) else c for c in row] for row in rows],
        "resize_keyboard": resize,
    }
    if one_time:
        markup["one_time_keyboard"] = True
    if placeholder is not None:
        markup["input_field_placeholder"] = placeholder
    if selective:
        markup["selective"] = True
    if persistent:
        markup["is_persistent"] = True
    return markup


def remove_keyboard(selective: bool = False) -> Dict[str, Any]:
    """Takes a :func:`reply_keyboard` away."""
    markup: Dict[str, Any] = {"remove_keyboard": True}
    if selective:
        markup["selective"] = True
    return markup


def force_reply(placeholder: Optional[str] = None, selective: bool = False) -> Dict[str, Any]:
    """Opens the user's reply to the message, as if they had tapped Reply."""
    markup: Dict[str, Any] = {"force_reply": True}
    if placeholder is not None:
        markup["input_field_placeholder"] = placeholder
    if selective:
        markup["selective"] = True
    return markup
