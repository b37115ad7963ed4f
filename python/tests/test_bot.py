"""The first-party API, driven through asgigram.testing."""

import asyncio
import re
import threading

import pytest

import asgigram
from asgigram import TelegramError
from asgigram.testing import LifespanCommunicator, TelegramCommunicator


def run(coro):
    return asyncio.run(coro)


def make_bot():
    bot = asgigram.Bot()

    @bot.command("start")
    async def start(chat, message):
        await chat.reply("Hi %s!" % (message.args or "there"),
                         reply_markup=asgigram.inline_keyboard([[("Go", "go")]]))

    @bot.callback("go")
    async def go(chat, query):
        await query.answer()
        await query.edit_text("Gone.")

    @bot.callback(prefix="page:")
    async def page(chat, query):
        await query.answer("page " + query.data[5:])

    @bot.command("name")
    async def name(chat, message):
        await chat.reply("Your name?")
        try:
            answer = await chat.next_message(timeout=0.2)
        except TimeoutError:
            await chat.reply("Too slow.")
            return
        await chat.reply("Hello, %s" % answer.text)

    @bot.message(re.compile(r"^\d+$"))
    async def number(chat, message):
        await chat.reply("a number")

    @bot.message(lambda m: m.document)
    async def document(chat, message):
        data = await chat.download(message.file_id)
        await chat.reply("%d bytes" % len(data))

    @bot.message()
    async def echo(chat, message):
        await chat.reply(message.text)

    @bot.on("edited_message")
    async def edited(chat, message):
        await chat.reply("edited: " + message.text)

    @bot.on("app.order_shipped")
    async def shipped(chat, event):
        await chat.reply("order %d shipped" % event.order)

    return bot


def test_command_reply_with_keyboard_and_deep_link():
    async def main():
        async with TelegramCommunicator(make_bot()) as chat:
            await chat.send_message("/start")
            call = await chat.receive_call()
            assert call.method == "sendMessage" and call.text == "Hi there!"
            assert call.params["reply_markup"] == {"inline_keyboard": [[{"text": "Go", "callback_data": "go"}]]}
            await chat.send_message("/start@test_bot ref42")
            assert await chat.receive_text() == "Hi ref42!"
            # Addressed to another bot in a group: not ours, so the catch-all echoes.
            await chat.send_message("/start@other_bot")
            assert await chat.receive_text() == "/start@other_bot"

    run(main())


def test_callback_answer_and_edit():
    async def main():
        async with TelegramCommunicator(make_bot()) as chat:
            await chat.send_callback("go")
            answer = await chat.receive_call()
            assert answer.method == "answerCallbackQuery" and answer.params["callback_query_id"].startswith("cq")
            edit = await chat.receive_call()
            assert edit.method == "editMessageText" and edit.text == "Gone."
            assert edit.params["chat_id"] == 1 and edit.params["message_id"] >= 1
            await chat.send_callback("page:3")
            assert (await chat.receive_call()).params["text"] == "page 3"

    run(main())


def test_conversation_with_next_message():
    async def main():
        async with TelegramCommunicator(make_bot()) as chat:
            first = await chat.send_message("/name")
            assert await chat.receive_text() == "Your name?"
            await chat.finished(first)  # asking for the next message finishes /name
            await chat.send_message("Ada")
            assert await chat.receive_text() == "Hello, Ada"
            # The message the conversation took went to no other handler.
            assert chat.calls_left() == []

    run(main())


def test_next_message_timeout():
    async def main():
        async with TelegramCommunicator(make_bot()) as chat:
            await chat.send_message("/name")
            assert await chat.receive_text() == "Your name?"
            assert await chat.receive_text(timeout=3) == "Too slow."

    run(main())


def test_other_updates_during_a_conversation_go_to_their_handlers():
    async def main():
        async with TelegramCommunicator(make_bot()) as chat:
            await chat.send_message("/name")
            await chat.receive_call()
            await chat.send_callback("go")
            assert (await chat.receive_call()).method == "answerCallbackQuery"
            assert (await chat.receive_call()).method == "editMessageText"
            await chat.send_message("Bob")
            assert await chat.receive_text() == "Hello, Bob"

    run(main())


def test_filters_download_other_kinds_and_pushed_events():
    async def main():
        async with TelegramCommunicator(make_bot(), files={"F1": b"12345"}) as chat:
            await chat.send_message("42")
            assert await chat.receive_text() == "a number"
            await chat.send_message(document={"file_id": "F1", "file_unique_id": "u"})
            download = await chat.receive_call()
            assert download.method == "download" and download.params == {"file_id": "F1"}
            assert await chat.receive_text() == "5 bytes"
            chat.send_update("edited_message", chat.message("fixed"))
            assert await chat.receive_text() == "edited: fixed"
            await chat.push("order_shipped", order=17)
            assert await chat.receive_text() == "order 17 shipped"
            chat.send_update("inline_query", {"id": "q", "from": chat.user, "query": ""})
            await chat.finished()
            assert chat.calls_left() == []

    run(main())


def test_each_update_finished_after_its_calls():
    async def main():
        async with TelegramCommunicator(make_bot(), auto_answer=False) as chat:
            uid = await chat.send_message("hello")
            call = await chat.receive_call()
            await asyncio.sleep(0.01)
            assert uid not in chat.finished_updates  # its call is not answered yet
            call.respond({"message_id": 5})
            await chat.finished(uid)

    run(main())


