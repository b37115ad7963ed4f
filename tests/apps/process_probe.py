"""Answers a text with what the worker process looks like from inside: where
its stdin leads and what stdin reads, the module it runs in, and how much
memory the process holds, so a test can check how the bridge was started."""
import os
import sys


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] != "telegram.message":
            continue
        with open("/proc/self/status") as f:
            rss = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
        main = sys.modules["__main__"]
        # python -u -c COMMAND ...: the bridge's source, or a loader of its bytecode.
        with open("/proc/self/cmdline", "rb") as f:
            command = f.read().split(b"\0")[3]
        await send({
            "type": "telegram.send_message",
            "text": "stdin=%s read=%r main=%s bridge=%s command_bytes=%d rss_kib=%s" % (
                os.readlink("/proc/self/fd/0"),
                sys.stdin.read(),
                main.__name__,
                hasattr(main, "Channel"),
                len(command),
                rss,
            ),
        })
