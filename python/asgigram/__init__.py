"""asgigram: Telegram bots as ASGI applications for asgigramd."""

from ._session import InputFile, Session
from .errors import Disconnected, TelegramError

__all__ = ["Disconnected", "InputFile", "Session", "TelegramError"]
__version__ = "0.1.0"
