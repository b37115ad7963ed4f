"""Lifespan startup fails: the daemon must stop with this message."""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable at startup"})
        return
