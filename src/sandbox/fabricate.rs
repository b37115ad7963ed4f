//! Plausible values of Bot API types, for results the sandbox has no real
//! data for: every required field present, with a value of the right type.

use serde_json::{json, Map, Value};

use super::schema::{schema, TypeDef};

/// Nesting depth past which objects are left empty; no required field chain
/// of the API is that deep, but the types are recursive.
const MAX_DEPTH: usize = 8;

/// Builds values in the context of one call: users default to the bot,
/// chats to the call's chat.
pub(crate) struct Fabricator<'a> {
    pub bot: &'a Value,
    pub chat: Option<&'a Value>,
    pub now: i64,
    /// Source of unique identifiers.
    pub serial: &'a mut u64,
}

impl Fabricator<'_> {
    /// A value of the type expression `ty` for a field called `field`.
    pub fn value(&mut self, ty: &str, field: &str) -> Value {
        self.value_at(ty, field, 0)
    }

    fn value_at(&mut self, ty: &str, field: &str, depth: usize) -> Value {
        // "Message or True": the first alternative is the informative one.
        if let Some((first, _)) = ty.split_once(" or ") {
            return self.value_at(first, field, depth);
        }
        if ty.starts_with("Array of ") {
            return json!([]);
        }
        match ty {
            "True" => Value::Bool(true),
            "Boolean" => Value::Bool(false),
            "Integer" => self.integer(field),
            "Float" => json!(0.0),
            "String" => self.string(field),
            "User" => self.bot.clone(),
            "Chat" => self
                .chat
                .cloned()
                .unwrap_or_else(|| json!({"id": self.bot["id"], "type": "private"})),
            _ => self.object_at(ty, depth + 1),
        }
    }

    fn object_at(&mut self, name: &str, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return json!({});
        }
        match schema().type_def(name) {
            Some(TypeDef::Union(members)) => match members.first() {
                Some(member) => self.object_at(member, depth),
                None => json!({}),
            },
            Some(TypeDef::Object(fields)) => {
                let mut object = Map::new();
                for field in fields.iter().filter(|f| f.required) {
                    let value = match &field.constant {
                        Some(constant) => Value::String(constant.clone()),
                        None => self.value_at(&field.ty, &field.name, depth),
                    };
                    object.insert(field.name.clone(), value);
                }
                Value::Object(object)
            }
            None => json!({}),
        }
    }

    fn fresh(&mut self) -> u64 {
        *self.serial += 1;
        *self.serial
    }

    fn integer(&mut self, field: &str) -> Value {
        if field == "date" || field.ends_with("_date") {
            return self.now.into();
        }
        if is_identifier(field) {
            return self.fresh().into();
        }
        match field {
            "width" | "height" => 512.into(),
            _ => 0.into(),
        }
    }

    fn string(&mut self, field: &str) -> Value {
        let n = self.fresh();
        let text = match field {
            "file_id" => format!("SBX{n:08}file"),
            "file_unique_id" => format!("SBX{n:08}"),
            "currency" => "XTR".to_string(),
            _ if field.ends_with("link") || field.ends_with("url") => {
                format!("https://t.me/+sandbox{n}")
            }
            _ if is_identifier(field) => n.to_string(),
            _ => "sandbox".to_string(),
        };
        Value::String(text)
    }
}

/// Whether a field holds an identifier, which a call's parameters must
/// never overwrite and which must be fresh in new objects.
pub(crate) fn is_identifier(field: &str) -> bool {
    field == "id" || field.ends_with("_id")
}

/// Whether `value` has the JSON shape of type expression `ty`.
fn fits(ty: &str, value: &Value) -> bool {
    match value {
        Value::String(_) => ty == "String",
        Value::Number(n) => ty == "Float" || (ty == "Integer" && n.is_i64()),
        Value::Bool(_) => ty == "Boolean" || ty == "True",
        Value::Array(_) => ty.starts_with("Array of "),
        Value::Object(_) => {
            !matches!(ty, "String" | "Integer" | "Float" | "Boolean" | "True")
                && !ty.starts_with("Array of ")
        }
        Value::Null => false,
    }
}

/// Copies into `object` (of type `ty`) the call parameters that name one of
/// its fields, so results reflect what was asked (a created invite link has
/// the requested name, a sent location the requested coordinates).
pub(crate) fn overlay(object: &mut Value, ty: &str, params: &Map<String, Value>) {
    let (Some(TypeDef::Object(fields)), Value::Object(target)) = (schema().type_def(ty), object)
    else {
        return;
    };
    for field in fields {
        if field.constant.is_some() || is_identifier(&field.name) {
            continue;
        }
        if let Some(value) = params.get(&field.name).filter(|v| fits(&field.ty, v)) {
            target.insert(field.name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabricate(ty: &str) -> Value {
        let bot = json!({"id": 1, "is_bot": true, "first_name": "B"});
        let mut serial = 0;
        Fabricator {
            bot: &bot,
            chat: None,
            now: 1_700_000_000,
            serial: &mut serial,
        }
        .value(ty, "result")
    }

    #[test]
    fn objects_have_required_fields_and_constants() {
        let member = fabricate("ChatMember");
        assert_eq!(member["status"], "creator");
        assert_eq!(member["user"]["id"], 1);
        let link = fabricate("ChatInviteLink");
        assert!(link["invite_link"]
            .as_str()
            .unwrap()
            .starts_with("https://t.me/+"));
        assert_eq!(link["is_revoked"], false);
        assert_eq!(fabricate("Array of Sticker"), json!([]));
        assert_eq!(fabricate("Message or True")["date"], 1_700_000_000);
    }

    #[test]
    fn overlay_copies_matching_params_only() {
        let mut link = fabricate("ChatInviteLink");
        let params =
            json!({"name": "vip", "member_limit": 5, "chat_id": 3, "creates_join_request": "yes"});
        overlay(&mut link, "ChatInviteLink", params.as_object().unwrap());
        assert_eq!(link["name"], "vip");
        assert_eq!(link["member_limit"], 5);
        assert_eq!(
            link["creates_join_request"], false,
            "a string does not fit a Boolean"
        );
    }
}
