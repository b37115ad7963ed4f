"""Calls from the lifespan scope (docs/protocol.md, "Calls from the lifespan
scope"): setMyCommands during start-up, awaiting its response; a broadcast
from a task started in lifespan; a later call whose response reaches the
lifespan's receive(); send_message without chat_id, rejected. Any message in
a chat is answered with what the lifespan saw."""

import asyncio
import os

# The chats the background task broadcasts to, two rounds (the test
# registers them with the sandbox).
BROADCAST = [int(c) for c in os.environ.get("LIFESPAN_BROADCAST", "").split(",") if c]
COMMANDS = [{"command": "start", "description": "Start"}, {"command": "help", "description": "Help"}]


async def broadcast(send):
    for round_ in (1, 2):
        for chat_id in BROADCAST:
            await send({"type": "telegram.send_message", "chat_id": chat_id, "text": "news %d" % round_})


async def lifespan(scope, receive, send):
    # A list, so that the shallow copy every chat scope gets sees what is
    # added after it started.
    seen = scope["state"]["seen"] = []
    message = await receive()
    assert message["type"] == "lifespan.startup", message
    seen.append("bot=%s" % scope["bot"]["username"])
    try:
        await send({"type": "telegram.send_message", "text": "to whom?"})
        seen.append("rejected=no")
    except ValueError as exc:
        seen.append("rejected=%s" % type(exc).__name__)
        print("lifespan: %s" % exc)
    await send({"type": "telegram.api", "method": "setMyCommands",
                "params": {"commands": COMMANDS}, "request_id": "commands"})
    reply = await receive()
    seen.append("commands=%s:%s:%s" % (reply["type"], reply["request_id"], reply["ok"]))
    await send({"type": "lifespan.startup.complete"})
    task = asyncio.ensure_future(broadcast(send))
    await send({"type": "telegram.api", "method": "getMyCommands", "request_id": 2})
    while True:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            break
        seen.append("later=%s:%s:%s" % (message["type"], message["request_id"], message["ok"]))
    task.cancel()
    print("lifespan shutdown ran")
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(scope, receive, send)
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        await send({"type": "telegram.send_message", "text": " ".join(scope["state"]["seen"])})