def test_telegram_error_reaches_the_handler_and_error_handler():
    bot = asgigram.Bot()
    seen = []

    @bot.message()
    async def fails(chat, message):
        try:
            await chat.reply("x")
        except TelegramError as exc:
            seen.append((exc.error_code, exc.retry_after))
        raise ValueError("boom")

    @bot.on_error
    async def on_error(chat, event, exc):
        seen.append(type(exc).__name__)
        await chat.reply("sorry")

    async def main():
        answers = {"sendMessage": lambda call: TelegramError(429, "Too Many Requests", 5, {"retry_after": 5})
                   if call.text == "x" else {"message_id": 1}}
        async with TelegramCommunicator(bot, answers=answers) as chat:
            await chat.send_message("hi")
            await chat.receive_call()
            assert await chat.receive_text() == "sorry"
            await chat.finished()
        assert seen == [(429, 5), "ValueError"]

    run(main())


def test_unhandled_error_is_logged_and_the_bot_goes_on(caplog):
    bot = asgigram.Bot()

    @bot.message()
    async def fails(chat, message):
        if message.text == "boom":
            raise ValueError("boom")
        await chat.reply("ok")

    async def main():
        async with TelegramCommunicator(bot) as chat:
            await chat.send_message("boom")
            await chat.send_message("again")
            assert await chat.receive_text() == "ok"

    run(main())
    assert "ValueError: boom" in caplog.text


def test_sync_handlers_run_in_a_thread():
    bot = asgigram.Bot()
    threads = []

    @bot.message()
    def echo(chat, message):
        threads.append(threading.current_thread())
        sent = chat.reply("sync " + message.text)
        chat.reply("id %d" % sent["message_id"])

    async def main():
        async with TelegramCommunicator(bot) as chat:
            await chat.send_message("hi")
            assert await chat.receive_text() == "sync hi"
            assert (await chat.receive_text()).startswith("id ")
        assert threads and threads[0] is not threading.main_thread()

    run(main())


def test_user_scope_replies_to_the_users_private_chat():
    bot = asgigram.Bot()

    @bot.on("inline_query")
    async def inline(chat, query):
        await chat.call("answerInlineQuery", inline_query_id=query.id, results=[])
        await chat.reply("thanks")

    async def main():
        async with TelegramCommunicator(bot, chat_id=None, user_id=9) as chat:
            chat.send_update("inline_query", {"id": "q1", "from": chat.user, "query": "x"})
            assert (await chat.receive_call()).params == {"inline_query_id": "q1", "results": []}
            reply = await chat.receive_call()
            assert reply.params["chat_id"] == 9

    run(main())


def test_lifespan_hooks_make_outside_chat_calls():
    bot = asgigram.Bot()
    log = []

    @bot.on_startup
    async def startup():
        await bot.call("setMyCommands", commands=[{"command": "start", "description": "Start"}])
        bot.state["ready"] = True
        log.append(bot.me.username)

    @bot.on_shutdown
    def shutdown():
        log.append("bye")

    async def main():
        async with LifespanCommunicator(bot) as life:
            call = await life.receive_call()
            assert call.method == "setMyCommands"
            assert life.state == {"ready": True}
            # A background task's call while the lifespan waits for shutdown.
            assert await bot.call("sendMessage", chat_id=5, text="news") == {
                "message_id": 1000, "date": 0, "chat": {"id": 5}, "text": "news"}
        assert log == ["test_bot", "bye"]

    run(main())


def test_failing_startup_reports_failed():
    bot = asgigram.Bot()

    @bot.on_startup
    async def startup():
        await bot.call("setMyCommands", commands=[])

    async def main():
        life = LifespanCommunicator(bot, answers={"setMyCommands": TelegramError(401, "Unauthorized")})
        with pytest.raises(RuntimeError, match="lifespan.startup.failed: TelegramError"):
            await life.startup()
        await life.close()

    run(main())


def test_disconnect_ends_a_waiting_conversation():
    async def main():
        chat = TelegramCommunicator(make_bot())
        await chat.start()
        await chat.send_message("/name")
        await chat.receive_call()
        await chat.disconnect("idle")

    run(main())


def test_keyboards():
    assert asgigram.reply_keyboard([["A", "B"], [asgigram.button("Phone", request_contact=True)]],
                                   one_time=True) == {
        "keyboard": [[{"text": "A"}, {"text": "B"}], [{"text": "Phone", "request_contact": True}]],
        "resize_keyboard": True, "one_time_keyboard": True}
    assert asgigram.remove_keyboard() == {"remove_keyboard": True}
    with pytest.raises(ValueError):
        asgigram.inline_keyboard([[("x", "y" * 65)]])


def test_message_helpers():
    m = asgigram.Message({"text": "/start@bot abc def", "from": {"id": 3}, "chat": {"id": 4}})
    assert (m.command, m.command_bot, m.args) == ("start", "bot", "abc def")
    assert m.from_user.id == 3 and m.chat.id == 4 and m.caption is None
    assert asgigram.Message({"photo": [{"file_id": "s"}, {"file_id": "L"}]}).file_id == "L"
