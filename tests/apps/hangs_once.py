"""Echoes "ok:<text>". The first "hang" (once per $HANG_MARKER file) blocks
the event loop for good, as a blocking call in async code does."""
import os
import time

MARKER = os.environ["HANG_MARKER"]


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        text = event.get("text", "")
        if text == "hang" and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            time.sleep(3600)
        await send({"type": "telegram.send_message", "text": "ok:" + text})
