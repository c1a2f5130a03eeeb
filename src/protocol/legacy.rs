//! The original Rusty Socks wire format ("legacy" dialect), as recorded in COMPAT.md.
//!
//! Server frames are built by hand-written `serde` structs so that field order and names are
//! exactly the contract; client messages are parsed from a `serde_json::Value` so every kind of
//! mistake gets its own precise error instead of serde's generic one.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::types::error::ClientError;

/// A chat message as stored, replayed and broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chat {
    /// The message id: the client's if it sent one, otherwise assigned by the server.
    pub id: Uuid,
    /// Free-form sender name chosen by the client.
    pub sender: String,
    /// The message text.
    pub content: String,
    /// RFC 3339 time in UTC: the client's if it sent one, otherwise the server's receive time.
    pub timestamp: String,
}

/// Every frame the server sends in the legacy dialect.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum ServerFrame<'a> {
    /// Sent first on every connection.
    Connect {
        /// The id the server assigned to this connection.
        client_id: Uuid,
    },
    /// A chat message from another client (or from history).
    Chat(&'a Chat),
    /// Another client went away.
    Disconnect {
        /// Which one.
        client_id: Uuid,
    },
    /// The last message could not be handled; the connection stays open.
    Error {
        /// Stable snake_case code.
        code: &'static str,
        /// Human-readable sentence.
        message: String,
    },
}

impl ServerFrame<'_> {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        super::to_json(
            self,
            r#"{"type":"Error","code":"internal","message":"could not encode frame"}"#,
        )
    }

    /// The error frame for a client mistake.
    pub fn error(err: &ClientError) -> ServerFrame<'static> {
        ServerFrame::Error {
            code: err.code(),
            message: err.to_string(),
        }
    }
}

/// Parses a client's chat message, filling in what the README's examples leave out.
///
/// `now` is used when the message carries no timestamp. Unknown fields are ignored, as the
/// original did; `"type":"Chat"` is allowed. `user` is the token's `sub` on an authenticated
/// connection: it replaces whatever `sender` the client wrote (which must still be a string,
/// so one message shape fits every connection), because a name the server verified must not
/// be forgeable by the client. Anonymous connections (`None`) keep the original free-form
/// `sender`.
pub fn parse_chat(
    text: &str,
    now: OffsetDateTime,
    user: Option<&str>,
) -> Result<Chat, ClientError> {
    // Syntax first (a `RawValue` has no nesting limit), so broken JSON is `invalid_json`;
    // then the data rules, so hostile JSON is `invalid_data` rather than a parser's complaint.
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| ClientError::InvalidJson(e.to_string()))?;
    super::data::check_data(raw.get()).map_err(ClientError::InvalidData)?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| ClientError::InvalidJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(ClientError::NotAnObject(super::json_kind(&value)));
    };
    match map.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "Chat" => {}
        Some(Value::String(t)) => return Err(ClientError::UnknownType(t.clone())),
        Some(_) => {
            return Err(ClientError::InvalidField {
                field: "type",
                expected: "a string",
            });
        }
    }
    let id = match present(&map, "id") {
        None => Uuid::new_v4(),
        Some(Value::String(s)) => Uuid::parse_str(s).map_err(|_| ClientError::InvalidField {
            field: "id",
            expected: "a UUID string",
        })?,
        Some(_) => {
            return Err(ClientError::InvalidField {
                field: "id",
                expected: "a UUID string",
            });
        }
    };
    const TIMESTAMP: ClientError = ClientError::InvalidField {
        field: "timestamp",
        expected: "an RFC 3339 date-time string within years 0000-9999 in UTC",
    };
    let timestamp = match present(&map, "timestamp") {
        None => now,
        Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339).map_err(|_| TIMESTAMP)?,
        Some(_) => return Err(TIMESTAMP),
    };
    let sender = required_string(&map, "sender")?;
    Ok(Chat {
        id,
        sender: user.map_or(sender, str::to_owned),
        content: required_string(&map, "content")?,
        timestamp: format_utc(timestamp).ok_or(TIMESTAMP)?,
    })
}

/// Formats a time as RFC 3339 in UTC (`...Z`); `None` if it has no UTC form RFC 3339 can
/// express (a year outside 0000-9999 once converted).
pub fn format_utc(t: OffsetDateTime) -> Option<String> {
    t.checked_to_offset(time::UtcOffset::UTC)?
        .format(&Rfc3339)
        .ok()
}

