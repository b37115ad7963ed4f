"""Says goodbye with the disconnect reason; ignores disconnect when asked to
(then the server cancels it after the grace period)."""


async def app(scope, receive, send):
    stubborn = False
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            await send({"type": "telegram.send_message", "text": "bye: " + event["reason"]})
            if stubborn:
                again = await receive()
                assert again["type"] == "telegram.disconnect"
                import asyncio
                await asyncio.sleep(3600)
            return
        if event.get("text") == "stubborn":
            stubborn = True
        await send({"type": "telegram.send_message", "text": "hi"})
