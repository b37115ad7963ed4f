"""Answers every text with the pid of the worker it runs in ("pid:<pid>"),
and says when its scope is closed ("closed:<reason>"), so a test can tell
which worker each instance of a chat ran on."""
import os


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            await send({"type": "telegram.send_message", "text": "closed:" + event["reason"]})
            return
        if event["type"] == "telegram.message":
            await send({"type": "telegram.send_message", "text": "pid:%d" % os.getpid()})
