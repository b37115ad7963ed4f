"""The least a Python bot can be: one process, one asyncio loop, raw HTTP/1.1.

    python3 benches/bare_loop.py API_URL TOKEN [--work]

Long-polls getUpdates (100 at a time) and answers each text with a
sendMessage of the same text, over keep-alive connections: one for polling
and LANES for sending, a chat always on the same lane so that its replies go
in order. With --work each text first goes through tests/apps/cpu_work.py's
work() (1 ms of CPU), as the app under asgigramd does. No journal, no
validation, no retries: the yardstick `cargo bench --bench throughput --
overhead` measures asgigramd against. Runs until killed.
"""

import asyncio
import json
import os
import sys
from urllib.parse import urlsplit

LANES = 16


class Connection:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path, body):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), self.host.encode(), len(body)) + body
        )
        length, chunked = 0, False
        status = await self.reader.readline()
        if not status:
            raise ConnectionError("the server closed the connection")
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            return await self.reader.readexactly(length)
        out = b""
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            out += chunk[:size]
            if size == 0:
                return out


async def main():
    api_url, token = sys.argv[1], sys.argv[2]
    reply = lambda text: text
    if "--work" in sys.argv[3:]:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "apps"))
        from cpu_work import work as reply
    url = urlsplit(api_url)
    host, port = url.hostname, url.port or 80
    base = "%s/bot%s/" % (url.path.rstrip("/"), token)
    lanes = [asyncio.Queue() for _ in range(LANES)]

    async def sender(queue):
        connection = Connection(host, port)
        while True:
            body = await queue.get()
            await connection.post(base + "sendMessage", body)

    senders = [asyncio.ensure_future(sender(q)) for q in lanes]
    poll = Connection(host, port)
    offset = 0
    while True:
        body = json.dumps({"offset": offset, "timeout": 5, "limit": 100}).encode()
        answer = json.loads(await poll.post(base + "getUpdates", body))
        for update in answer.get("result", ()):
            offset = max(offset, update["update_id"] + 1)
            message = update.get("message") or {}
            if "text" not in message:
                continue
            chat = message["chat"]["id"]
            out = json.dumps({"chat_id": chat, "text": reply(message["text"])}).encode()
            lanes[chat % LANES].put_nowait(out)


if __name__ == "__main__":
    asyncio.run(main())
