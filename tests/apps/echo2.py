"""ASGI 2 (double callable) echo, written as a class like the original asgigram apps."""


class App:
    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        assert self.scope["asgi"]["version"] == "2.0", self.scope
        while True:
            event = await receive()
            if event["type"] == "telegram.disconnect":
                return
            if event["type"] == "telegram.message":
                await send({
                    "type": "telegram.send_message",
                    "text": "v2:" + event["text"],
                    "reply_to_message_id": event["message_id"],
                })
