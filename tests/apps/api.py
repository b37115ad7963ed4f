"""Exercises outgoing events: telegram.api, request_id responses, uploads,
passthrough parameters and send() validation. Each text command runs one case
and reports the outcome as a message."""


async def report(send, text):
    await send({"type": "telegram.send_message", "text": text})


async def app(scope, receive, send):
    # Responses share the receive() stream with updates: keep the updates that
    # arrive while waiting for a response, and handle them afterwards.
    backlog = []

    async def response(request_id):
        while True:
            event = await receive()
            if event["type"] == "telegram.api.response" and event["request_id"] == request_id:
                return event
            backlog.append(event)

    async def next_event():
        return backlog.pop(0) if backlog else await receive()

    while True:
        event = await next_event()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] != "telegram.message":
            continue
        cmd = event.get("text", "")
        if cmd == "api":
            await send({"type": "telegram.api", "method": "sendMessage",
                        "params": {"text": "via api"}, "request_id": "r1"})
            reply = await response("r1")
            await report(send, "response %s ok=%s id=%s" % (
                reply["type"], reply["ok"], reply["result"]["message_id"] > 0))
        elif cmd == "fail":
            await send({"type": "telegram.api", "method": "sendMessage",
                        "params": {"chat_id": 987654321, "text": "nowhere"}, "request_id": 7})
            reply = await response(7)
            await report(send, "error %s %s %s" % (reply["request_id"], reply["error_code"], reply["description"]))
        elif cmd == "photo":
            await send({"type": "telegram.api", "method": "sendPhoto",
                        "params": {"photo": {"filename": "cat.png", "content": b"\x89PNG fake"},
                                   "caption": "a cat"}, "request_id": "p"})
            reply = await response("p")
            await report(send, "photo ok=%s" % reply["ok"])
        elif cmd == "album":
            await send({"type": "telegram.api", "method": "sendMediaGroup",
                        "params": {"media": [{"type": "photo", "media": b"one"},
                                             {"type": "photo", "media": b"two"}]},
                        "request_id": "m"})
            reply = await response("m")
            await report(send, "album ok=%s n=%d" % (reply["ok"], len(reply["result"])))
        elif cmd == "keyboard":
            await send({"type": "telegram.send_message", "text": "pick",
                        "reply_markup": {"inline_keyboard": [[{"text": "A", "callback_data": "a"}]]},
                        "reply_to_message_id": event["message_id"]})
        elif cmd == "bad":
            problems = []
            for bad in ["not a dict", {"type": "telegram.nope"}, {"type": "telegram.send_message"},
                        {"type": "telegram.send_message", "text": 5},
                        {"type": "telegram.api", "method": "sendMessage", "params": {"x": {1, 2}}}]:
                try:
                    await send(bad)
                    problems.append("accepted")
                except (TypeError, ValueError) as exc:
                    problems.append(type(exc).__name__)
            await report(send, "bad " + ",".join(problems))
