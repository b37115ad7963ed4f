"""A text "flood" prints $FLOOD_BYTES bytes to stdout without a newline, then
one short line; every text is echoed."""
import os
import sys

FLOOD = int(os.environ.get("FLOOD_BYTES", "20000000"))


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        text = event.get("text", "")
        if text == "flood":
            chunk = "x" * 1_000_000
            for _ in range(FLOOD // len(chunk)):
                sys.stdout.write(chunk)
            sys.stdout.write("\nafter the flood\n")
            sys.stdout.flush()
        await send({"type": "telegram.send_message", "text": "ok:" + text})
