//! A message's text and its MessageEntity list as HTML the page can show:
//! every character of the text is escaped, and the only markup is what this
//! file writes for each entity type, so nothing a bot sends (whatever its
//! `entities`, whatever its text) becomes markup of its own. Links keep
//! only http(s), mailto and tel targets. Entities may overlap without
//! nesting, as Telegram allows; tags are closed and reopened around each
//! other so that the HTML stays well nested.
//!
//! Like a Telegram client, bot commands (`/start`) and http(s) URLs in the
//! plain text are shown as such even without an entity (Telegram's servers
//! add those; the sandbox does not).

use serde_json::Value;

/// One entity over characters `start..end` of the text.
#[derive(Debug, Clone)]
struct Span {
    start: usize,
    end: usize,
    open: String,
    close: &'static str,
    /// Code, a link or a command already: nothing is detected inside.
    opaque: bool,
}

/// Entity types inside which no command or URL is looked for.
const OPAQUE: [&str; 10] = [
    "code",
    "pre",
    "text_link",
    "url",
    "email",
    "phone_number",
    "bot_command",
    "mention",
    "text_mention",
    "custom_emoji",
];

/// The text with its entities as safe HTML.
pub fn render(text: &str, entities: &[Value]) -> String {
    let chars: Vec<char> = text.chars().collect();
    // Character index of each UTF-16 offset a char starts at.
    let mut starts = Vec::with_capacity(chars.len() + 1);
    let mut units = 0usize;
    for c in &chars {
        starts.push(units);
        units += c.len_utf16();
    }
    starts.push(units);
    // An offset inside a surrogate pair rounds down to its character.
    let to_index = |offset: usize| match starts.binary_search(&offset) {
        Ok(i) => i,
        Err(i) => i.saturating_sub(1),
    };
    let mut spans: Vec<Span> = entities
        .iter()
        .filter_map(|e| {
            let offset = usize::try_from(e["offset"].as_u64()?).ok()?;
            let length = usize::try_from(e["length"].as_u64()?).ok()?;
            let start = to_index(offset.min(units));
            let end = to_index(offset.saturating_add(length).min(units));
            let covered: String = chars[start..end].iter().collect();
            let (open, close) = tags(e, &covered)?;
            (start < end).then_some(Span {
                start,
                end,
                open,
                close,
                opaque: OPAQUE.contains(&e["type"].as_str().unwrap_or_default()),
            })
        })
        .collect();
    for (start, end, open, close) in detected(&chars) {
        if !spans
            .iter()
            .any(|s| s.opaque && s.start < end && start < s.end)
        {
            spans.push(Span {
                start,
                end,
                open,
                close,
                opaque: true,
            });
        }
    }
    // Outer entities first where two start together.
    spans.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));

    let mut points: Vec<usize> = spans.iter().flat_map(|s| [s.start, s.end]).collect();
    points.push(0);
    points.push(chars.len());
    points.sort_unstable();
    points.dedup();

    let mut out = String::with_capacity(text.len() + spans.len() * 16);
    let mut stack: Vec<usize> = Vec::new();
    let mut next = 0;
    for window in points.windows(2) {
        let (at, to) = (window[0], window[1]);
        // Close what ends here; what was opened after it and goes on is
        // closed with it and opened again.
        if stack.iter().any(|&s| spans[s].end <= at) {
            let mut reopen = Vec::new();
            while stack.iter().any(|&s| spans[s].end <= at) {
                if let Some(top) = stack.pop() {
                    out.push_str(spans[top].close);
                    if spans[top].end > at {
                        reopen.push(top);
                    }
                }
            }
            for s in reopen.into_iter().rev() {
                out.push_str(&spans[s].open);
                stack.push(s);
            }
        }
        while next < spans.len() && spans[next].start == at {
            out.push_str(&spans[next].open);
            stack.push(next);
            next += 1;
        }
        for c in &chars[at..to] {
            escape_char(*c, &mut out);
        }
    }
    while let Some(top) = stack.pop() {
        out.push_str(spans[top].close);
    }
    out
}

