"""Prints to stdout and stderr before replying: output must reach the log, not the channel."""
import sys


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        print("printed by the app:", event.get("text"))
        print("stderr line from the app", file=sys.stderr)
        await send({"type": "telegram.send_message", "text": "printed"})
