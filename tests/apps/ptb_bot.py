"""A python-telegram-bot 22 bot as its author would write it (a
ConversationHandler, chat_data, an error caught as PTB's exception, an error
handler, a download, post_init), run on asgigramd with asgigram.ptb. With
$DIE_MARKER set, /start kills the worker after its reply was answered, once
per marker file: the update is then delivered again to the restarted
worker, whose repeated call is answered from the first one."""

import hashlib
import os
import signal
import sys

# The package under test is this repository's python/ folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

from telegram import Update  # noqa: E402
from telegram.error import BadRequest  # noqa: E402
from telegram.ext import (  # noqa: E402
    Application,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)

import asgigram.ptb  # noqa: E402

NAME, AGE = range(2)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.chat_data["starts"] = context.chat_data.get("starts", 0) + 1
    await update.message.reply_text("Hi! What's your name?")
    marker = os.environ.get("DIE_MARKER")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return NAME


async def name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["name"] = update.message.text
    await update.message.reply_text("How old are you?")
    return AGE


async def age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    await update.message.reply_text("Thanks %s, %s (starts: %d)" % (
        context.user_data["name"], update.message.text, context.chat_data["starts"]))
    return ConversationHandler.END


async def not_a_number(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    await update.message.reply_text("Age is a number")
    return AGE


async def cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    await update.message.reply_text("Cancelled")
    return ConversationHandler.END


async def bad(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    try:
        await context.bot.edit_message_text("x", chat_id=update.effective_chat.id, message_id=987654)
    except BadRequest as exc:
        await update.message.reply_text("caught BadRequest: %s" % exc.message)


async def boom(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    raise ValueError("boom")


async def document(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    file = await update.message.document.get_file()
    data = bytes(await file.download_as_bytearray())
    await update.message.reply_text("got %d bytes sha256=%s" % (len(data), hashlib.sha256(data).hexdigest()))


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    if isinstance(update, Update) and update.effective_chat:
        await context.bot.send_message(update.effective_chat.id, "error handler: %s" % context.error)


async def post_init(app: Application) -> None:
    await app.bot.set_my_commands([("start", "Start"), ("cancel", "Cancel")])


app = asgigram.ptb.builder().post_init(post_init).build()
app.add_handler(ConversationHandler(
    entry_points=[CommandHandler("start", start)],
    states={
        NAME: [MessageHandler(filters.TEXT & ~filters.COMMAND, name)],
        AGE: [MessageHandler(filters.Regex(r"^\d+$"), age),
              MessageHandler(filters.TEXT & ~filters.COMMAND, not_a_number)],
    },
    fallbacks=[CommandHandler("cancel", cancel)],
))
app.add_handler(CommandHandler("bad", bad))
app.add_handler(CommandHandler("boom", boom))
app.add_handler(MessageHandler(filters.Document.ALL, document))
app.add_error_handler(on_error)

application = asgigram.ptb.asgi(app)