/// The opening and closing markup of an entity over `covered`; None for
/// types shown as plain text.
fn tags(entity: &Value, covered: &str) -> Option<(String, &'static str)> {
    let simple = |tag: &'static str, close: &'static str| Some((tag.to_string(), close));
    match entity["type"].as_str()? {
        "bold" => simple("<b>", "</b>"),
        "italic" => simple("<i>", "</i>"),
        "underline" => simple("<u>", "</u>"),
        "strikethrough" => simple("<s>", "</s>"),
        "spoiler" => simple("<span class=\"spoiler\">", "</span>"),
        "code" => simple("<code>", "</code>"),
        "pre" => {
            let language = entity["language"].as_str().unwrap_or_default();
            Some((
                format!("<span class=\"pre\" data-lang=\"{}\">", escape(language)),
                "</span>",
            ))
        }
        "blockquote" => simple("<span class=\"quote\">", "</span>"),
        "expandable_blockquote" => simple("<span class=\"quote expandable\">", "</span>"),
        "text_link" => Some(link(entity["url"].as_str().unwrap_or_default())),
        "url" => Some(link(covered)),
        "email" => Some(anchor(&format!("mailto:{covered}"))),
        "phone_number" => {
            let digits: String = covered
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '+')
                .collect();
            Some(anchor(&format!("tel:{digits}")))
        }
        "mention" | "hashtag" | "cashtag" => simple("<span class=\"mention\">", "</span>"),
        "text_mention" => {
            let name = entity["user"]["first_name"].as_str().unwrap_or_default();
            Some((
                format!("<span class=\"mention\" title=\"{}\">", escape(name)),
                "</span>",
            ))
        }
        "bot_command" => Some((
            format!(
                "<span class=\"command\" data-command=\"{}\">",
                escape(covered)
            ),
            "</span>",
        )),
        _ => None,
    }
}

/// A link to `url` when it is http(s) (a missing scheme is http, as on
/// Telegram); a tg:// user link is a mention; anything else stays text.
fn link(url: &str) -> (String, &'static str) {
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        anchor(url)
    } else if lower.starts_with("tg:") {
        ("<span class=\"mention\">".to_string(), "</span>")
    } else if !url.is_empty() && !url.contains(':') && url.contains('.') {
        anchor(&format!("http://{url}"))
    } else {
        ("<span class=\"link\">".to_string(), "</span>")
    }
}

fn anchor(href: &str) -> (String, &'static str) {
    (
        format!(
            "<a href=\"{}\" target=\"_blank\" rel=\"noopener noreferrer nofollow\">",
            escape(href)
        ),
        "</a>",
    )
}

/// Bot commands and http(s) URLs in plain text, as character ranges with
/// their markup.
fn detected(chars: &[char]) -> Vec<(usize, usize, String, &'static str)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let word_start = i == 0 || chars[i - 1].is_whitespace() || chars[i - 1] == '(';
        if !word_start {
            i += 1;
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 8)].iter().collect();
        let lower = rest.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let mut end = i;
            while end < chars.len() && !chars[end].is_whitespace() {
                end += 1;
            }
            while end > i && ".,;:!?)'\"".contains(chars[end - 1]) {
                end -= 1;
            }
            let url: String = chars[i..end].iter().collect();
            if url.len() > "https://".len() {
                let (open, close) = anchor(&url);
                found.push((i, end, open, close));
            }
            i = end.max(i + 1);
            continue;
        }
        if chars[i] == '/' {
            let mut end = i + 1;
            while end < chars.len()
                && (chars[end].is_ascii_alphanumeric() || chars[end] == '_')
                && end - i <= 32
            {
                end += 1;
            }
            if end < chars.len() && chars[end] == '@' {
                let mut at = end + 1;
                while at < chars.len() && (chars[at].is_ascii_alphanumeric() || chars[at] == '_') {
                    at += 1;
                }
                if at > end + 1 {
                    end = at;
                }
            }
            let ends_word =
                end == chars.len() || chars[end].is_whitespace() || ".,;:!?)".contains(chars[end]);
            if end > i + 1 && ends_word && chars[i + 1].is_ascii_alphanumeric() {
                let command: String = chars[i..end].iter().collect();
                found.push((
                    i,
                    end,
                    format!(
                        "<span class=\"command\" data-command=\"{}\">",
                        escape(&command)
                    ),
                    "</span>",
                ));
            }
            i = end;
            continue;
        }
        i += 1;
    }
    found
}

