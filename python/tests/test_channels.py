"""TelegramConsumer under Django Channels, with the in-memory channel layer."""

import asyncio

import pytest

pytest.importorskip("channels")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(INSTALLED_APPS=["channels"], USE_TZ=True,
                       CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}})
    django.setup()

from channels.layers import get_channel_layer  # noqa: E402

from asgigram import TelegramError  # noqa: E402
from asgigram.channels import TelegramConsumer  # noqa: E402
from asgigram.testing import TelegramCommunicator  # noqa: E402


class Shop(TelegramConsumer):
    async def telegram_message(self, event):
        try:
            sent = await self.reply("got " + event["text"])
        except TelegramError as exc:
            await self.reply("failed %d" % exc.error_code)
            return
        await self.call("pinChatMessage", message_id=sent["message_id"])

    async def order_shipped(self, event):
        await self.reply("order %d shipped" % event["order"])


def run(coro):
    return asyncio.run(coro)


def test_calls_answer_kinds_without_handler_are_ignored_and_group_messages_arrive():
    async def main():
        async with TelegramCommunicator(Shop.as_asgi(), chat_id=55) as chat:
            chat.send_update("edited_message", chat.message("ignored"))
            await chat.send_message("hi")
            assert await chat.receive_text() == "got hi"
            pin = await chat.receive_call()
            assert pin.method == "pinChatMessage" and pin.params["message_id"] >= 1000
            await chat.finished()
            await get_channel_layer().group_send(TelegramConsumer.group_for(55),
                                                 {"type": "order.shipped", "order": 17})
            assert await chat.receive_text() == "order 17 shipped"

    run(main())


def test_errors_reach_the_handler():
    async def main():
        answers = {"sendMessage": lambda call: TelegramError(403, "Forbidden") if call.text.startswith("got")
                   else {"message_id": 1}}
        async with TelegramCommunicator(Shop.as_asgi(), answers=answers) as chat:
            await chat.send_message("hi")
            await chat.receive_call()
            assert await chat.receive_text() == "failed 403"

    run(main())
