"""asgigram: Telegram bots as ASGI applications for asgigramd.

- :class:`Bot`: the first-party API, an ASGI application with decorators.
- :mod:`asgigram.testing`: run any bot without the daemon.
- :mod:`asgigram.channels`: a Django Channels consumer base class.
- :mod:`asgigram.client`: push events and make calls from other programs.
- :class:`Session`: the transport under all of them, for raw ASGI apps.
"""

from ._session import InputFile, Session
from .bot import Bot, CallbackQuery, Chat
from .errors import Disconnected, TelegramError
from .keyboards import button, force_reply, inline_keyboard, remove_keyboard, reply_keyboard
from .types import Message, TelegramObject

__all__ = [
    "Bot",
    "CallbackQuery",
    "Chat",
    "Disconnected",
    "InputFile",
    "Message",
    "Session",
    "TelegramError",
    "TelegramObject",
    "button",
    "force_reply",
    "inline_keyboard",
    "remove_keyboard",
    "reply_keyboard",
]
__version__ = "0.1.0"
