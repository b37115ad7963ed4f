//! Telegram's formatting options: `parse_mode` HTML, MarkdownV2 and the
//! legacy Markdown turn marked-up text into plain text and a list of
//! MessageEntity objects, with Telegram's errors for markup it refuses.
//!
//! The rules follow Telegram's own parser: only the documented tags and
//! named entities (`&lt;` `&gt;` `&amp;` `&quot;`, any numeric one);
//! MarkdownV2's reserved characters must be escaped outside code; offsets and
//! lengths count UTF-16 code units; empty entities are dropped; a link whose
//! URL Telegram would not accept keeps its text and loses the link;
//! `tg://user?id=` links become text mentions.

use std::collections::HashMap;

use serde_json::{json, Value};

/// One entity, before it becomes a MessageEntity object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entity {
    kind: &'static str,
    offset: usize,
    length: usize,
    /// `url` of a text_link, `language` of a pre, the user id of a
    /// text_mention, `custom_emoji_id`.
    argument: String,
}

/// Why Telegram refuses the markup: the text after `can't parse entities: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormattingError {
    #[error("unsupported parse_mode")]
    UnsupportedMode,
    #[error("can't parse entities: {0}")]
    Markup(String),
}

/// Text with its entities as Telegram stores it after parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Formatted {
    pub text: String,
    /// MessageEntity objects, ordered by offset (outer ones first).
    pub entities: Vec<Value>,
}

/// Parses `text` by `mode` (case-insensitive: `HTML`, `MarkdownV2`,
/// `Markdown`). `users` names the known users, for text mentions.
pub fn parse(
    text: &str,
    mode: &str,
    users: &HashMap<i64, Value>,
) -> Result<Formatted, FormattingError> {
    let (plain, mut entities) = match mode.to_ascii_lowercase().as_str() {
        "html" => parse_html(text)?,
        "markdownv2" => parse_markdown_v2(text)?,
        "markdown" => parse_markdown(text)?,
        _ => return Err(FormattingError::UnsupportedMode),
    };
    entities.retain(|e| e.length > 0);
    entities.sort_by(|a, b| a.offset.cmp(&b.offset).then(b.length.cmp(&a.length)));
    let entities = entities.into_iter().map(|e| to_json(e, users)).collect();
    Ok(Formatted {
        text: plain,
        entities,
    })
}

fn to_json(e: Entity, users: &HashMap<i64, Value>) -> Value {
    let mut object = json!({"type": e.kind, "offset": e.offset, "length": e.length});
    match e.kind {
        "text_link" => object["url"] = e.argument.into(),
        "pre" if !e.argument.is_empty() => object["language"] = e.argument.into(),
        "custom_emoji" => object["custom_emoji_id"] = e.argument.into(),
        "text_mention" => {
            let id: i64 = e.argument.parse().unwrap_or_default();
            object["user"] = users.get(&id).cloned().unwrap_or_else(
                || json!({"id": id, "is_bot": false, "first_name": format!("User {id}")}),
            );
        }
        _ => {}
    }
    object
}

fn markup(message: impl Into<String>) -> FormattingError {
    FormattingError::Markup(message.into())
}

/// UTF-16 length of a character, as Telegram counts offsets.
fn units(c: char) -> usize {
    c.len_utf16()
}

/// What a link target becomes: a text mention, a link with Telegram's form
/// of the URL, or nothing (the text stays, unlinked).
fn link(url: &str) -> Option<(&'static str, String)> {
    if let Some(id) = user_link_id(url) {
        return Some(("text_mention", id.to_string()));
    }
    checked_url(url).map(|url| ("text_link", url))
}

