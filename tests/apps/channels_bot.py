"""Django Channels consumers, unmodified, behind ProtocolTypeRouter."""
import django
from django.conf import settings

if not settings.configured:
    settings.configure(INSTALLED_APPS=["channels"], USE_TZ=True)
    django.setup()

from channels.consumer import AsyncConsumer, SyncConsumer  # noqa: E402
from channels.exceptions import StopConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402


class AsyncEcho(AsyncConsumer):
    async def telegram_message(self, event):
        self.count = getattr(self, "count", 0) + 1
        await self.send({"type": "telegram.send_message",
                         "text": "async %d: %s" % (self.count, event["text"])})

    async def telegram_disconnect(self, event):
        raise StopConsumer()


class SyncEcho(SyncConsumer):
    def telegram_message(self, event):
        self.send({"type": "telegram.send_message", "text": "sync: " + event["text"]})

    def telegram_disconnect(self, event):
        raise StopConsumer()


async_application = ProtocolTypeRouter({"telegram": AsyncEcho.as_asgi()})
sync_application = ProtocolTypeRouter({"telegram": SyncEcho.as_asgi()})
