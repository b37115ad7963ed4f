"""Echoes every text and appends each update_id it receives to $RECORD_FILE.
A text "poison" kills this worker while its update is in hand, the way
$POISON says: "exit" (os._exit), "hang" (blocks the event loop), "garbage"
(writes a corrupt frame to the channel), "fork" (forks a child that lingers,
then the worker exits). Every other chat on the worker is innocent. A text
"slow" makes its handler await for an hour without blocking anything."""
import os
import time

RECORD = os.environ["RECORD_FILE"]
HOW = os.environ.get("POISON", "exit")
DELAY = float(os.environ.get("RECORD_DELAY", "0"))


def poison():
    if HOW == "exit":
        os._exit(1)
    if HOW == "hang":
        time.sleep(3600)
    if HOW == "garbage":
        os.write(3, b"\xff\xff\xff\xff" + b"x" * 64)
        time.sleep(3600)
    if HOW == "fork":
        if os.fork() == 0:
            time.sleep(3600)
            os._exit(0)
        os._exit(3)
    raise RuntimeError("unknown POISON %r" % HOW)


async def app(scope, receive, send):
    import asyncio

    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        with open(RECORD, "a") as f:
            f.write("%d\n" % event["update_id"])
        text = event.get("text", "")
        if text == "poison":
            poison()
        if text == "slow":
            await asyncio.sleep(3600)
        if DELAY:
            await asyncio.sleep(DELAY)
        await send({"type": "telegram.send_message", "text": text})