fn present<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    map.get(field).filter(|v| !v.is_null())
}

fn required_string(map: &Map<String, Value>, field: &'static str) -> Result<String, ClientError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(ClientError::MissingField(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ClientError::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid time")
    }

    #[test]
    fn wscat_example_is_kept_as_sent() {
        let chat = parse_chat(
            r#"{"id":"00000000-0000-0000-0000-000000000000","sender":"test_user","content":"Hello from wscat!","timestamp":"2025-03-15T12:00:00Z"}"#,
            now(),
            None,
        )
        .expect("valid");
        assert_eq!(chat.id, Uuid::nil());
        assert_eq!(chat.sender, "test_user");
        assert_eq!(chat.timestamp, "2025-03-15T12:00:00Z");
    }

    #[test]
    fn javascript_example_gets_an_id() {
        let chat = parse_chat(
            r#"{"sender":"client","content":"Hello from JS client","timestamp":"2025-03-15T12:00:00.123Z"}"#,
            now(),
            None,
        )
        .expect("valid");
        assert_ne!(chat.id, Uuid::nil());
        assert_eq!(chat.id.get_version_num(), 4);
    }

    #[test]
    fn missing_timestamp_is_the_server_time_and_offsets_become_utc() {
        let chat = parse_chat(r#"{"sender":"a","content":"b"}"#, now(), None).expect("valid");
        assert_eq!(chat.timestamp, "2023-11-14T22:13:20Z");
        let chat = parse_chat(
            r#"{"sender":"a","content":"b","timestamp":"2025-03-15T14:00:00+02:00","type":"Chat","extra":1}"#,
            now(),
            None,
        )
        .expect("valid");
        assert_eq!(chat.timestamp, "2025-03-15T12:00:00Z");
    }

    #[test]
    fn a_token_user_replaces_the_sender_the_client_wrote() {
        let text = r#"{"sender":"mallory","content":"hi"}"#;
        let chat = parse_chat(text, now(), Some("gil")).expect("valid");
        assert_eq!((chat.sender.as_str(), chat.content.as_str()), ("gil", "hi"));
        assert_eq!(
            parse_chat(text, now(), None).expect("valid").sender,
            "mallory"
        );
        // The shape is checked all the same.
        let err = parse_chat(r#"{"content":"hi"}"#, now(), Some("gil")).expect_err("no sender");
        assert_eq!(err.code(), "missing_field");
    }

    #[test]
    fn each_mistake_has_its_own_code() {
        let cases = [
            ("{not json", "invalid_json"),
            ("[1,2]", "invalid_message"),
            ("42", "invalid_message"),
            (r#"{"content":"x"}"#, "missing_field"),
            (r#"{"sender":1,"content":"x"}"#, "invalid_field"),
            (r#"{"sender":"a","content":["x"]}"#, "invalid_field"),
            (
                r#"{"sender":"a","content":"x","id":"nope"}"#,
                "invalid_field",
            ),
            (
                r#"{"sender":"a","content":"x","timestamp":"yesterday"}"#,
                "invalid_field",
            ),
            (
                r#"{"sender":"a","content":"x","type":"Shout"}"#,
                "unknown_type",
            ),
            (r#"{"sender":"a","content":"x","n":1e400}"#, "invalid_data"),
            (r#"{"sender":"a","content":"\udc00"}"#, "invalid_data"),
        ];
        for (text, code) in cases {
            let err = parse_chat(text, now(), None).expect_err(text);
            assert_eq!(err.code(), code, "{text}");
        }
    }

    #[test]
    fn frames_have_the_contract_shapes() {
        let id = Uuid::nil();
        assert_eq!(
            ServerFrame::Connect { client_id: id }.to_json(),
            r#"{"type":"Connect","client_id":"00000000-0000-0000-0000-000000000000"}"#
        );
        let chat = Chat {
            id,
            sender: "s".into(),
            content: "c".into(),
            timestamp: "2025-03-15T12:00:00Z".into(),
        };
        assert_eq!(
            ServerFrame::Chat(&chat).to_json(),
            r#"{"type":"Chat","id":"00000000-0000-0000-0000-000000000000","sender":"s","content":"c","timestamp":"2025-03-15T12:00:00Z"}"#
        );
        let err = ServerFrame::error(&ClientError::BinaryNotSupported).to_json();
        assert!(err.starts_with(r#"{"type":"Error","code":"binary_not_supported","message":""#));
    }
}
