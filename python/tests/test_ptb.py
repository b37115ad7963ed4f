"""asgigram.ptb: a PTB Application as an ASGI app, its requests as
telegram.api events, Telegram's errors as PTB's exceptions."""

import asyncio

import pytest

pytest.importorskip("telegram.ext")

from telegram import InputMediaPhoto, Update  # noqa: E402
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter  # noqa: E402
from telegram.ext import (  # noqa: E402
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)

import asgigram.ptb  # noqa: E402
from asgigram import TelegramError  # noqa: E402
from fakedaemon import BOT, FakeDaemon, chat_scope, lifespan_scope, message  # noqa: E402


def run(coro):
    return asyncio.run(coro)


NAME, AGE = range(2)


def conversation_app(seen):
    async def post_init(app):
        seen["post_init"] = app.bot.username
        await app.bot.set_my_commands([("start", "Start")])

    async def post_shutdown(app):
        seen["post_shutdown"] = True

    app = asgigram.ptb.builder().post_init(post_init).post_shutdown(post_shutdown).build()

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE):
        context.chat_data["starts"] = context.chat_data.get("starts", 0) + 1
        await update.message.reply_text("Your name?")
        return NAME

    async def name(update, context):
        context.user_data["name"] = update.message.text
        await update.message.reply_text("Your age?")
        return AGE

    async def age(update, context):
        await update.message.reply_text(
            "Thanks %s, %s (starts: %d)" % (context.user_data["name"], update.message.text, context.chat_data["starts"])
        )
        return ConversationHandler.END

    async def cancel(update, context):
        await update.message.reply_text("Cancelled")
        return ConversationHandler.END

    async def bad(update, context):
        try:
            await context.bot.edit_message_text("x", chat_id=update.effective_chat.id, message_id=999)
        except BadRequest as exc:
            await update.message.reply_text("caught BadRequest: %s" % exc.message)

    async def on_error(update, context):
        await context.bot.send_message(update.effective_chat.id, "error: %s" % context.error)

    async def boom(update, context):
        raise ValueError("boom")

    app.add_handler(ConversationHandler(
        entry_points=[CommandHandler("start", start)],
        states={NAME: [MessageHandler(filters.TEXT & ~filters.COMMAND, name)],
                AGE: [MessageHandler(filters.TEXT & ~filters.COMMAND, age)]},
        fallbacks=[CommandHandler("cancel", cancel)],
    ))
    app.add_handler(CommandHandler("bad", bad))
    app.add_handler(CommandHandler("boom", boom))
    app.add_error_handler(on_error)
    return app


def answer_with_errors(daemon):
    def answer(method, params):
        if method == "editMessageText":
            raise TelegramError(400, "Bad Request: message not found")
        return FakeDaemon.default_answer(daemon, method, params)

    return answer


def test_a_conversation_across_instances_with_lifespan_hooks():
    async def main():
        seen = {}
        app = asgigram.ptb.asgi(conversation_app(seen))
        d = FakeDaemon()
        d.answer = answer_with_errors(d)
        stop = asyncio.Event()
        lifespan = asyncio.ensure_future(d.run(app, lifespan_scope(), [{"type": "lifespan.startup"}], hold=stop))
        while "lifespan.startup.complete" not in d.methods():
            await asyncio.sleep(0.01)
        assert seen["post_init"] == "test_bot"  # getMe answered from scope["bot"]
        assert d.methods() == ["setMyCommands", "lifespan.startup.complete"]
        await d.run(app, chat_scope(), [message("/start"), message("Ann")])
        # Conversation state and chat_data are in the process: the chat's next instance finds them.
        await d.run(app, chat_scope(), [message("33"), message("/bad"), message("/boom")])
        assert d.texts() == ["Your name?", "Your age?", "Thanks Ann, 33 (starts: 1)",
                             "caught BadRequest: Message not found", "error: boom"]
        reply = next(c[1] for c in d.calls if c[0] == "sendMessage")
        assert reply["chat_id"] == 7 and reply["text"] == "Your name?"
        assert "post_shutdown" not in seen
        stop.set()
        await lifespan
        assert seen["post_shutdown"]
        assert d.methods()[-1] == "lifespan.shutdown.complete"

    run(main())


def test_errors_become_ptb_exceptions():
    async def main():
        app = asgigram.ptb.builder().build()
        errors = {
            "a": TelegramError(400, "Bad Request: chat not found"),
            "b": TelegramError(429, "Too Many Requests: retry after 7", parameters={"retry_after": 7}),
            "c": TelegramError(403, "Forbidden: bot was blocked by the user"),
            "d": TelegramError(0, "no answer from Telegram"),
        }

        def answer(method, params):
            raise errors[params["text"]]

        got = []

        async def asgi_app(scope, receive, send):
            async def handle(update):
                for text in "abcd":
                    try:
                        await app.bot.send_message(7, text)
                    except Exception as exc:  # noqa: BLE001
                        got.append(exc)

            await asgigram._bridge.run_instance(scope, receive, send, handle)

        await FakeDaemon(answer).run(asgi_app, chat_scope(), [message("go")])
        assert [type(e) for e in got] == [BadRequest, RetryAfter, Forbidden, NetworkError]
        assert "Retry in 7 seconds" in str(got[1])

    run(main())


def test_uploads_downloads_and_media():
    async def main():
        app = asgigram.ptb.builder().build()
        got = {}

        async def doc(update, context):
            file = await update.message.document.get_file()
            got["data"] = bytes(await file.download_as_bytearray())
            await context.bot.send_document(7, b"abc", filename="a.txt", caption="doc")
            await context.bot.send_media_group(7, [InputMediaPhoto(b"img", filename="p.jpg")])

        app.add_handler(MessageHandler(filters.Document.ALL, doc))
        d = FakeDaemon(lambda m, p: [] if m == "sendMediaGroup" else FakeDaemon().default_answer(m, p))
        d.files["F1"] = b"xyz"
        event = message("", document={"file_id": "F1", "file_unique_id": "u1", "file_name": "a.txt"})
        await d.run(asgigram.ptb.asgi(app), chat_scope(), [event])
        assert got["data"] == b"xyz"
        (m1, p1), (m2, p2), (m3, p3), (m4, p4) = d.calls
        assert (m1, m2) == ("getFile", "download") and p2 == {"file_id": "F1"}
        assert m3 == "sendDocument" and p3["document"] == {"filename": "a.txt", "content": b"abc"}
        assert p3["caption"] == "doc" and p3["chat_id"] == 7
        assert m4 == "sendMediaGroup" and p4["media"][0]["media"] == {"filename": "p.jpg", "content": b"img"}

    run(main())


def test_builder_has_no_token_and_no_updater():
    app = asgigram.ptb.builder().build()
    assert app.updater is None
    assert "asgigramd" in app.bot.token and BOT["username"] not in app.bot.token
    assert isinstance(app.bot.request, asgigram.ptb.AsgigramRequest)


def test_an_application_with_an_updater_is_refused():
    from telegram.ext import ApplicationBuilder

    with pytest.raises(ValueError, match="builder"):
        asgigram.ptb.asgi(ApplicationBuilder().token("1:x").build())


def test_get_updates_is_refused_as_a_conflict():
    from telegram.error import Conflict

    async def main():
        app = asgigram.ptb.builder().build()
        with pytest.raises(Conflict, match="asgigramd delivers the updates"):
            await app.bot.get_updates()

    run(main())
