"""Django Channels: :class:`TelegramConsumer`, a consumer base class for
Telegram scopes.

::

    from asgigram.channels import TelegramConsumer

    class Echo(TelegramConsumer):
        async def telegram_message(self, event):
            await self.reply("You said: " + event["text"])

        async def order_shipped(self, event):          # a channel-layer message
            await self.reply("Order %d has shipped" % event["order"])

    application = ProtocolTypeRouter({"telegram": Echo.as_asgi()})

    # elsewhere (a view, a task):
    await get_channel_layer().group_send(TelegramConsumer.group_for(chat_id),
                                         {"type": "order.shipped", "order": 17})

Unlike a plain ``AsyncConsumer``, it

- ignores event kinds it has no handler for (a plain one dies on the first
  ``telegram.edited_message``);
- joins the channel-layer group :meth:`group_for` its chat, when a channel
  layer is configured, and leaves it on disconnect;
- ends on ``telegram.disconnect`` (override ``telegram_disconnect`` and call
  ``super()`` to do more);
- offers ``await self.call(method, **params)`` returning the result (or
  raising :class:`~asgigram.TelegramError`), ``self.reply`` and
  ``self.download``, through a :class:`~asgigram.Session`: the responses
  reach the call while a handler runs.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer

from ._session import Session

__all__ = ["TelegramConsumer"]


class TelegramConsumer(AsyncConsumer):  # type: ignore[misc]
    """Base class for Channels consumers of asgigramd's telegram scopes."""

    #: prefix of the per-chat channel-layer group names
    group_prefix = "telegram.chat."

    session: Session
    groups_joined: list

    @classmethod
    def group_for(cls, chat_id: Any) -> str:
        """The channel-layer group a chat's consumer is in."""
        return "%s%s" % (cls.group_prefix, chat_id)

    @property
    def chat_id(self) -> Optional[int]:
        scope = self.scope
        return (scope.get("chat") or scope.get("user") or {}).get("id")

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        self.session = Session(scope, receive, send)
        self.groups_joined = []
        # Updates come through the session, so a response a handler awaits
        # is handed to its call instead of to dispatch().
        await super().__call__(scope, self.session.next_event, send)

    async def dispatch(self, message: Dict[str, Any]) -> None:
        if not self.groups_joined and self.channel_layer is not None and self.chat_id is not None:
            group = self.group_for(self.chat_id)
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.append(group)
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            return  # a kind this consumer does not handle
        await super().dispatch(message)

    async def telegram_disconnect(self, event: Dict[str, Any]) -> None:
        """Leave the chat's group and end the consumer."""
        if self.channel_layer is not None:
            for group in self.groups_joined:
                await self.channel_layer.group_discard(group, self.channel_name)
        self.groups_joined = []
        raise StopConsumer()

    async def call(self, method: str, **params: Any) -> Any:
        """A Bot API call; ``chat_id`` defaults to this chat."""
        if "chat" not in self.scope and "chat_id" not in params and method.startswith("send"):
            params["chat_id"] = self.chat_id
        return await self.session.call(method, params)

    async def reply(self, text: str, **params: Any) -> Any:
        """Send a message to this chat; returns the sent Message."""
        return await self.call("sendMessage", text=text, **params)

    async def download(self, file_id: str) -> bytes:
        """The bytes of a file Telegram has."""
        return await self.session.download(file_id)
