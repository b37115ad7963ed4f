"""Downloads what users send: a document or a photo (its largest size) is
fetched with telegram.download and answered with its size and SHA-256, or
with the error response. `get <file_id>` downloads that id; `no request id`
tries a download without one."""

import hashlib


async def app(scope, receive, send):
    if scope["type"] != "telegram":
        return
    backlog = []

    async def response(request_id):
        while True:
            event = await receive()
            if event["type"] == "telegram.api.response" and event["request_id"] == request_id:
                return event
            backlog.append(event)

    async def reply(text):
        await send({"type": "telegram.send_message", "text": text})

    n = 0
    while True:
        event = backlog.pop(0) if backlog else await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] != "telegram.message":
            continue
        text = event.get("text", "")
        if "document" in event:
            file_id = event["document"]["file_id"]
        elif "photo" in event:
            file_id = event["photo"][-1]["file_id"]
        elif text.startswith("get "):
            file_id = text[4:]
        elif text == "no request id":
            try:
                await send({"type": "telegram.download", "file_id": "x"})
            except ValueError as exc:
                await reply("refused: %s" % exc)
            continue
        else:
            continue
        n += 1
        await send({"type": "telegram.download", "file_id": file_id, "request_id": n})
        got = await response(n)
        if got["ok"]:
            result = got["result"]
            content = result["content"]
            await reply("%s size=%d sha256=%s file_size=%s id=%s" % (
                type(content).__name__, len(content), hashlib.sha256(content).hexdigest(),
                result.get("file_size"), result["file_id"] == file_id))
        else:
            await reply("error %s %s" % (got["error_code"], got["description"]))
