"""asgigram.client against a stand-in for the daemon's /v1 routes."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asgigram import TelegramError
from asgigram.client import AsyncClient, Client, ClientError, OutcomeUnknown

TOKEN = "s3cret"


class Handler(BaseHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.requests.append((self.path, body))
        if self.headers.get("Authorization") != "Bearer " + TOKEN:
            return self.answer(401, None)
        if self.path.startswith("/v1/chats/"):
            if not body["type"].startswith("app."):
                return self.answer(400, {"ok": False, "error": "type must start with app."})
            return self.answer(202, {"ok": True, "update_id": -3})
        params = body.get("params", {})
        if params.get("text") == "slow":
            return self.answer(504, {"ok": False, "error": "the call's outcome is unknown"})
        if params.get("text") == "busy":
            return self.answer(503, {"ok": False, "error": "starting"}, {"Retry-After": "1"})
        if params.get("chat_id") == 0:
            return self.answer(200, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"})
        return self.answer(200, {"ok": True, "result": {"message_id": 9, "text": params.get("text")}})

    def answer(self, status, body, headers=()):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.requests = []
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()


def test_push_and_call(url):
    client = Client(url, token=TOKEN)
    assert client.push(123, "order_shipped", order=17) == -3
    assert Handler.requests[-1] == ("/v1/chats/123/events", {"type": "app.order_shipped", "order": 17})
    assert client.call("sendMessage", chat_id=5, text="hi") == {"message_id": 9, "text": "hi"}
    assert Handler.requests[-1] == ("/v1/calls", {"method": "sendMessage", "params": {"chat_id": 5, "text": "hi"}})
    assert TOKEN not in repr(client)


def test_errors(url):
    client = Client(url, token=TOKEN)
    with pytest.raises(TelegramError) as info:
        client.call("sendMessage", chat_id=0, text="x")
    assert info.value.error_code == 400
    with pytest.raises(OutcomeUnknown):
        client.call("sendMessage", chat_id=1, text="slow")
    with pytest.raises(ClientError) as busy:
        client.call("sendMessage", chat_id=1, text="busy")
    assert busy.value.status == 503 and busy.value.retry_after == 1.0
    with pytest.raises(ClientError) as denied:
        Client(url, token="wrong").push(1, "app.x")
    assert denied.value.status == 401
    with pytest.raises(ClientError) as unreachable:
        Client("http://127.0.0.1:9", token=TOKEN, timeout=2).push(1, "app.x")
    assert unreachable.value.status == 0


def test_async_client(url):
    async def main():
        client = AsyncClient(url, token=TOKEN)
        assert await client.push(7, "app.ping") == -3
        assert (await client.call("sendMessage", chat_id=7, text="a"))["text"] == "a"

    asyncio.run(main())


def test_token_from_environment(url, monkeypatch):
    monkeypatch.setenv("ASGIGRAM_API_TOKEN", TOKEN)
    assert Client(url).push(1, "app.x") == -3
