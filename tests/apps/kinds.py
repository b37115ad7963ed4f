"""Reports every event it receives, with the scope it arrived in, as a message.

Chat scopes answer into their chat; user scopes answer into the user's private
chat (chat_id = user id), which telegram.send_message requires in a user scope.
"""


def describe(scope):
    if "chat" in scope:
        where = "chat:%s" % scope["chat"]["id"]
        if "business_connection_id" in scope:
            where = "business:%s:%s" % (scope["business_connection_id"], scope["chat"]["id"])
    else:
        where = "user:%s" % scope["user"]["id"]
    return where


async def app(scope, receive, send):
    where = describe(scope)
    target = scope["chat"]["id"] if "chat" in scope else scope["user"]["id"]
    while True:
        event = await receive()
        if event["type"] == "telegram.disconnect":
            return
        await send({
            "type": "telegram.send_message",
            "chat_id": target,
            "text": "%s %s update=%s" % (event["type"], where, event.get("update_id")),
        })
