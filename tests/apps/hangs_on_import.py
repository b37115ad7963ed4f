"""Echoes "ok:<text>"; importing it hangs while $HANG_IMPORT_MARKER exists
(a new version of an app stuck at import, as on a dead database)."""
import os
import time

if os.path.exists(os.environ["HANG_IMPORT_MARKER"]):
    time.sleep(3600)


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        await send({"type": "telegram.send_message", "text": "ok:" + event.get("text", "")})
