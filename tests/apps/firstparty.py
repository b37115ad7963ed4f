"""A bot written with the first-party API (asgigram.Bot): a command with an
inline keyboard, a callback that edits its message, a conversation with
next_message, a download, and an echo. Every update_id it receives is
appended to $RECORD_FILE (flushed at once), so a test can tell what was
delivered twice."""
import asyncio
import os

import asgigram

RECORD = os.environ.get("RECORD_FILE")
DELAY = float(os.environ.get("RECORD_DELAY", "0"))

bot = asgigram.Bot()


@bot.on_startup
async def startup():
    await bot.call("setMyCommands", commands=[{"command": "start", "description": "Start"}])


@bot.command("start")
async def start(chat, message):
    await chat.reply("Hi!", reply_markup=asgigram.inline_keyboard([[("Go", "go")]]))


@bot.callback("go")
async def go(chat, query):
    await query.answer()
    await query.edit_text("Gone.")


@bot.command("name")
async def name(chat, message):
    await chat.reply("Your name?")
    answer = await chat.next_message(timeout=60)
    await chat.reply("Hello, " + answer.text)


@bot.message(lambda message: message.document)
def document(chat, message):
    # A plain function: it runs in a thread, and chat's methods block there.
    data = chat.download(message.file_id)
    chat.reply("got %d bytes" % len(data))


@bot.message()
async def echo(chat, message):
    if DELAY:
        await asyncio.sleep(DELAY)
    await chat.reply(message.text)


async def application(scope, receive, send):
    async def recording_receive():
        event = await receive()
        if RECORD and "update_id" in event:
            with open(RECORD, "a") as f:
                f.write("%d\n" % event["update_id"])
        return event

    await bot(scope, recording_receive, send)