/// The user id of a `tg://user?id=123` link.
fn user_link_id(url: &str) -> Option<i64> {
    let rest = strip_prefix_ignore_case(url, "tg://user?")?;
    rest.split('&')
        .find_map(|pair| pair.strip_prefix("id="))
        .and_then(|id| id.parse().ok())
        .filter(|id: &i64| *id > 0)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Telegram accepts http(s) links to a host with a dot in it (the scheme
/// may be left out, and becomes http), and tg:// links; anything else —
/// `javascript:`, `mailto:`, `file:` — is not a link.
fn checked_url(url: &str) -> Option<String> {
    let url = url.trim();
    if strip_prefix_ignore_case(url, "tg:").is_some() {
        return (url.len() > 3 && !url.contains(char::is_whitespace)).then(|| url.to_string());
    }
    let (scheme, rest) = if let Some(rest) = strip_prefix_ignore_case(url, "https://") {
        ("https://", rest)
    } else if let Some(rest) = strip_prefix_ignore_case(url, "http://") {
        ("http://", rest)
    } else if url.contains("://") {
        return None;
    } else {
        ("http://", url)
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((host, port)) if !host.starts_with('[') || host.ends_with(']') => {
            if !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            host
        }
        _ => host,
    };
    let valid_host = (host.contains('.') || host.starts_with('['))
        && !host.starts_with('.')
        && !host.ends_with('.')
        && host
            .chars()
            .all(|c| c.is_alphanumeric() || "-.[]:_".contains(c));
    if !valid_host || tail.contains(char::is_whitespace) {
        return None;
    }
    let tail = if tail.is_empty() { "/" } else { tail };
    Some(format!("{scheme}{authority}{tail}"))
}

// ----- HTML -----------------------------------------------------------------

/// A tag opened and not yet closed.
struct OpenTag {
    name: String,
    argument: String,
    offset: usize,
    /// Where its content starts in the plain text (bytes).
    start: usize,
}

const HTML_TAGS: [&str; 17] = [
    "a",
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "span",
    "tg-spoiler",
    "tg-emoji",
    "code",
    "pre",
    "blockquote",
    "tg-time",
];

fn parse_html(text: &str) -> Result<(String, Vec<Entity>), FormattingError> {
    let bytes = text.as_bytes();
    let mut plain = String::with_capacity(text.len());
    let mut offset = 0;
    let mut entities: Vec<Entity> = Vec::new();
    let mut open: Vec<OpenTag> = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let c = bytes[i];
        if c == b'&' {
            if let Some((ch, used)) = html_entity(&text[i..]) {
                plain.push(ch);
                offset += units(ch);
                i += used;
                continue;
            }
        }
        if c != b'<' {
            // Safe: `i` is always at a character boundary here.
            let ch = text[i..].chars().next().unwrap_or_default();
            plain.push(ch);
            offset += units(ch);
            i += ch.len_utf8();
            continue;
        }
        let begin = i;
        i += 1;
        let is_space = |b: u8| b.is_ascii_whitespace();
        if bytes.get(i) != Some(&b'/') {
            let name_start = i;
            while i < bytes.len() && !is_space(bytes[i]) && bytes[i] != b'>' {
                i += 1;
            }
            if i >= bytes.len() {
                return Err(markup(format!("Unclosed start tag at byte offset {begin}")));
            }
            let name = text[name_start..i].to_ascii_lowercase();
            if !HTML_TAGS.contains(&name.as_str()) {
                return Err(markup(format!(
                    "Unsupported start tag \"{name}\" at byte offset {begin}"
                )));
            }
            let mut argument = String::new();
            let mut expandable = false;
            while i < bytes.len() && bytes[i] != b'>' {
                while i < bytes.len() && is_space(bytes[i]) {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'>' {
                    break;
                }
                let attr_start = i;
                while i < bytes.len() && !is_space(bytes[i]) && bytes[i] != b'=' && bytes[i] != b'>'
                {
                    i += 1;
                }
                let attribute = text[attr_start..i].to_ascii_lowercase();
                while i < bytes.len() && is_space(bytes[i]) {
                    i += 1;
                }
                if bytes.get(i) != Some(&b'=') {
                    if name == "blockquote" && attribute == "expandable" {
                        expandable = true;
                        continue;
                    }
                    return Err(markup(format!(
                        "Expected equal sign in declaration of an attribute of the tag \"{name}\" at byte offset {begin}"
                    )));
                }
                i += 1;
                while i < bytes.len() && is_space(bytes[i]) {
                    i += 1;
                }
                if i >= bytes.len() {
                    return Err(markup(format!(
                        "Unclosed start tag \"{name}\" at byte offset {begin}"
                    )));
                }
                let value = if bytes[i] == b'"' || bytes[i] == b'\'' {
                    let quote = bytes[i];
                    i += 1;
                    let mut value = String::new();
                    while i < bytes.len() && bytes[i] != quote {
                        if bytes[i] == b'&' {
                            if let Some((ch, used)) = html_entity(&text[i..]) {
                                value.push(ch);
                                i += used;
                                continue;
                            }
                        }
                        let ch = text[i..].chars().next().unwrap_or_default();
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                    if i >= bytes.len() {
                        return Err(markup(format!(
                            "Unclosed end of attribute value at byte offset {begin}"
                        )));
                    }
                    i += 1;
                    value
                } else {
                    let token_start = i;
                    while i < bytes.len()
                        && (bytes[i].is_ascii_alphanumeric()
                            || bytes[i] == b'.'
                            || bytes[i] == b'-')
                    {
                        i += 1;
                    }
                    if i < bytes.len() && !is_space(bytes[i]) && bytes[i] != b'>' {
                        return Err(markup(format!(
                            "Unexpected end of name token at byte offset {token_start}"
                        )));
                    }
                    text[token_start..i].to_ascii_lowercase()
                };
                match (name.as_str(), attribute.as_str()) {
                    ("a", "href") | ("tg-emoji", "emoji-id") => argument = value,
                    ("code", "class") => {
                        if let Some(language) = value.strip_prefix("language-") {
                            argument = language.to_string();
                        }
                    }
                    ("span", "class") => {
                        if let Some(class) = value.strip_prefix("tg-") {
                            argument = class.to_string();
                        }
                    }
                    _ => {}
                }
            }
            if i >= bytes.len() {
                return Err(markup(format!(
                    "Unclosed start tag \"{name}\" at byte offset {begin}"
                )));
            }
            i += 1;
            if name == "span" && argument != "spoiler" {
                return Err(markup(format!(
                    "Tag \"span\" must have class \"tg-spoiler\" at byte offset {begin}"
                )));
            }
            if expandable {
                argument = "expandable".to_string();
            }
            open.push(OpenTag {
                name,
                argument,
                offset,
                start: plain.len(),
            });
        } else {
            let Some(tag) = open.pop() else {
                return Err(markup(format!("Unexpected end tag at byte offset {begin}")));
            };
            i += 1;
            let name_start = i;
            while i < bytes.len() && !is_space(bytes[i]) && bytes[i] != b'>' {
                i += 1;
            }
            let end_name = text[name_start..i].to_ascii_lowercase();
            while i < bytes.len() && is_space(bytes[i]) {
                i += 1;
            }
            if bytes.get(i) != Some(&b'>') {
                return Err(markup(format!("Unclosed end tag at byte offset {begin}")));
            }
            i += 1;
            if !end_name.is_empty() && end_name != tag.name {
                return Err(markup(format!(
                    "Unmatched end tag at byte offset {begin}, expected \"</{}>\", found \"</{end_name}>\"",
                    tag.name
                )));
            }
            if offset > tag.offset {
                close_html_tag(tag, offset, &plain, &mut entities);
            }
        }
    }
    if let Some(tag) = open.last() {
        return Err(markup(format!(
            "Can't find end tag corresponding to start tag \"{}\"",
            tag.name
        )));
    }
    Ok((plain, entities))
}

fn close_html_tag(tag: OpenTag, end: usize, plain: &str, entities: &mut Vec<Entity>) {
    let (offset, length) = (tag.offset, end - tag.offset);
    let entity = |kind, argument| Entity {
        kind,
        offset,
        length,
        argument,
    };
    let same_span = |e: &Entity| e.offset == offset && e.length == length;
    match tag.name.as_str() {
        "b" | "strong" => entities.push(entity("bold", String::new())),
        "i" | "em" => entities.push(entity("italic", String::new())),
        "u" | "ins" => entities.push(entity("underline", String::new())),
        "s" | "strike" | "del" => entities.push(entity("strikethrough", String::new())),
        "tg-spoiler" | "span" => entities.push(entity("spoiler", String::new())),
        "tg-emoji" => entities.push(entity("custom_emoji", tag.argument)),
        "blockquote" if tag.argument == "expandable" => {
            entities.push(entity("expandable_blockquote", String::new()))
        }
        "blockquote" => entities.push(entity("blockquote", String::new())),
        "a" => {
            let url = if tag.argument.is_empty() {
                plain[tag.start..].to_string()
            } else {
                tag.argument
            };
            if let Some((kind, argument)) = link(&url) {
                entities.push(entity(kind, argument));
            }
        }
        // <pre><code class="language-x"> is one pre with a language.
        "pre" => match entities.last_mut() {
            Some(last) if last.kind == "code" && same_span(last) => last.kind = "pre",
            _ => entities.push(entity("pre", String::new())),
        },
        "code" => match entities.last_mut() {
            Some(last) if last.kind == "pre" && same_span(last) => {
                last.argument = tag.argument;
            }
            _ => entities.push(entity("code", tag.argument)),
        },
        // <tg-time> shows its text; the sandbox keeps no date entity.
        _ => {}
    }
}

/// The character an HTML entity at the start of `text` stands for, and its
/// length in bytes; None when it is not one Telegram knows (the `&` is then
/// taken literally).
fn html_entity(text: &str) -> Option<(char, usize)> {
    // The longest Telegram reads is `&#x10FFFF;`.
    let end = text.bytes().take(10).position(|b| b == b';')?;
    let body = &text[1..end];
    let ch = if let Some(number) = body.strip_prefix('#') {
        let code = match number.strip_prefix(['x', 'X']) {
            Some(hex) if !hex.is_empty() && hex.len() <= 6 => u32::from_str_radix(hex, 16).ok()?,
            Some(_) => return None,
            None if !number.is_empty() && number.len() <= 7 => number.parse().ok()?,
            None => return None,
        };
        char::from_u32(code).filter(|c| *c != '\0')?
    } else {
        match body {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            _ => return None,
        }
    };
    Some((ch, end + 1))
}

// ----- MarkdownV2 --------------------------------------------------------------

/// An entity MarkdownV2 opened.
struct OpenMark {
    kind: &'static str,
    /// Telegram's name for it in "Can't find end of … entity".
    name: &'static str,
    argument: String,
    offset: usize,
    byte: usize,
    start: usize,
}

const RESERVED: &str = "_*[]()~`>#+-=|{}.!";

fn parse_markdown_v2(text: &str) -> Result<(String, Vec<Entity>), FormattingError> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|(_, c)| *c).unwrap_or('\0');
    let mut plain = String::with_capacity(text.len());
    let mut offset = 0;
    let mut entities = Vec::new();
    let mut open: Vec<OpenMark> = Vec::new();
    // An open block quote: offset, and whether it is expandable.
    let mut quote: Option<(usize, bool)> = None;
    let mut i = 0;
    while i < chars.len() {
        let (byte, c) = chars[i];
        let in_code = open
            .last()
            .is_some_and(|m| matches!(m.kind, "code" | "pre"));
        let line_start = i == 0 || at(i - 1) == '\n';
        if line_start && !in_code {
            let starts_quote = c == '>';
            let starts_expandable = c == '*' && at(i + 1) == '*' && at(i + 2) == '>';
            if starts_quote || starts_expandable {
                if quote.is_none() {
                    quote = Some((offset, starts_expandable));
                }
                i += if starts_expandable { 3 } else { 1 };
                continue;
            }
            if let Some((start, expandable)) = quote.take() {
                close_quote(&mut entities, start, offset, expandable, &plain, &open)?;
            }
        }
        if c == '\\' && at(i + 1) as u32 > 0 && at(i + 1) as u32 <= 126 {
            let escaped = at(i + 1);
            plain.push(escaped);
            offset += 1;
            i += 2;
            continue;
        }
        // `||` closing an expandable quote at the end of its line.
        if let Some((start, true)) = quote {
            let ends_line = matches!(at(i + 2), '\n' | '\0');
            if c == '|'
                && at(i + 1) == '|'
                && ends_line
                && !open.iter().any(|m| m.kind == "spoiler")
            {
                close_quote(&mut entities, start, offset, true, &plain, &open)?;
                quote = None;
                i += 2;
                continue;
            }
        }
        let reserved = if in_code { "`" } else { RESERVED };
        if !reserved.contains(c) {
            plain.push(c);
            offset += units(c);
            i += 1;
            continue;
        }
        let ends = open.last().is_some_and(|m| match m.kind {
            "bold" => c == '*',
            "italic" => c == '_' && at(i + 1) != '_',
            "underline" => c == '_' && at(i + 1) == '_',
            "strikethrough" => c == '~',
            "spoiler" => c == '|' && at(i + 1) == '|',
            "code" => c == '`',
            "pre" => c == '`' && at(i + 1) == '`' && at(i + 2) == '`',
            "text_link" | "custom_emoji" => c == ']',
            _ => false,
        });
        if !ends {
            let reserved_error = || {
                markup(format!(
                    "Character '{c}' is reserved and must be escaped with the preceding '\\'"
                ))
            };
            let (kind, name, mut argument) = match c {
                '_' if at(i + 1) == '_' => {
                    i += 1;
                    ("underline", "Underline", String::new())
                }
                '_' => ("italic", "Italic", String::new()),
                '*' => ("bold", "Bold", String::new()),
                '~' => ("strikethrough", "Strikethrough", String::new()),
                '|' if at(i + 1) == '|' => {
                    i += 1;
                    ("spoiler", "Spoiler", String::new())
                }
                '[' => ("text_link", "TextUrl", String::new()),
                '!' if at(i + 1) == '[' => {
                    i += 1;
                    ("custom_emoji", "CustomEmoji", String::new())
                }
                '`' if at(i + 1) == '`' && at(i + 2) == '`' => {
                    i += 3;
                    let mut end = i;
                    while end < chars.len() && !at(end).is_whitespace() && at(end) != '`' {
                        end += 1;
                    }
                    let mut language = String::new();
                    if end != i && end < chars.len() && at(end) != '`' {
                        language = chars[i..end].iter().map(|(_, c)| c).collect();
                        i = end;
                    }
                    // One line break after the opening fence is not content.
                    if matches!(at(i), '\n' | '\r') {
                        i += if matches!(at(i + 1), '\n' | '\r') && at(i) != at(i + 1) {
                            2
                        } else {
                            1
                        };
                    }
                    open.push(OpenMark {
                        kind: "pre",
                        name: if language.is_empty() {
                            "Pre"
                        } else {
                            "PreCode"
                        },
                        argument: language,
                        offset,
                        byte,
                        start: plain.len(),
                    });
                    continue;
                }
                '`' => ("code", "Code", String::new()),
                _ => return Err(reserved_error()),
            };
            argument.clear();
            open.push(OpenMark {
                kind,
                name,
                argument,
                offset,
                byte,
                start: plain.len(),
            });
            i += 1;
            continue;
        }
        // The end of the innermost entity. `ends` held, so it exists.
        let Some(mark) = open.pop() else {
            return Err(markup("internal: no entity to close"));
        };
        let mut keep = offset > mark.offset;
        let mut kind = mark.kind;
        let mut argument = mark.argument;
        match mark.kind {
            "underline" | "spoiler" => i += 2,
            "pre" => i += 3,
            "text_link" | "custom_emoji" => {
                i += 1;
                let url = if at(i) == '(' {
                    i += 1;
                    let url_start = chars.get(i).map(|(b, _)| *b).unwrap_or(text.len());
                    let mut url = String::new();
                    while i < chars.len() && at(i) != ')' {
                        if at(i) == '\\' && at(i + 1) as u32 > 0 && at(i + 1) as u32 <= 126 {
                            url.push(at(i + 1));
                            i += 2;
                            continue;
                        }
                        url.push(at(i));
                        i += 1;
                    }
                    if at(i) != ')' {
                        return Err(markup(format!(
                            "Can't find end of a URL at byte offset {url_start}"
                        )));
                    }
                    i += 1;
                    url
                } else if mark.kind == "custom_emoji" {
                    return Err(markup(format!(
                        "Custom emoji entity must contain a tg://emoji URL at byte offset {}",
                        mark.byte
                    )));
                } else {
                    plain[mark.start..].to_string()
                };
                if mark.kind == "custom_emoji" {
                    argument = url
                        .strip_prefix("tg://emoji?id=")
                        .unwrap_or_default()
                        .to_string();
                    keep &= !argument.is_empty();
                } else {
                    match link(&url) {
                        Some((link_kind, target)) => {
                            kind = link_kind;
                            argument = target;
                        }
                        None => keep = false,
                    }
                }
            }
            _ => i += 1,
        }
        if keep {
            entities.push(Entity {
                kind,
                offset: mark.offset,
                length: offset - mark.offset,
                argument,
            });
        }
    }
    if let Some(mark) = open.last() {
        return Err(markup(format!(
            "Can't find end of {} entity at byte offset {}",
            mark.name, mark.byte
        )));
    }
    if let Some((start, expandable)) = quote {
        close_quote(&mut entities, start, offset, expandable, &plain, &open)?;
    }
    Ok((plain, entities))
}

/// Ends a block quote before the line break that ended it; an entity
/// opened inside the quote must have ended with it.
fn close_quote(
    entities: &mut Vec<Entity>,
    start: usize,
    mut end: usize,
    expandable: bool,
    plain: &str,
    open: &[OpenMark],
) -> Result<(), FormattingError> {
    if let Some(mark) = open
        .iter()
        .find(|m| m.offset >= start && m.offset < end.max(1))
    {
        return Err(markup(format!(
            "Can't find end of {} entity at byte offset {}",
            mark.name, mark.byte
        )));
    }
    if plain.ends_with('\n') && end > start {
        end -= 1;
    }
    if end > start {
        entities.push(Entity {
            kind: if expandable {
                "expandable_blockquote"
            } else {
                "blockquote"
            },
            offset: start,
            length: end - start,
            argument: String::new(),
        });
    }
    Ok(())
}

// ----- Markdown (legacy) ---------------------------------------------------------

fn parse_markdown(text: &str) -> Result<(String, Vec<Entity>), FormattingError> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|(_, c)| *c).unwrap_or('\0');
    let mut plain = String::with_capacity(text.len());
    let mut offset = 0;
    let mut entities = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (byte, c) = chars[i];
        if c == '\\' && matches!(at(i + 1), '_' | '*' | '`' | '[') {
            plain.push(at(i + 1));
            offset += 1;
            i += 2;
            continue;
        }
        if !matches!(c, '_' | '*' | '`' | '[') {
            plain.push(c);
            offset += units(c);
            i += 1;
            continue;
        }
        let start_offset = offset;
        let (kind, end_char, mut language) = match c {
            '`' if at(i + 1) == '`' && at(i + 2) == '`' => {
                i += 3;
                let mut language = String::new();
                let mut end = i;
                while end < chars.len() && !at(end).is_whitespace() && at(end) != '`' {
                    end += 1;
                }
                if end != i && end < chars.len() && at(end) != '`' {
                    language = chars[i..end].iter().map(|(_, c)| c).collect();
                    i = end;
                }
                ("pre", '`', language)
            }
            '`' => {
                i += 1;
                ("code", '`', String::new())
            }
            '_' => {
                i += 1;
                ("italic", '_', String::new())
            }
            '*' => {
                i += 1;
                ("bold", '*', String::new())
            }
            _ => {
                i += 1;
                ("text_link", ']', String::new())
            }
        };
        let is_end = |i: usize| {
            at(i) == end_char && (kind != "pre" || (at(i + 1) == '`' && at(i + 2) == '`'))
        };
        while i < chars.len() && !is_end(i) {
            let ch = at(i);
            plain.push(ch);
            offset += units(ch);
            i += 1;
        }
        if i >= chars.len() {
            return Err(markup(format!(
                "Can't find end of the entity starting at byte offset {byte}"
            )));
        }
        i += if kind == "pre" { 3 } else { 1 };
        let mut kind = kind;
        if kind == "text_link" {
            if at(i) != '(' {
                // Not a link after all: the brackets' content stays as text.
                continue;
            }
            i += 1;
            let mut url = String::new();
            while i < chars.len() && at(i) != ')' {
                url.push(at(i));
                i += 1;
            }
            i += 1;
            match link(&url) {
                Some((link_kind, target)) => {
                    kind = link_kind;
                    language = target;
                }
                None => continue,
            }
        }
        entities.push(Entity {
            kind,
            offset: start_offset,
            length: offset - start_offset,
            argument: language,
        });
    }
    Ok((plain, entities))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str, mode: &str) -> (String, Value) {
        let f = parse(text, mode, &HashMap::new()).expect("valid markup");
        (f.text, Value::Array(f.entities))
    }

    fn refused(text: &str, mode: &str) -> String {
        parse(text, mode, &HashMap::new())
            .expect_err("invalid markup")
            .to_string()
    }

    #[test]
    fn html_tags_become_entities_and_text_loses_the_markup() {
        let (text, entities) = parsed(
            "<b>bold</b> <i>it</i> <u>u</u> <s>s</s> <tg-spoiler>x</tg-spoiler> \
             <a href=\"https://example.org\">link</a> <code>c</code>",
            "HTML",
        );
        assert_eq!(text, "bold it u s x link c");
        assert_eq!(
            entities,
            json!([
                {"type": "bold", "offset": 0, "length": 4},
                {"type": "italic", "offset": 5, "length": 2},
                {"type": "underline", "offset": 8, "length": 1},
                {"type": "strikethrough", "offset": 10, "length": 1},
                {"type": "spoiler", "offset": 12, "length": 1},
                {"type": "text_link", "offset": 14, "length": 4, "url": "https://example.org/"},
                {"type": "code", "offset": 19, "length": 1},
            ])
        );
        let (text, entities) = parsed(
            "<strong>a</strong><em>b</em><ins>c</ins><del>d</del><strike>e</strike>\
             <span class=\"tg-spoiler\">f</span><blockquote>g</blockquote>\
             <blockquote expandable>h</blockquote>",
            "html",
        );
        assert_eq!(text, "abcdefgh");
        let kinds: Vec<&str> = entities
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|e| e["type"].as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "bold",
                "italic",
                "underline",
                "strikethrough",
                "strikethrough",
                "spoiler",
                "blockquote",
                "expandable_blockquote"
            ]
        );
    }

    #[test]
    fn html_nests_counts_utf16_and_decodes_entities() {
        let (text, entities) = parsed("<b>😀 <i>a &lt;b&gt; &amp; &#33;&#x3f;</i></b>", "HTML");
        assert_eq!(text, "😀 a <b> & !?");
        // The emoji is two UTF-16 units.
        assert_eq!(
            entities,
            json!([
                {"type": "bold", "offset": 0, "length": 13},
                {"type": "italic", "offset": 3, "length": 10},
            ])
        );
        let (text, entities) = parsed(
            "<pre><code class=\"language-python\">print(1)</code></pre> & &nbsp;",
            "HTML",
        );
        assert_eq!(
            text, "print(1) & &nbsp;",
            "unknown entities stay as written"
        );
        assert_eq!(
            entities,
            json!([{"type": "pre", "offset": 0, "length": 8, "language": "python"}])
        );
    }

    #[test]
    fn html_that_telegram_refuses_is_refused_with_its_words() {
        assert_eq!(
            refused("<script>alert(1)</script>", "HTML"),
            "can't parse entities: Unsupported start tag \"script\" at byte offset 0"
        );
        assert_eq!(
            refused("a <b>bold", "HTML"),
            "can't parse entities: Can't find end tag corresponding to start tag \"b\""
        );
        assert!(refused("<b>x</i>", "HTML").contains("Unmatched end tag at byte offset 4"));
        assert!(refused("</b>", "HTML").contains("Unexpected end tag"));
        assert!(refused("<span>x</span>", "HTML").contains("must have class"));
        assert_eq!(refused("x", "Textile"), "unsupported parse_mode");
    }

    #[test]
    fn links_telegram_would_not_open_lose_the_link_not_the_text() {
        let (text, entities) = parsed(
            "<a href=\"javascript:alert(1)\">x</a> <a href='example.org'>y</a>",
            "HTML",
        );
        assert_eq!(text, "x y");
        assert_eq!(
            entities,
            json!([{"type": "text_link", "offset": 2, "length": 1, "url": "http://example.org/"}])
        );
        let users = HashMap::from([(7, json!({"id": 7, "is_bot": false, "first_name": "Al"}))]);
        let f = parse("[Al](tg://user?id=7)", "MarkdownV2", &users).expect("valid");
        assert_eq!(
            f.entities,
            [json!({"type": "text_mention", "offset": 0, "length": 2,
                    "user": {"id": 7, "is_bot": false, "first_name": "Al"}})]
        );
    }

    #[test]
    fn markdown_v2_entities_and_escapes() {
        let (text, entities) = parsed(
            "*bold _italic bold ~strike~ __underline italic bold___ bold*\n\
             ||spoiler|| [link](http://www.example.com/a\\)b) `code \\` x` 1\\.5\\!",
            "MarkdownV2",
        );
        assert_eq!(
            text,
            "bold italic bold strike underline italic bold bold\nspoiler link code ` x 1.5!"
        );
        assert_eq!(
            entities,
            json!([
                {"type": "bold", "offset": 0, "length": 50},
                {"type": "italic", "offset": 5, "length": 40},
                {"type": "strikethrough", "offset": 17, "length": 6},
                {"type": "underline", "offset": 24, "length": 21},
                {"type": "spoiler", "offset": 51, "length": 7},
                {"type": "text_link", "offset": 59, "length": 4, "url": "http://www.example.com/a)b"},
                {"type": "code", "offset": 64, "length": 8},
            ])
        );
        let (text, entities) = parsed("```rust\nfn main() {}\n```", "MarkdownV2");
        assert_eq!(text, "fn main() {}\n");
        assert_eq!(
            entities,
            json!([{"type": "pre", "offset": 0, "length": 13, "language": "rust"}])
        );
    }

    #[test]
    fn markdown_v2_quotes() {
        let (text, entities) = parsed(">first\n>second\nafter", "MarkdownV2");
        assert_eq!(text, "first\nsecond\nafter");
        assert_eq!(
            entities,
            json!([{"type": "blockquote", "offset": 0, "length": 12}])
        );
        let (text, entities) = parsed("**>hidden\n>more||\nout", "MarkdownV2");
        assert_eq!(text, "hidden\nmore\nout");
        assert_eq!(
            entities,
            json!([{"type": "expandable_blockquote", "offset": 0, "length": 11}])
        );
    }

    #[test]
    fn markdown_v2_refuses_unescaped_reserved_characters() {
        assert_eq!(
            refused("Hello. World", "MarkdownV2"),
            "can't parse entities: Character '.' is reserved and must be escaped with the preceding '\\'"
        );
        assert_eq!(
            refused("*bold", "MarkdownV2"),
            "can't parse entities: Can't find end of Bold entity at byte offset 0"
        );
        assert!(refused("[a](http://x.org", "MarkdownV2").contains("Can't find end of a URL"));
        // Inside code only ` and \ are special.
        assert_eq!(parsed("`a.b*c`", "MarkdownV2").0, "a.b*c");
    }

    proptest::proptest! {
        #[test]
        fn any_text_in_any_mode_parses_or_is_refused_without_panicking(
            text in "[<>/&;#a-z\\*_~|`\\[\\]().!>\n😀 =\"']{0,60}"
        ) {
            for mode in ["HTML", "MarkdownV2", "Markdown"] {
                if let Ok(f) = parse(&text, mode, &HashMap::new()) {
                    let units = f.text.encode_utf16().count() as u64;
                    for e in &f.entities {
                        let end = e["offset"].as_u64().unwrap_or(u64::MAX)
                            + e["length"].as_u64().unwrap_or(u64::MAX);
                        proptest::prop_assert!(end <= units, "{mode}: {e} beyond {units}");
                    }
                }
            }
        }
    }

    #[test]
    fn legacy_markdown() {
        let (text, entities) = parsed("*b* _i_ `c` [t](https://t.me) ```py\nx```", "Markdown");
        assert_eq!(text, "b i c t \nx");
        assert_eq!(
            entities,
            json!([
                {"type": "bold", "offset": 0, "length": 1},
                {"type": "italic", "offset": 2, "length": 1},
                {"type": "code", "offset": 4, "length": 1},
                {"type": "text_link", "offset": 6, "length": 1, "url": "https://t.me/"},
                {"type": "pre", "offset": 8, "length": 2, "language": "py"},
            ])
        );
        assert!(refused("*open", "Markdown").contains("Can't find end of the entity"));
    }
}
