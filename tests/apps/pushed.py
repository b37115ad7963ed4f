"""Answers Telegram messages and events other programs push in.

Every event's update_id is appended to $RECORD_FILE (one per line, flushed at
once, so the record survives the daemon being killed) when that is set;
$RECORD_DELAY seconds of work per event simulate a slow handler. A message is
echoed; a pushed event `app.<name>` is answered "app.<name> order=<order>
chat=<scope's chat id>"."""
import asyncio
import os

RECORD = os.environ.get("RECORD_FILE")
DELAY = float(os.environ.get("RECORD_DELAY", "0"))


async def app(scope, receive, send):
    while True:
        event = await receive()
        kind = event["type"]
        if kind == "telegram.disconnect":
            return
        if RECORD:
            with open(RECORD, "a") as f:
                f.write("%d\n" % event["update_id"])
        if DELAY:
            await asyncio.sleep(DELAY)
        if kind.startswith("app."):
            text = "%s order=%s chat=%s" % (kind, event.get("order"), scope["chat"]["id"])
        else:
            text = event.get("text", "")
        await send({"type": "telegram.send_message", "text": text})
