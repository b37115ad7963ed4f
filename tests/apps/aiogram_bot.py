"""An aiogram 3 bot as its author would write it (a router, a command with
an inline keyboard, a callback query, an FSM form, an error caught as
aiogram's exception, a download, a startup hook), run on asgigramd with
asgigram.aiogram. With $DIE_MARKER set, the callback's handler kills the
worker after its calls were answered, once per marker file: the update is
then delivered again to the restarted worker, whose repeated calls are
answered from the first ones."""

import hashlib
import os
import signal
import sys

# The package under test is this repository's python/ folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

from aiogram import Bot, Dispatcher, F, Router  # noqa: E402
from aiogram.exceptions import TelegramBadRequest  # noqa: E402
from aiogram.filters import Command, CommandStart  # noqa: E402
from aiogram.fsm.context import FSMContext  # noqa: E402
from aiogram.fsm.state import State, StatesGroup  # noqa: E402
from aiogram.types import BotCommand, CallbackQuery, Message  # noqa: E402
from aiogram.utils.keyboard import InlineKeyboardBuilder  # noqa: E402

import asgigram.aiogram  # noqa: E402

router = Router()


class Form(StatesGroup):
    name = State()
    age = State()


@router.message(CommandStart())
async def start(message: Message) -> None:
    keyboard = InlineKeyboardBuilder()
    keyboard.button(text="Sign up", callback_data="form")
    await message.answer("Welcome", reply_markup=keyboard.as_markup())


@router.callback_query(F.data == "form")
async def form(query: CallbackQuery, state: FSMContext) -> None:
    await query.answer("Let's go")
    await state.set_state(Form.name)
    await query.message.answer("Your name?")
    marker = os.environ.get("DIE_MARKER")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


@router.message(Form.name)
async def name(message: Message, state: FSMContext) -> None:
    await state.update_data(name=message.text)
    await state.set_state(Form.age)
    await message.answer("Your age?")


@router.message(Form.age, F.text.isdigit())
async def age(message: Message, state: FSMContext) -> None:
    data = await state.get_data()
    await state.clear()
    await message.answer("Thanks %s, %s" % (data["name"], message.text))


@router.message(Form.age)
async def age_again(message: Message) -> None:
    await message.answer("Age is a number")


@router.message(Command("bad"))
async def bad(message: Message, bot: Bot) -> None:
    try:
        await bot.edit_message_text(chat_id=message.chat.id, message_id=987654, text="x")
    except TelegramBadRequest as exc:
        await message.answer("caught TelegramBadRequest: %s" % exc.message)


@router.message(F.document)
async def document(message: Message, bot: Bot) -> None:
    data = (await bot.download(message.document)).read()
    await message.answer("got %d bytes sha256=%s" % (len(data), hashlib.sha256(data).hexdigest()))


dispatcher = Dispatcher()
dispatcher.include_router(router)


@dispatcher.startup()
async def on_startup(bot: Bot) -> None:
    await bot.set_my_commands([BotCommand(command="start", description="Start")])


application = asgigram.aiogram.asgi(dispatcher)
