"""Appends every update_id it receives to $RECORD_FILE (one per line, flushed
at once, so the record survives the daemon being killed), then echoes.
$RECORD_DELAY seconds of work per message simulate a slow handler."""
import asyncio
import os

RECORD = os.environ["RECORD_FILE"]
DELAY = float(os.environ.get("RECORD_DELAY", "0"))


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        with open(RECORD, "a") as f:
            f.write("%d\n" % event["update_id"])
        if DELAY:
            await asyncio.sleep(DELAY)
        await send({"type": "telegram.send_message", "text": event.get("text", "")})
