"""Session: calls matched to their responses, events kept in order, and
receive() read only while a response is owed or an event is asked for."""

import asyncio

import pytest

from asgigram import Disconnected, InputFile, Session, TelegramError


class Peer:
    """The daemon's side of receive/send, driven by hand: counts how often
    the app asked for something, which is what the daemon sees."""

    def __init__(self):
        self.inbox = asyncio.Queue()
        self.sent = []
        self.receives = 0
        self.sent_event = asyncio.Event()

    async def receive(self):
        self.receives += 1
        return await self.inbox.get()

    async def send(self, event):
        self.sent.append(event)
        self.sent_event.set()

    async def next_sent(self):
        while not self.sent:
            self.sent_event.clear()
            await self.sent_event.wait()
        return self.sent.pop(0)

    def answer(self, call, result=None, **error):
        if error:
            event = dict({"type": "telegram.api.response", "request_id": call["request_id"], "ok": False}, **error)
        else:
            event = {"type": "telegram.api.response", "request_id": call["request_id"], "ok": True, "result": result}
        self.inbox.put_nowait(event)


def run(coro):
    return asyncio.run(coro)


def session(peer, scope=None):
    return Session(scope or {"type": "telegram", "chat": {"id": 1}}, peer.receive, peer.send)


def test_call_returns_result_and_sends_telegram_api():
    async def main():
        peer = Peer()
        s = session(peer)
        task = asyncio.ensure_future(s.call("sendMessage", {"text": "hi", "parse_mode": None}))
        call = await peer.next_sent()
        assert call["type"] == "telegram.api" and call["method"] == "sendMessage"
        assert call["params"] == {"text": "hi"}  # None means "not given"
        peer.answer(call, {"message_id": 5})
        assert await task == {"message_id": 5}

    run(main())


def test_error_response_raises_telegram_error():
    async def main():
        peer = Peer()
        s = session(peer)
        task = asyncio.ensure_future(s.call("sendMessage", {"text": "x"}))
        call = await peer.next_sent()
        peer.answer(call, error_code=429, description="Too Many Requests: retry after 3",
                    parameters={"retry_after": 3})
        with pytest.raises(TelegramError) as info:
            await task
        assert info.value.error_code == 429
        assert info.value.retry_after == 3
        assert "Too Many Requests" in info.value.description
        assert info.value.parameters == {"retry_after": 3}

    run(main())


def test_concurrent_calls_get_their_own_responses_in_any_order():
    async def main():
        peer = Peer()
        s = session(peer)
        tasks = [asyncio.ensure_future(s.call("m%d" % i)) for i in range(3)]
        calls = [await peer.next_sent() for _ in range(3)]
        assert len({c["request_id"] for c in calls}) == 3
        for call in reversed(calls):
            peer.answer(call, call["method"])
        assert await asyncio.gather(*tasks) == ["m0", "m1", "m2"]
        # Three responses need three reads, and not one more: no read-ahead.
        assert peer.receives == 3

    run(main())


def test_updates_read_while_waiting_are_kept_for_next_event():
    async def main():
        peer = Peer()
        s = session(peer)
        task = asyncio.ensure_future(s.call("sendMessage", {"text": "x"}))
        call = await peer.next_sent()
        peer.inbox.put_nowait({"type": "telegram.message", "update_id": 2, "text": "later"})
        peer.answer(call, {"message_id": 1})
        assert await task == {"message_id": 1}
        assert s.pending_events() == 1
        event = await s.next_event()
        assert event["text"] == "later"

    run(main())


def test_no_read_ahead_after_the_last_response():
    async def main():
        peer = Peer()
        s = session(peer)
        peer.inbox.put_nowait({"type": "telegram.message", "update_id": 1, "text": "a"})
        await s.next_event()
        assert peer.receives == 1
        task = asyncio.ensure_future(s.call("sendMessage", {"text": "x"}))
        call = await peer.next_sent()
        peer.answer(call, {})
        peer.inbox.put_nowait({"type": "telegram.message", "update_id": 2, "text": "b"})
        await task
        for _ in range(5):
            await asyncio.sleep(0)
        # The update behind the response is not asked for until the app asks.
        assert peer.receives == 2
        assert peer.inbox.qsize() == 1

    run(main())


def test_call_waiting_while_next_event_reads_gets_its_response():
    """A background call while the main loop waits in next_event (the
    lifespan's shape): the reader hands the response over and reads on."""

    async def main():
        peer = Peer()
        s = session(peer, {"type": "lifespan"})
        main_loop = asyncio.ensure_future(s.next_event())
        await asyncio.sleep(0)
        task = asyncio.ensure_future(s.call("sendMessage", {"chat_id": 1, "text": "x"}))
        call = await peer.next_sent()
        peer.answer(call, "done")
        assert await task == "done"
        assert not main_loop.done()
        peer.inbox.put_nowait({"type": "lifespan.shutdown"})
        assert (await main_loop)["type"] == "lifespan.shutdown"

    run(main())


def test_cancelled_reader_hands_reading_over():
    async def main():
        peer = Peer()
        s = session(peer)
        waiter = asyncio.ensure_future(s.next_event())
        await asyncio.sleep(0)
        task = asyncio.ensure_future(s.call("getMe"))
        call = await peer.next_sent()
        waiter.cancel()
        await asyncio.sleep(0)
        peer.answer(call, {"id": 1})
        assert await asyncio.wait_for(task, 5) == {"id": 1}

    run(main())


def test_next_event_timeout_loses_nothing():
    async def main():
        peer = Peer()
        s = session(peer)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.next_event(), 0.01)
        peer.inbox.put_nowait({"type": "telegram.message", "update_id": 1})
        assert (await s.next_event())["update_id"] == 1

    run(main())


def test_disconnect_fails_pending_calls_and_repeats():
    async def main():
        peer = Peer()
        s = session(peer)
        task = asyncio.ensure_future(s.call("getMe"))
        await peer.next_sent()
        peer.inbox.put_nowait({"type": "telegram.disconnect", "reason": "shutdown"})
        with pytest.raises(Disconnected):
            await task
        assert (await s.next_event())["type"] == "telegram.disconnect"
        assert (await s.next_event())["type"] == "telegram.disconnect"
        with pytest.raises(Disconnected):
            await s.call("getMe")

    run(main())


def test_download_returns_content():
    async def main():
        peer = Peer()
        s = session(peer)
        task = asyncio.ensure_future(s.download("F1"))
        call = await peer.next_sent()
        assert call["type"] == "telegram.download" and call["file_id"] == "F1"
        peer.answer(call, {"file_id": "F1", "content": b"abc"})
        assert await task == b"abc"

    run(main())


def test_files_in_params():
    async def main():
        peer = Peer()
        s = session(peer)
        task = asyncio.ensure_future(s.call("sendMediaGroup", {
            "media": [{"type": "photo", "media": InputFile("a.jpg", b"A")},
                      {"type": "photo", "media": bytearray(b"B")}],
            "document": InputFile("r.txt", b"R"),
        }))
        call = await peer.next_sent()
        assert call["params"]["media"][0]["media"] == {"filename": "a.jpg", "content": b"A"}
        assert call["params"]["media"][1]["media"] == b"B"
        assert call["params"]["document"] == {"filename": "r.txt", "content": b"R"}
        peer.answer(call, [])
        await task

    run(main())


def test_foreign_responses_are_events():
    async def main():
        peer = Peer()
        s = session(peer)
        peer.inbox.put_nowait({"type": "telegram.api.response", "request_id": 7, "ok": True, "result": 1})
        assert (await s.next_event())["request_id"] == 7

    run(main())
