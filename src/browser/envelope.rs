//! Raw JSON handling for CDP messages.
//!
//! The router must rewrite a few envelope members (`id`, `sessionId`) and a few parameters, but
//! must never interpret the rest: Chromium renames and adds fields between versions, and a
//! screenshot result is hundreds of megabytes of base64. So a message is split into its
//! top-level members, each kept as unparsed [`RawValue`] text in the original order, and written
//! back with only the rewritten members changed.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A JSON object whose member values stay unparsed text, in their original order.
#[derive(Debug)]
pub(crate) struct RawObject<'a> {
    pub(crate) members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    /// Parses `text`, which must be one JSON object. Member values are validated as JSON but not
    /// decoded (so lone UTF-16 surrogate escapes, which `serde_json::Value` rejects, pass).
    pub(crate) fn parse(text: &'a str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The value of `key`; for a duplicated key the last one, like `serde_json` does.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// `key` as a string, if present and a string.
    pub(crate) fn get_str(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(Key(key)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((key, value));
                }
                Ok(RawObject { members })
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// A member name, borrowed from the input unless it contained escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Builds one JSON object member by member.
pub(crate) struct ObjWriter {
    buf: String,
    empty: bool,
}

impl ObjWriter {
    /// A writer with room for about `capacity` bytes.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let mut buf = String::with_capacity(capacity + 2);
        buf.push('{');
        ObjWriter { buf, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.buf.push(',');
        }
        self.empty = false;
        push_json_string(&mut self.buf, key);
        self.buf.push(':');
    }

    /// A member whose value is JSON text already validated by the caller.
    pub(crate) fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.buf.push_str(json);
    }

    /// A string member.
    pub(crate) fn string(&mut self, key: &str, value: &str) {
        self.key(key);
        push_json_string(&mut self.buf, value);
    }

    /// An integer member.
    pub(crate) fn int(&mut self, key: &str, value: i64) {
        self.key(key);
        self.buf.push_str(&value.to_string());
    }

    /// The finished object.
    pub(crate) fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// Appends `s` as a JSON string literal. Only `"`, `\` and control characters need escaping
/// (RFC 8259 §7); everything else is valid UTF-8 and may appear literally.
pub(crate) fn push_json_string(buf: &mut String, s: &str) {
    buf.reserve(s.len() + 2);
    buf.push('"');
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escaped = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        buf.push_str(&s[start..i]);
        if escaped.is_empty() {
            buf.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            buf.push_str(escaped);
        }
        start = i + c.len_utf8();
    }
    buf.push_str(&s[start..]);
    buf.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_object_keeps_order_duplicates_and_undecodable_text() {
        let text = r#"{"b":1,"a":{"x":[1,2]},"b":"\ud800","k\"ey":null}"#;
        let obj = RawObject::parse(text).unwrap();
        let keys: Vec<&str> = obj.members.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["b", "a", "b", "k\"ey"]);
        assert_eq!(obj.get("a").unwrap().get(), r#"{"x":[1,2]}"#);
        assert_eq!(obj.get("b").unwrap().get(), r#""\ud800""#);
        assert!(RawObject::parse("[1]").is_err());
        assert!(RawObject::parse("{").is_err());
    }

    #[test]
    fn writer_round_trips_through_serde_json() {
        let tricky = [
            "",
            "plain",
            "quote\" backslash\\ slash/",
            "\u{0}\u{1}\u{1f}\n\r\t",
            "é 中文 🎉 \u{7f} \u{2028}",
        ];
        for s in tricky {
            let mut w = ObjWriter::with_capacity(0);
            w.string(s, s);
            w.int("n", -42);
            w.raw("r", "[true,null]");
            let out = w.finish();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v[s], serde_json::Value::from(s), "{out}");
            assert_eq!(v["n"], -42);
            assert_eq!(v["r"], serde_json::json!([true, null]));
            assert!(!out.contains('\0'));
        }
        assert_eq!(ObjWriter::with_capacity(0).finish(), "{}");
    }
}