fn escape_char(c: char, out: &mut String) {
    match c {
        '&' => out.push_str("&amp;"),
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        '"' => out.push_str("&quot;"),
        '\'' => out.push_str("&#39;"),
        c => out.push(c),
    }
}

/// `text` with every character that means something in HTML escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        escape_char(c, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Text and entities as the sandbox stores a message sent with `mode`.
    fn parsed(text: &str, mode: &str) -> (String, Vec<Value>) {
        let f = crate::sandbox::formatting::parse(text, mode, &Default::default())
            .expect("valid markup");
        (f.text, f.entities)
    }

    #[test]
    fn text_is_escaped_and_never_markup() {
        assert_eq!(
            render("<script>alert('x')</script> & \"q\"", &[]),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        // An entity over markup-looking text escapes it too.
        let bold = [json!({"type": "bold", "offset": 0, "length": 8})];
        assert_eq!(render("<script>", &bold), "<b>&lt;script&gt;</b>");
    }

    #[test]
    fn the_html_subset_from_the_sandbox_parser_renders() {
        let f = parsed(
            "<b>b <i>bi</i></b> <u>u</u> <s>s</s> <tg-spoiler>sp</tg-spoiler> \
             <code>c</code> <pre><code class=\"language-rust\">fn x()</code></pre>\
             <blockquote>q</blockquote> <a href=\"https://example.org/?a=1&amp;b=2\">l</a>",
            "HTML",
        );
        assert_eq!(
            render(&f.0, &f.1),
            "<b>b <i>bi</i></b> <u>u</u> <s>s</s> <span class=\"spoiler\">sp</span> \
             <code>c</code> <span class=\"pre\" data-lang=\"rust\">fn x()</span>\
             <span class=\"quote\">q</span> <a href=\"https://example.org/?a=1&amp;b=2\" \
             target=\"_blank\" rel=\"noopener noreferrer nofollow\">l</a>"
        );
    }

    #[test]
    fn markdown_v2_renders_with_its_escapes_resolved() {
        let f = parsed(
            "*bold \\*star\\* _italic_* ||secret|| 2\\+2\\=4 \\<b\\>",
            "MarkdownV2",
        );
        assert_eq!(
            render(&f.0, &f.1),
            "<b>bold *star* <i>italic</i></b> <span class=\"spoiler\">secret</span> \
             2+2=4 &lt;b&gt;"
        );
    }

    #[test]
    fn overlapping_entities_stay_well_nested() {
        let entities = [
            json!({"type": "bold", "offset": 0, "length": 4}),
            json!({"type": "italic", "offset": 2, "length": 4}),
        ];
        assert_eq!(render("abcdef", &entities), "<b>ab<i>cd</i></b><i>ef</i>");
    }

    #[test]
    fn offsets_are_utf16_units() {
        let entities = [json!({"type": "bold", "offset": 3, "length": 2})];
        assert_eq!(render("😀 hi", &entities), "😀 <b>hi</b>");
        // Past the end, or inside a surrogate pair: clamped, not a panic.
        let odd = [
            json!({"type": "italic", "offset": 1, "length": 99}),
            json!({"type": "bold", "offset": 99, "length": 1}),
        ];
        assert_eq!(render("😀 hi", &odd), "<i>😀 hi</i>");
    }

    #[test]
    fn only_safe_links_are_links() {
        let link = |url: &str| {
            render(
                "x",
                &[json!({"type": "text_link", "offset": 0, "length": 1, "url": url})],
            )
        };
        assert_eq!(link("javascript:alert(1)"), "<span class=\"link\">x</span>");
        assert_eq!(link("data:text/html,hi"), "<span class=\"link\">x</span>");
        assert_eq!(
            link("https://e.org/\"onmouseover=\"alert(1)"),
            "<a href=\"https://e.org/&quot;onmouseover=&quot;alert(1)\" target=\"_blank\" \
             rel=\"noopener noreferrer nofollow\">x</a>"
        );
        assert_eq!(link("tg://user?id=1"), "<span class=\"mention\">x</span>");
        let unknown = [json!({"type": "<img src=x onerror=alert(1)>", "offset": 0, "length": 1})];
        assert_eq!(render("x", &unknown), "x");
    }

    proptest::proptest! {
        /// Whatever the text and the entities, the only markup is this
        /// file's own tags.
        #[test]
        fn bot_text_never_becomes_markup(
            text in "[<>&\"'a-z /:.😀]{0,40}",
            entities in proptest::collection::vec(
                (0u64..45, 0u64..45, proptest::sample::select(vec![
                    "bold", "italic", "code", "pre", "text_link", "url", "spoiler",
                    "blockquote", "bot_command", "<script>", "mention",
                ])),
                0..5,
            ),
            url in "[a-z:/<>\"' ]{0,20}",
        ) {
            let entities: Vec<Value> = entities
                .into_iter()
                .map(|(offset, length, kind)| json!({
                    "type": kind, "offset": offset, "length": length,
                    "url": url, "language": url,
                }))
                .collect();
            let html = render(&text, &entities);
            const OURS: [&str; 18] = [
                "<b>", "</b>", "<i>", "</i>", "<u>", "</u>", "<s>", "</s>", "<code>",
                "</code>", "<span class=\"", "<span>", "</span>", "<a href=\"",
                "</a>", "&lt;", "&gt;", "&quot;",
            ];
            for (at, _) in html.match_indices('<') {
                proptest::prop_assert!(
                    OURS.iter().any(|tag| html[at..].starts_with(tag)),
                    "stray markup at {at} in {html}"
                );
            }
            // Attribute values cannot end early: every quote inside is escaped.
            for tag in html.split('<').skip(1) {
                let inside = tag.split('>').next().unwrap_or_default();
                proptest::prop_assert!(inside.matches('"').count() % 2 == 0, "{inside}");
            }
            for (at, _) in html.match_indices("href=\"") {
                let target = &html[at + 6..];
                proptest::prop_assert!(
                    ["http://", "https://", "mailto:", "tel:"].iter().any(|s| target.starts_with(s)),
                    "a link to {target}"
                );
            }
        }
    }

    #[test]
    fn commands_and_urls_in_plain_text_are_detected() {
        assert_eq!(
            render(
                "try /start or /help@sandbox_bot, see https://example.org.",
                &[]
            ),
            "try <span class=\"command\" data-command=\"/start\">/start</span> or \
             <span class=\"command\" data-command=\"/help@sandbox_bot\">/help@sandbox_bot</span>, \
             see <a href=\"https://example.org\" target=\"_blank\" \
             rel=\"noopener noreferrer nofollow\">https://example.org</a>."
        );
        assert_eq!(render("a/b and /", &[]), "a/b and /");
        // Code or a link already there wins; formatting does not hide one.
        let code = [json!({"type": "code", "offset": 0, "length": 6})];
        assert_eq!(render("/start", &code), "<code>/start</code>");
        let bold = [json!({"type": "bold", "offset": 0, "length": 9})];
        assert_eq!(
            render("do /start", &bold),
            "<b>do <span class=\"command\" data-command=\"/start\">/start</span></b>"
        );
    }
}
