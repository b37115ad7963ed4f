"""Counts the messages its instance has received: each chat has its own count."""


async def app(scope, receive, send):
    count = 0
    chat_id = scope["chat"]["id"]
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        count += 1
        await send({"type": "telegram.send_message", "text": "chat %d count %d" % (chat_id, count)})
