"""For every text "<n>": a call with a request_id ("a:<n>"), its response
awaited (the events that arrive meanwhile are kept for later, as api.py
does), then a second call that mentions the response ("b:<n> re a:<n>").
Appends each update_id it receives to $RECORD_FILE, so a test can tell how
far a burst got. A text "pid" is answered with the worker's pid."""
import os

RECORD = os.environ.get("RECORD_FILE")


async def app(scope, receive, send):
    backlog = []

    async def response(request_id):
        while True:
            event = await receive()
            if event["type"] == "telegram.api.response" and event["request_id"] == request_id:
                return event
            if event["type"] == "telegram.disconnect":
                return None
            backlog.append(event)

    async def next_event():
        return backlog.pop(0) if backlog else await receive()

    while True:
        event = await next_event()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] != "telegram.message":
            continue
        if RECORD:
            with open(RECORD, "a") as f:
                f.write("%d\n" % event["update_id"])
        n = event.get("text", "")
        if n == "pid":
            await send({"type": "telegram.send_message", "text": "pid:%d" % os.getpid()})
            continue
        request_id = "a%d" % event["update_id"]
        await send({"type": "telegram.api", "method": "sendMessage",
                    "params": {"text": "a:" + n}, "request_id": request_id})
        reply = await response(request_id)
        if reply is None:
            return
        said = reply["result"].get("text") if reply["ok"] else "error %s" % reply.get("description")
        await send({"type": "telegram.send_message", "text": "b:%s re %s" % (n, said)})
