//! What a line typed in the terminal chat means: a message to the bot, or
//! one of the chat's own commands.
//!
//! A Telegram user types `/start` to a bot, so slash commands go to the bot
//! except for the chat's own short list ([`HELP`]); `/help` is both, so the
//! bot's help still answers. A line starting with `//` sends the rest with
//! one `/` (`//photo` reaches the bot as `/photo`), and `!N` presses button N
//! of the keyboard shown last (`!!` sends a literal `!`).

use std::path::PathBuf;

/// The chat's commands, as `/help` prints them.
pub const HELP: &str = "\
Sandbox chat commands (anything else is a message to the bot):
  !N                     press button N of the keyboard shown last
  /photo PATH [TEXT]     send the file at PATH as a photo, TEXT its caption
  /document PATH [TEXT]  send the file at PATH as a document
  /group                 go to the group (both users and the bot are in it)
  /private               go back to your private chat with the bot
  /user [NAME]           become the other user (or NAME: alice, bob)
  /help                  this list; the bot gets /help too
  //TEXT                 send /TEXT to the bot (//photo sends /photo)
  !!TEXT                 send !TEXT to the bot";

/// One line of input, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A text message to the bot.
    Send(String),
    /// Print [`HELP`], then send `/help` to the bot.
    Help,
    /// Press button N (1-based) of the keyboard shown last.
    Press(usize),
    /// Send a file: a photo, or with `document` a document named after it.
    File {
        path: PathBuf,
        caption: Option<String>,
        document: bool,
    },
    Group,
    Private,
    /// Become the user named, or with None the other one.
    User(Option<String>),
    /// A command of the chat used wrongly: print this.
    Usage(&'static str),
    /// An empty line.
    Nothing,
}

/// Reads one line of input.
pub fn parse(line: &str) -> Command {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Command::Nothing;
    }
    if let Some(rest) = line.strip_prefix("//") {
        return Command::Send(format!("/{rest}"));
    }
    if let Some(rest) = line.strip_prefix("!!") {
        return Command::Send(format!("!{rest}"));
    }
    if let Some(number) = line.strip_prefix('!') {
        let number = number.trim();
        // "!" or "!wow" is just a message.
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Command::Send(line.to_string());
        }
        return match number.parse::<usize>() {
            Ok(n) if n > 0 => Command::Press(n),
            _ => Command::Usage("buttons are numbered from 1: !1, !2, …"),
        };
    }
    let trimmed = line.trim();
    let (word, rest) = match trimmed.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (trimmed, ""),
    };
    match word {
        "/help" => Command::Help,
        "/photo" | "/document" => {
            let document = word == "/document";
            let (path, caption) = match rest.split_once(char::is_whitespace) {
                Some((path, caption)) => (path, Some(caption.trim().to_string())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Command::Usage(if document {
                    "usage: /document PATH [caption]"
                } else {
                    "usage: /photo PATH [caption]"
                });
            }
            Command::File {
                path: PathBuf::from(path),
                caption: caption.filter(|c| !c.is_empty()),
                document,
            }
        }
        "/group" if rest.is_empty() => Command::Group,
        "/private" if rest.is_empty() => Command::Private,
        "/user" if rest.is_empty() => Command::User(None),
        "/user" => Command::User(Some(rest.to_ascii_lowercase())),
        _ => Command::Send(line.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(text: &str) -> Command {
        Command::Send(text.to_string())
    }

    #[test]
    fn bot_commands_and_text_go_to_the_bot() {
        assert_eq!(parse("hi there"), send("hi there"));
        assert_eq!(parse("/start"), send("/start"));
        assert_eq!(parse("/start deep-link"), send("/start deep-link"));
        assert_eq!(parse("/help@sandbox_bot"), send("/help@sandbox_bot"));
        assert_eq!(parse("/groups"), send("/groups"));
        assert_eq!(
            parse("/group now"),
            send("/group now"),
            "not the chat's form"
        );
        assert_eq!(parse("  indented"), send("  indented"));
        assert_eq!(parse(""), Command::Nothing);
        assert_eq!(parse("   \r\n"), Command::Nothing);
    }

    #[test]
    fn double_slash_and_double_bang_send_literally() {
        assert_eq!(parse("//photo cat.png"), send("/photo cat.png"));
        assert_eq!(parse("//help"), send("/help"));
        assert_eq!(parse("!!2"), send("!2"));
    }

    #[test]
    fn presses() {
        assert_eq!(parse("!2"), Command::Press(2));
        assert_eq!(parse("! 12 "), Command::Press(12));
        assert!(matches!(parse("!0"), Command::Usage(_)));
        assert_eq!(parse("!"), send("!"));
        assert_eq!(parse("!wow"), send("!wow"));
    }

    #[test]
    fn files_with_and_without_captions() {
        assert_eq!(
            parse("/photo cat.png a very nice cat"),
            Command::File {
                path: "cat.png".into(),
                caption: Some("a very nice cat".into()),
                document: false
            }
        );
        assert_eq!(
            parse("/document /tmp/report.pdf"),
            Command::File {
                path: "/tmp/report.pdf".into(),
                caption: None,
                document: true
            }
        );
        assert!(matches!(parse("/photo"), Command::Usage(_)));
        assert!(matches!(parse("/document   "), Command::Usage(_)));
    }

    #[test]
    fn places_and_people() {
        assert_eq!(parse("/group"), Command::Group);
        assert_eq!(parse("/private"), Command::Private);
        assert_eq!(parse("/user"), Command::User(None));
        assert_eq!(parse("/user Bob"), Command::User(Some("bob".into())));
        assert_eq!(parse("/help"), Command::Help);
        assert!(HELP.contains("!N") && HELP.contains("/photo PATH"));
    }
}
