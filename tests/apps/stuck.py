"""Echoes, but stops calling receive() after the text "hang"."""
import asyncio


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event.get("text") == "hang":
            await asyncio.sleep(3600)
        await send({"type": "telegram.send_message", "text": "ok:" + event.get("text", "")})
