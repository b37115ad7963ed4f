"""ASGI 3 echo: replies to each text with the same text."""


async def app(scope, receive, send):
    assert scope["type"] == "telegram", scope
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] == "telegram.message" and "text" in event:
            await send({"type": "telegram.send_message", "text": event["text"]})
