"""Echo that takes a moment to wind down after telegram.disconnect, so the
daemon has to route a chat's new updates while its old instance still runs
(reload tests)."""

import asyncio


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            await asyncio.sleep(0.3)
            return
        if event["type"] == "telegram.message" and "text" in event:
            await send({"type": "telegram.send_message", "text": event["text"]})
