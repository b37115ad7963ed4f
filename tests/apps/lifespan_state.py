"""Lifespan puts a value into state; every scope sees it, and the bot's name."""

events = []


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["greeting"] = "hello from lifespan"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                print("lifespan shutdown ran")
                await send({"type": "lifespan.shutdown.complete"})
                return
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        await send({"type": "telegram.send_message",
                    "text": "%s @%s spec=%s" % (scope["state"]["greeting"], scope["bot"]["username"],
                                                scope["asgi"]["spec_version"])})
