//! What travels inside WebSocket messages.
//!
//! Two dialects share `/ws`: [`legacy`], the JSON shapes of the original Rusty Socks, and
//! [`v1`], channels with presence and history. They are told apart by the `type` field, so
//! legacy clients keep working unchanged. [`data`] holds what is stored and replayed to the
//! rules of the frames around it.

pub mod data;
pub mod legacy;
pub mod v1;

/// Encodes a server frame as JSON. Serializing the frame structs cannot fail (no maps with
/// non-string keys, no custom serializers); `fallback` is sent instead of panicking regardless.
pub(crate) fn to_json(frame: &impl serde::Serialize, fallback: &str) -> String {
    serde_json::to_string(frame).unwrap_or_else(|_| fallback.to_owned())
}

/// How a JSON value's type is named in error messages ("a number", "an array", ...).
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
