"""ASGI 3 echo that first spends 1 ms of CPU on each text: an app with work
of its own, for `cargo bench --bench throughput -- overhead`.

`work()` is also what the benchmark's bare loop (benches/bare_loop.py) calls,
so both do the same work per update."""

import time

WORK_SECONDS = 0.001


def work(text):
    """Spins until this thread has used WORK_SECONDS of CPU; returns `text`.
    CPU time rather than wall time, so that a busy machine does not shorten
    the work by preempting it."""
    end = time.thread_time() + WORK_SECONDS
    while time.thread_time() < end:
        pass
    return text


async def app(scope, receive, send):
    assert scope["type"] == "telegram", scope
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] == "telegram.message" and "text" in event:
            await send({"type": "telegram.send_message", "text": work(event["text"])})
