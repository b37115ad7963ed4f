//! The Bot API as data: every method's parameters and return type, every
//! type's fields.
//!
//! `schema.json` is generated from the scraped documentation by
//! `tools/gen_sandbox_schema.py` (see its docstring) and embedded in the
//! binary, so the sandbox needs no file at run time.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

const SCHEMA_JSON: &str = include_str!("schema.json");

/// A Bot API method.
#[derive(Debug)]
pub(crate) struct Method {
    /// Canonical spelling, e.g. `sendMessage`.
    pub name: String,
    /// Type expression of the result, e.g. `Message or True`.
    pub returns: String,
    pub params: Vec<Param>,
}

impl Method {
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }
}

#[derive(Debug)]
pub(crate) struct Param {
    pub name: String,
    /// Type expression, e.g. `Integer or String`.
    pub ty: String,
    pub required: bool,
}

/// A field of an object type.
#[derive(Debug)]
pub(crate) struct Field {
    pub name: String,
    pub ty: String,
    pub required: bool,
    /// The value the field always has (the discriminator of union members).
    pub constant: Option<String>,
}

#[derive(Debug)]
pub(crate) enum TypeDef {
    Object(Vec<Field>),
    /// An abstract type that is one of the listed object types.
    Union(Vec<String>),
}

impl TypeDef {
    pub fn field(&self, name: &str) -> Option<&Field> {
        match self {
            TypeDef::Object(fields) => fields.iter().find(|f| f.name == name),
            TypeDef::Union(_) => None,
        }
    }
}

/// How Telegram reads a parameter sent as a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParamKind {
    Integer,
    Float,
    Boolean,
    /// `Integer or String`: a chat id or an `@username`.
    IntegerOrString,
    Text,
    /// An uploaded file or a file_id/URL string.
    File,
    /// A JSON-serialized object or array.
    Json,
}

impl ParamKind {
    pub fn of(ty: &str) -> ParamKind {
        match ty {
            "Integer" => ParamKind::Integer,
            "Float" => ParamKind::Float,
            "Boolean" | "True" => ParamKind::Boolean,
            "Integer or String" => ParamKind::IntegerOrString,
            "String" => ParamKind::Text,
            _ if ty.contains("InputFile") => ParamKind::File,
            _ => ParamKind::Json,
        }
    }
}

pub(crate) struct Schema {
    pub version: String,
    methods: HashMap<String, Method>,
    types: HashMap<String, TypeDef>,
    /// Update field names (`message`, `callback_query`, …).
    pub update_types: Vec<String>,
}

impl Schema {
    /// Looks a method up the way Telegram does: case-insensitively.
    pub fn method(&self, name: &str) -> Option<&Method> {
        self.methods.get(&name.to_ascii_lowercase())
    }

    pub fn type_def(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    pub fn is_update_type(&self, name: &str) -> bool {
        self.update_types.iter().any(|t| t == name)
    }
}

#[derive(Deserialize)]
struct RawSchema {
    version: String,
    methods: HashMap<String, RawMethod>,
    types: HashMap<String, RawType>,
    update_types: Vec<String>,
}

#[derive(Deserialize)]
struct RawMethod {
    returns: String,
    params: Vec<(String, String, bool)>,
}

#[derive(Deserialize)]
struct RawType {
    #[serde(default)]
    fields: Vec<(String, String, bool, Option<String>)>,
    #[serde(default)]
    one_of: Vec<String>,
}

fn parse(text: &str) -> serde_json::Result<Schema> {
    let raw: RawSchema = serde_json::from_str(text)?;
    let methods = raw
        .methods
        .into_iter()
        .map(|(name, m)| {
            let params = m
                .params
                .into_iter()
                .map(|(name, ty, required)| Param { name, ty, required })
                .collect();
            (
                name.to_ascii_lowercase(),
                Method {
                    name,
                    returns: m.returns,
                    params,
                },
            )
        })
        .collect();
    let types = raw
        .types
        .into_iter()
        .map(|(name, t)| {
            let def = if t.one_of.is_empty() {
                let fields = t
                    .fields
                    .into_iter()
                    .map(|(name, ty, required, constant)| Field {
                        name,
                        ty,
                        required,
                        constant,
                    })
                    .collect();
                TypeDef::Object(fields)
            } else {
                TypeDef::Union(t.one_of)
            };
            (name, def)
        })
        .collect();
    Ok(Schema {
        version: raw.version,
        methods,
        types,
        update_types: raw.update_types,
    })
}

/// The embedded schema, parsed on first use.
pub(crate) fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        // The file is generated and checked in; `schema_parses` below keeps
        // it valid, so a failure here is a build defect, not a run-time one.
        parse(SCHEMA_JSON).expect("embedded schema.json is valid (see the schema_parses test)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_parses() {
        let schema = parse(SCHEMA_JSON).unwrap();
        assert_eq!(schema.version, "10.2");
        let send = schema.method("SENDmessage").unwrap();
        assert_eq!(send.name, "sendMessage");
        assert_eq!(send.returns, "Message");
        assert!(send.param("chat_id").unwrap().required);
        assert!(schema.is_update_type("callback_query"));
        assert!(matches!(
            schema.type_def("ChatMember"),
            Some(TypeDef::Union(_))
        ));
    }

    #[test]
    fn param_kinds() {
        assert_eq!(
            ParamKind::of("Integer or String"),
            ParamKind::IntegerOrString
        );
        assert_eq!(ParamKind::of("InputFile or String"), ParamKind::File);
        assert_eq!(ParamKind::of("Array of MessageEntity"), ParamKind::Json);
        assert_eq!(
            ParamKind::of("InlineKeyboardMarkup or ReplyKeyboardMarkup"),
            ParamKind::Json
        );
    }
}
