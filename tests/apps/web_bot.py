"""A bot to try the web chat with, and the one its browser test talks to
(tests/web_chat.rs): /start sends an inline keyboard whose presses are
answered and edit the message; /demo shows formatting (HTML and
MarkdownV2), a reply keyboard and a photo; a photo or document sent to it
is downloaded and its size and caption told; any other text is answered in
bold, HTML-escaped, so markup typed by the user stays text."""
import html
import pathlib

import asgigram

bot = asgigram.Bot()

# A 48x32 PNG (a sun over a field), so the page shows a real image.
PICTURE = (pathlib.Path(__file__).parent / "sun.png").read_bytes()


@bot.on_startup
async def startup():
    await bot.call("setMyCommands", commands=[
        {"command": "start", "description": "Buttons that edit their message"},
        {"command": "demo", "description": "Formatting, a keyboard and a photo"},
    ])


@bot.command("start")
async def start(chat, message):
    await chat.reply("Pick one", reply_markup=asgigram.inline_keyboard([
        [("Yes", "yes"), ("No", "no")],
        [("Alert me", "alert"), asgigram.button("Docs", url="https://core.telegram.org/bots")],
    ]))


@bot.callback("alert")
async def alert(chat, query):
    await query.answer("This is an alert: it needs an OK.", show_alert=True)


@bot.callback()
async def chose(chat, query):
    await query.answer("You chose %s" % query.data)
    await query.edit_text("Chose <b>%s</b> (by %s)" % (query.data, html.escape(query["from"]["first_name"])),
                          parse_mode="HTML")


@bot.command("demo")
async def demo(chat, message):
    await chat.call("sendChatAction", action="typing")
    await chat.reply(
        "<b>Bold</b>, <i>italic</i>, <u>underline</u>, <s>struck</s>, "
        "<tg-spoiler>a spoiler</tg-spoiler>, <code>code</code> and "
        "<a href=\"https://core.telegram.org/bots/api#formatting-options\">a link</a>.\n"
        "<pre><code class=\"language-python\">print(\"hello\")</code></pre>"
        "<blockquote>A quote, and /start to try the buttons.</blockquote>",
        parse_mode="HTML")
    await chat.reply("*MarkdownV2* _too_, with __nesting *inside*__ and escapes: 1\\+1\\=2\\!",
                     parse_mode="MarkdownV2")
    await chat.call("sendPhoto", photo={"filename": "sun.png", "content": PICTURE},
                    caption="A <b>photo</b> from the bot", parse_mode="HTML")
    await chat.reply("Which colour?", reply_markup=asgigram.reply_keyboard(
        [["Red", "Green", "Blue"]], one_time=True, placeholder="Pick a colour"))


@bot.message(lambda message: message.text in ("Red", "Green", "Blue"))
async def colour(chat, message):
    await chat.reply("%s it is." % message.text, reply_markup=asgigram.remove_keyboard())


@bot.message(lambda message: message.file_id is not None)
async def received_file(chat, message):
    data = await chat.download(message.file_id)
    what = "document %s" % message.document["file_name"] if message.document else "photo"
    await chat.reply("Got your %s: %d bytes, caption %s" % (what, len(data), message.caption))


@bot.message()
async def echo(chat, message):
    await chat.reply("<b>%s</b> said: %s" % (html.escape(message["from"]["first_name"]),
                                             html.escape(message.text or "")),
                     parse_mode="HTML")


application = bot
