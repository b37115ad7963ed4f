"""Example: a Django Channels consumer served by asgigramd, unmodified.

    pip install django channels
    cargo run --release -- --sandbox --config config/channels.toml

Channels dispatches each event to the method named after its type, with dots
replaced by underscores: telegram.message -> telegram_message.
"""
import django
from django.conf import settings

if not settings.configured:
    settings.configure(INSTALLED_APPS=["channels"], USE_TZ=True)
    django.setup()

from channels.consumer import AsyncConsumer  # noqa: E402
from channels.exceptions import StopConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402


class EchoConsumer(AsyncConsumer):
    """One consumer instance per chat, like any asgigramd app instance."""

    async def telegram_message(self, event):
        if "text" in event:
            await self.send({
                "type": "telegram.send_message",
                "text": "You said: " + event["text"],
                "reply_to_message_id": event["message_id"],
            })

    async def telegram_disconnect(self, event):
        raise StopConsumer()


application = ProtocolTypeRouter({"telegram": EchoConsumer.as_asgi()})
