"""The example bot: echoes every text message back to its chat.

A plain ASGI 3 application (stdlib only). asgigramd starts one instance per chat
and feeds it the chat's updates through receive().
"""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        # No start-up work here; acknowledging lifespan keeps the log quiet.
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    while True:
        event = await receive()
        if event["type"] == "telegram.message" and "text" in event:
            await send({
                "type": "telegram.send_message",
                "text": event["text"],
            })
        elif event["type"] == "telegram.disconnect":
            return
