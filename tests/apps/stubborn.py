"""Echoes; after telegram.disconnect it refuses to end, swallowing every
cancellation, so its instance is still there when the worker stops."""
import asyncio


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        await send({"type": "telegram.send_message", "text": event.get("text", "")})
