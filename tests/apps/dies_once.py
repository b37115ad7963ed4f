"""Sends each text with a request_id and replies with the message_id it got.
A text "die" kills the worker process after its first call was answered,
once per $DIE_MARKER file: the update is then delivered again to a fresh
instance, which repeats the same call."""
import os
import signal

MARKER = os.environ["DIE_MARKER"]


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        text = event.get("text", "")
        await send({
            "type": "telegram.api",
            "method": "sendMessage",
            "params": {"text": text},
            "request_id": "first",
        })
        response = await receive()
        assert response["type"] == "telegram.api.response", response
        if text == "die" and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        await send({
            "type": "telegram.send_message",
            "text": "%s -> message_id %s" % (text, response["result"]["message_id"]),
        })
