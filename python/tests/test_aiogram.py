"""asgigram.aiogram: an aiogram Dispatcher as an ASGI app, its calls as
telegram.api events, Telegram's errors as aiogram's exceptions."""

import asyncio

import pytest

pytest.importorskip("aiogram")

from aiogram import Bot, Dispatcher, F, Router  # noqa: E402
from aiogram.client.default import DefaultBotProperties  # noqa: E402
from aiogram.exceptions import TelegramBadRequest, TelegramNetworkError, TelegramRetryAfter  # noqa: E402
from aiogram.filters import Command  # noqa: E402
from aiogram.fsm.context import FSMContext  # noqa: E402
from aiogram.fsm.state import State, StatesGroup  # noqa: E402
from aiogram.types import BufferedInputFile, CallbackQuery, InputMediaPhoto, Message  # noqa: E402
from aiogram.utils.keyboard import InlineKeyboardBuilder  # noqa: E402

import asgigram.aiogram  # noqa: E402
from asgigram import TelegramError  # noqa: E402
from fakedaemon import BOT, FakeDaemon, callback, chat_scope, lifespan_scope, message  # noqa: E402


def run(coro):
    return asyncio.run(coro)


class Form(StatesGroup):
    name = State()
    age = State()


def form_dispatcher():
    dp = Dispatcher()
    router = Router()
    seen = {}

    @router.message(Command("start"))
    async def start(message: Message):
        kb = InlineKeyboardBuilder()
        kb.button(text="Sign up", callback_data="form")
        await message.answer("Welcome", reply_markup=kb.as_markup())

    @router.callback_query(F.data == "form")
    async def form(query: CallbackQuery, state: FSMContext):
        await query.answer()
        await state.set_state(Form.name)
        await query.message.answer("Your name?")

    @router.message(Form.name)
    async def name(message: Message, state: FSMContext):
        await state.update_data(name=message.text)
        await state.set_state(Form.age)
        await message.answer("Your age?")

    @router.message(Form.age)
    async def age(message: Message, state: FSMContext):
        data = await state.get_data()
        await state.clear()
        await message.answer("Thanks %s, %s" % (data["name"], message.text))

    @router.message(Command("bad"))
    async def bad(message: Message, bot: Bot):
        try:
            await bot.edit_message_text(chat_id=message.chat.id, message_id=999, text="x")
        except TelegramBadRequest as exc:
            await message.answer("caught %s: %s" % (type(exc).__name__, exc.message))

    @dp.startup()
    async def on_startup(bot: Bot):
        seen["startup"] = (await bot.me()).username
        await bot.set_my_commands([])

    @dp.shutdown()
    async def on_shutdown():
        seen["shutdown"] = True

    dp.include_router(router)
    return dp, seen


def answer_with_errors(daemon):
    def answer(method, params):
        if method == "editMessageText":
            raise TelegramError(400, "Bad Request: message not found")
        return FakeDaemon.default_answer(daemon, method, params)

    return answer


def test_a_form_across_instances_with_lifespan_hooks():
    async def main():
        dp, seen = form_dispatcher()
        app = asgigram.aiogram.asgi(dp)
        d = FakeDaemon()
        d.answer = answer_with_errors(d)
        await d.run(app, lifespan_scope(), [{"type": "lifespan.startup"}])
        assert seen["startup"] == "test_bot"  # from scope["bot"], no getMe
        assert d.methods()[:2] == ["setMyCommands", "lifespan.startup.complete"]
        await d.run(app, chat_scope(), [message("/start"), callback("form")])
        # The FSM state is in the process: the chat's next instance finds it.
        await d.run(app, chat_scope(), [message("Ann"), message("33"), message("/bad")])
        assert d.texts() == ["Welcome", "Your name?", "Your age?", "Thanks Ann, 33",
                             "caught TelegramBadRequest: Bad Request: message not found"]
        welcome = next(c[1] for c in d.calls if c[0] == "sendMessage")
        assert welcome["chat_id"] == 7
        assert welcome["reply_markup"] == {"inline_keyboard": [[{"text": "Sign up", "callback_data": "form"}]]}
        assert app.bot.id == BOT["id"] and "asgigramd" in app.bot.token
        assert "getMe" not in d.methods()

    run(main())


def test_answer_callback_query_params_are_plain_values():
    async def main():
        dp, _ = form_dispatcher()
        app = asgigram.aiogram.asgi(dp)
        d = FakeDaemon()
        event = callback("form")
        await d.run(app, chat_scope(), [event])
        assert ("answerCallbackQuery", {"callback_query_id": event["id"]}) in d.calls

    run(main())


