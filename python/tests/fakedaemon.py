"""The daemon's side of one ASGI instance, for the adapters' tests: feeds
events, answers each call with ``answer(method, params)`` (a result, or an
exception of TelegramError's shape), and records the calls."""

import asyncio

from asgigram import TelegramError

BOT = {"id": 4242, "is_bot": True, "first_name": "Test", "username": "test_bot"}


def user(uid=7):
    return {"id": uid, "is_bot": False, "first_name": "User %d" % uid}


def chat(cid=7):
    return {"id": cid, "type": "private", "first_name": "User %d" % cid}


class FakeDaemon:
    def __init__(self, answer=None):
        self.answer = answer or self.default_answer
        self.calls = []
        self.message_ids = 100
        self.files = {}

    def default_answer(self, method, params):
        if method in ("sendMessage", "sendDocument", "editMessageText"):
            self.message_ids += 1
            return {"message_id": self.message_ids, "date": 1, "chat": chat(params.get("chat_id", 7)),
                    "text": params.get("text", "")}
        if method == "getFile":
            return {"file_id": params["file_id"], "file_unique_id": "u", "file_size": 3,
                    "file_path": "documents/file_%s.txt" % params["file_id"]}
        return True

    def texts(self):
        return [c[1].get("text") for c in self.calls if c[0] == "sendMessage"]

    def methods(self):
        return [c[0] for c in self.calls]

    async def run(self, app, scope, events, hold=None):
        """Runs ``app`` on ``scope``, giving it ``events`` one by one, each
        once the app asks for its next event (the daemon's view: the one
        before is finished), then ``telegram.disconnect`` (``lifespan.shutdown``
        once ``hold`` is set, for the lifespan scope). Returns when the app
        returned."""
        inbox = asyncio.Queue()
        pending = list(events)

        async def receive():
            if inbox.empty():
                if pending:
                    inbox.put_nowait(pending.pop(0))
                else:
                    if hold is not None:
                        await hold.wait()
                    inbox.put_nowait({"type": "lifespan.shutdown"} if scope["type"] == "lifespan"
                                     else {"type": "telegram.disconnect", "reason": "idle"})
            return await inbox.get()

        async def send(event):
            kind = event["type"]
            if kind in ("telegram.api", "telegram.download"):
                method = event.get("method", "download")
                params = event.get("params") or {"file_id": event.get("file_id")}
                self.calls.append((method, params))
                if "request_id" not in event:
                    return
                try:
                    if kind == "telegram.download":
                        result = {"file_id": event["file_id"], "file_path": "x", "content": self.files[event["file_id"]]}
                    else:
                        result = self.answer(method, params)
                except TelegramError as exc:
                    reply = {"type": "telegram.api.response", "request_id": event["request_id"], "ok": False,
                             "error_code": exc.error_code, "description": exc.description}
                    if exc.parameters:
                        reply["parameters"] = exc.parameters
                else:
                    reply = {"type": "telegram.api.response", "request_id": event["request_id"], "ok": True,
                             "result": result}
                inbox.put_nowait(reply)
            else:
                self.calls.append((kind, event))

        await asyncio.wait_for(app(scope, receive, send), 10)


def chat_scope(cid=7):
    return {"type": "telegram", "asgi": {"version": "3.0", "spec_version": "1.1"}, "chat": chat(cid),
            "bot": BOT, "extensions": {}}


def lifespan_scope():
    return {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "1.1"}, "state": {}, "bot": BOT}


_ids = [0]


def message(text, cid=7, **extra):
    _ids[0] += 1
    body = {"message_id": _ids[0], "date": 1, "chat": chat(cid), "from": user(cid), "text": text}
    if text.startswith("/"):
        body["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    body.update(extra)
    if "document" in extra:
        body.pop("text")
    return dict({"type": "telegram.message", "update_id": 1000 + _ids[0]}, **body)


def callback(data, cid=7):
    _ids[0] += 1
    return {"type": "telegram.callback_query", "update_id": 1000 + _ids[0], "id": "cq%d" % _ids[0],
            "from": user(cid), "chat_instance": "ci", "data": data,
            "message": {"message_id": 1, "date": 1, "chat": chat(cid), "text": "menu"}}
