"""Echoes; a text "close" closes the worker's channel (fd 3) and then keeps
the process alive, blocked, as a buggy app could."""
import os
import time


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        text = event.get("text", "")
        if text == "close":
            os.close(3)
            time.sleep(600)
        await send({"type": "telegram.send_message", "text": "ok:" + text})