def test_errors_become_aiogram_exceptions():
    async def main():
        bot = asgigram.aiogram.placeholder_bot(BOT)
        errors = {
            "a": TelegramError(400, "Bad Request: chat not found"),
            "b": TelegramError(429, "Too Many Requests: retry after 7", parameters={"retry_after": 7}),
            "c": TelegramError(0, "no answer from Telegram"),
        }

        def answer(method, params):
            raise errors[params["text"]]

        got = []

        async def app(scope, receive, send):
            async def handle(update):
                for text in "abc":
                    try:
                        await bot.send_message(7, text)
                    except Exception as exc:  # noqa: BLE001
                        got.append(exc)

            await asgigram._bridge.run_instance(scope, receive, send, handle)

        await FakeDaemon(answer).run(app, chat_scope(), [message("go")])
        assert [type(e) for e in got] == [TelegramBadRequest, TelegramRetryAfter, TelegramNetworkError]
        assert got[1].retry_after == 7

    run(main())


def test_uploads_and_defaults():
    async def main():
        bot = asgigram.aiogram.placeholder_bot(BOT, default=DefaultBotProperties(parse_mode="HTML"))

        async def app(scope, receive, send):
            async def handle(update):
                await bot.send_message(7, "<b>hi</b>")
                await bot.send_document(7, BufferedInputFile(b"abc", filename="a.txt"), caption="doc")
                await bot.send_media_group(7, [InputMediaPhoto(media=BufferedInputFile(b"img", filename="p.jpg"))])

            await asgigram._bridge.run_instance(scope, receive, send, handle)

        d = FakeDaemon(lambda m, p: [] if m == "sendMediaGroup" else FakeDaemon().default_answer(m, p))
        await d.run(app, chat_scope(), [message("go")])
        (m1, p1), (m2, p2), (m3, p3) = d.calls
        assert p1 == {"chat_id": 7, "text": "<b>hi</b>", "parse_mode": "HTML"}
        assert p2["document"] == {"filename": "a.txt", "content": b"abc"} and p2["caption"] == "doc"
        assert p3["media"][0]["media"] == {"filename": "p.jpg", "content": b"img"}
        assert p3["media"][0]["type"] == "photo"

    run(main())


def test_download_goes_through_telegram_download():
    async def main():
        dp = Dispatcher()

        @dp.message(F.document)
        async def doc(message: Message, bot: Bot):
            data = await bot.download(message.document)
            await message.answer("got %r" % data.read())

        app = asgigram.aiogram.asgi(dp)
        d = FakeDaemon()
        d.files["F1"] = b"xyz"
        event = message("", document={"file_id": "F1", "file_unique_id": "u1", "file_name": "a.txt"})
        await d.run(app, chat_scope(), [event])
        assert d.methods() == ["getFile", "download", "sendMessage"]
        assert d.texts() == ["got b'xyz'"]

    run(main())


def test_a_given_bot_keeps_its_defaults_and_speaks_only_to_the_daemon():
    bot = Bot("123:real-token-never-used", default=DefaultBotProperties(parse_mode="HTML"))
    app = asgigram.aiogram.asgi(Dispatcher(), bot=bot)
    assert isinstance(app.bot.session, asgigram.aiogram.AsgigramSession)
    assert app.bot.default.parse_mode == "HTML"


def test_a_handler_that_raises_is_logged_and_the_next_update_handled(caplog):
    async def main():
        dp = Dispatcher()

        @dp.message(F.text == "boom")
        async def boom(message: Message):
            raise ValueError("boom")

        @dp.message()
        async def echo(message: Message):
            await message.answer(message.text)

        d = FakeDaemon()
        await d.run(asgigram.aiogram.asgi(dp), chat_scope(), [message("boom"), message("after")])
        assert d.texts() == ["after"]

    run(main())
    assert "the handler raised" in caplog.text


def test_calls_outside_any_scope_say_why():
    async def main():
        bot = asgigram.aiogram.placeholder_bot(BOT)
        with pytest.raises(RuntimeError, match="outside any asgigramd scope"):
            await bot.send_message(7, "x")

    run(main())


def test_get_updates_is_refused_as_a_conflict():
    async def main():
        from aiogram.exceptions import TelegramConflictError

        bot = asgigram.aiogram.placeholder_bot(BOT)
        with pytest.raises(TelegramConflictError, match="asgigramd delivers the updates"):
            await bot.get_updates()

    run(main())
