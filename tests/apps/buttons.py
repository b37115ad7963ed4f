"""A bot with buttons, for the terminal chat: `/start` sends an inline
keyboard whose callbacks are answered and edit the message; `colours` sends a
reply keyboard; `cat` sends a photo; `temp` sends a message and deletes it; a
photo or document sent to it is downloaded and its size reported; any other
text is answered with where it came from and who sent it."""


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

    async def api(method, request_id=None, **params):
        event = {"type": "telegram.api", "method": method, "params": params}
        if request_id is None:
            await send(event)
            return None
        event["request_id"] = request_id
        await send(event)
        return await response(request_id)

    async def reply(text, **params):
        await send({"type": "telegram.send_message", "text": text, **params})

    n = 0
    while True:
        event = backlog.pop(0) if backlog else await receive()
        kind = event["type"]
        if kind == "telegram.disconnect":
            return
        if kind == "telegram.callback_query":
            choice = event["data"]
            message = event["message"]
            await api("answerCallbackQuery", callback_query_id=event["id"],
                      text="You chose %s" % choice)
            await api("editMessageText", chat_id=message["chat"]["id"],
                      message_id=message["message_id"],
                      text="Chose %s (by %s)" % (choice, event["from"]["first_name"]))
            continue
        if kind != "telegram.message":
            continue
        text = event.get("text", "")
        who = "%s %s" % (event["chat"]["type"], event["from"]["first_name"])
        media = event.get("document") or (event.get("photo") or [None])[-1]
        if media is not None:
            n += 1
            await send({"type": "telegram.download", "file_id": media["file_id"], "request_id": n})
            content = (await response(n))["result"]["content"]
            what = "document %s" % media["file_name"] if "document" in event else "photo"
            await reply("%s: got %s of %d bytes, caption %s" % (
                who, what, len(content), event.get("caption")))
        elif text == "/start":
            await reply("Pick one", reply_markup={"inline_keyboard": [
                [{"text": "Yes", "callback_data": "yes"}, {"text": "No", "callback_data": "no"}],
                [{"text": "Docs", "url": "https://example.org/docs"}]]})
        elif text == "colours":
            await reply("Which colour?", reply_markup={
                "keyboard": [[{"text": "Red"}, {"text": "Blue"}]], "one_time_keyboard": True})
        elif text in ("Red", "Blue"):
            await reply("%s: %s it is" % (who, text), reply_markup={"remove_keyboard": True})
        elif text == "cat":
            await api("sendPhoto", "p", photo={"filename": "cat.png", "content": b"\x89PNG" + b"\0" * 96},
                      caption="a cat")
        elif text == "temp":
            sent = await api("sendMessage", "t", text="short-lived")
            await api("deleteMessage", message_id=sent["result"]["message_id"])
        else:
            await reply("%s: %s" % (who, text))
