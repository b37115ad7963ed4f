"""Forks a child that sleeps, as an app starting a helper process might.

The child's pid goes to the file named by FORKER_PID_FILE, so a test can see
whether the child outlives the worker (or the daemon).
"""
import os
import time


async def app(scope, receive, send):
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        if event["type"] != "telegram.message":
            continue
        pid = os.fork()
        if pid == 0:
            # The child never returns into the worker's event loop.
            try:
                time.sleep(600)
            finally:
                os._exit(0)
        path = os.environ["FORKER_PID_FILE"]
        with open(path + ".tmp", "w") as f:
            f.write(str(pid))
        # Renamed into place: the test never reads a half-written pid.
        os.replace(path + ".tmp", path)
        await send({"type": "telegram.send_message", "text": f"forked {pid}"})
