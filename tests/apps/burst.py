"""Replies three numbered messages per update, in order, without waiting."""


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        for i in range(3):
            await send({"type": "telegram.send_message", "text": "%s.%d" % (event["text"], i)})
