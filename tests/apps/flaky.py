"""Echoes, but raises on the text "boom" (after receiving it)."""


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event.get("text") == "boom":
            raise ZeroDivisionError("the app blew up on purpose")
        await send({"type": "telegram.send_message", "text": "ok:" + event.get("text", "")})
