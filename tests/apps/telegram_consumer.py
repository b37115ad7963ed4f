"""A Django Channels consumer built on asgigram.channels.TelegramConsumer:
it ignores the kinds it has no handler for, awaits its calls' results, and
records every update_id it receives in $RECORD_FILE."""
import asyncio
import os

import django
from django.conf import settings

if not settings.configured:
    settings.configure(INSTALLED_APPS=["channels"], USE_TZ=True,
                       CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}})
    django.setup()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from asgigram import TelegramError  # noqa: E402
from asgigram.channels import TelegramConsumer  # noqa: E402

RECORD = os.environ.get("RECORD_FILE")
DELAY = float(os.environ.get("RECORD_DELAY", "0"))


class Echo(TelegramConsumer):
    async def dispatch(self, message):
        if RECORD and "update_id" in message:
            with open(RECORD, "a") as f:
                f.write("%d\n" % message["update_id"])
        await super().dispatch(message)

    async def telegram_message(self, event):
        text = event.get("text", "")
        if text == "/who":
            me = await self.call("getMe")
            await self.reply("I am @" + me["username"])
        elif text == "/fail":
            try:
                await self.call("sendMessage", chat_id=987654321, text="nowhere")
            except TelegramError as exc:
                await self.reply("failed: %d" % exc.error_code)
        else:
            if DELAY:
                await asyncio.sleep(DELAY)
            sent = await self.reply(text)
            assert sent["text"] == text


application = ProtocolTypeRouter({"telegram": Echo.as_asgi()})
