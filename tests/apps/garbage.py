"""Writes garbage into the worker channel (fd 3) on request, as a buggy or
hostile app could: the daemon must survive it and lose nothing."""
import os


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        text = event.get("text", "")
        if text == "bad json":
            os.write(3, b"\x00\x00\x00\x05{oops")
            os.write(3, b"\x00\x00\x00\x02[]")
        elif text == "corrupt":
            os.write(3, b"\xff\xff\xff\xff" + b"x" * 64)
            continue
        await send({"type": "telegram.send_message", "text": "ok:" + text})
