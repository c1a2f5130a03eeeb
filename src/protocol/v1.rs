//! Protocol v1: channels, presence and history (see `docs/protocol.md`).
//!
//! A v1 message is a JSON object whose `type` is one of the lower-case commands below. Messages
//! without `type`, or with `"type":"Chat"`, belong to the legacy dialect, so both kinds share
//! one endpoint. Every command may carry an `id` (a JSON number or string) that is echoed in its
//! reply or error.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::types::ClientId;
use crate::types::ClientInfo;
use crate::types::error::ClientError;
use crate::types::{Publication, StreamPosition};

/// Most publications one `history` reply carries.
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// Longest `idempotency_key`, in bytes: enough for a UUID with a prefix, short enough that
/// remembering many keys per channel stays cheap.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Checks an `idempotency_key` (of a v1 `publish`, or of the server API): 1 to
/// [`MAX_IDEMPOTENCY_KEY`] bytes without control characters (it travels in a NATS header).
pub fn check_idempotency_key(key: &str) -> Result<(), ClientError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || key.chars().any(char::is_control) {
        return Err(idempotency_key_error());
    }
    Ok(())
}

fn idempotency_key_error() -> ClientError {
    ClientError::InvalidField {
        field: "idempotency_key",
        expected: "a string of 1 to 128 bytes without control characters",
    }
}

/// A v1 command.
#[derive(Debug)]
pub enum Command<'a> {
    /// Join a channel, optionally recovering what was missed since a position.
    Subscribe {
        /// Channel name.
        channel: String,
        /// Last position the client saw.
        since: Option<StreamPosition>,
    },
    /// Leave a channel.
    Unsubscribe {
        /// Channel name.
        channel: String,
    },
    /// Publish a JSON value.
    Publish {
        /// Channel name.
        channel: String,
        /// The value, verbatim.
        data: &'a RawValue,
        /// Makes a retry safe: the same key on the same channel is published once.
        idempotency_key: Option<String>,
    },
    /// Who is on a channel.
    Presence {
        /// Channel name.
        channel: String,
    },
    /// Read history.
    History {
        /// Channel name.
        channel: String,
        /// Most publications to return.
        limit: Option<usize>,
        /// Only publications after this position.
        since: Option<StreamPosition>,
    },
    /// A new token for this connection (the answer to a `refresh` push).
    Refresh {
        /// The JWT.
        token: String,
    },
}

/// What a text message turned out to be.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// A legacy chat message (no `type`, or `"type":"Chat"`); parse it with the legacy parser.
    Legacy,
    /// A message that is not even a valid legacy or v1 message at the top level; answered in
    /// the legacy error shape, which is all a client that sent it can be assumed to know.
    Invalid(ClientError),
    /// A v1 command with its id.
    Command(Option<&'a RawValue>, Command<'a>),
    /// A v1 command that is malformed; answered with a v1 `error` carrying the id.
    BadCommand(Option<&'a RawValue>, ClientError),
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type")]
    kind: Option<Value>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    channel: Option<Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    since: Option<Value>,
    limit: Option<Value>,
    token: Option<Value>,
    idempotency_key: Option<Value>,
}

/// Sorts a text message into legacy, v1 command, or error.
pub fn parse(text: &str) -> Parsed<'_> {
    let raw: Raw<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            return Parsed::Invalid(match serde_json::from_str::<Value>(text) {
                Ok(value) => ClientError::NotAnObject(super::json_kind(&value)),
                Err(_) => ClientError::InvalidJson(err.to_string()),
            });
        }
    };
    let kind = match &raw.kind {
        None | Some(Value::Null) => return Parsed::Legacy,
        Some(Value::String(kind)) if kind == "Chat" => return Parsed::Legacy,
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => {
            return Parsed::Invalid(ClientError::InvalidField {
                field: "type",
                expected: "a string",
            });
        }
    };
    let id = raw.id.filter(|id| id.get() != "null");
    if !matches!(
        kind,
        "subscribe" | "unsubscribe" | "publish" | "presence" | "history" | "refresh"
    ) {
        let err = ClientError::UnknownType(kind.to_owned());
        // Lower-case types are the v1 convention: answer in v1, with the command's id.
        return if kind.starts_with(|c: char| c.is_ascii_lowercase()) {
            Parsed::BadCommand(id.filter(|id| valid_id(id)), err)
        } else {
            Parsed::Invalid(err)
        };
    }
    if let Some(id) = id
        && !valid_id(id)
    {
        return Parsed::BadCommand(
            None,
            ClientError::InvalidField {
                field: "id",
                expected: "a number or a string",
            },
        );
    }
    match command(kind, &raw) {
        Ok(command) => Parsed::Command(id, command),
        Err(err) => Parsed::BadCommand(id, err),
    }
}

/// Sorts a text message from a connection that speaks v1 only (it offered the
/// `rusty-socks.v1` subprotocol): what [`parse`] would call legacy or invalid is a malformed
/// v1 command here, answered with a v1 `error`, because such a client gets no legacy frames.
pub fn parse_v1_only(text: &str) -> Parsed<'_> {
    match parse(text) {
        Parsed::Legacy => {
            // Only reached when `text` is an object whose `type` is absent, null or "Chat".
            let raw: Option<Raw<'_>> = serde_json::from_str(text).ok();
            let id = raw
                .as_ref()
                .and_then(|raw| raw.id)
                .filter(|id| id.get() != "null" && valid_id(id));
            let err = match raw.and_then(|raw| raw.kind) {
                Some(Value::String(kind)) => ClientError::UnknownType(kind),
                _ => ClientError::MissingField("type"),
            };
            Parsed::BadCommand(id, err)
        }
        Parsed::Invalid(err) => Parsed::BadCommand(None, err),
        parsed => parsed,
    }
}

/// Ids are JSON numbers or strings.
fn valid_id(id: &RawValue) -> bool {
    let first = id.get().as_bytes().first().copied().unwrap_or(b' ');
    first == b'"' || first == b'-' || first.is_ascii_digit()
}

fn command<'a>(kind: &str, raw: &Raw<'a>) -> Result<Command<'a>, ClientError> {
    if kind == "refresh" {
        return match &raw.token {
            None | Some(Value::Null) => Err(ClientError::MissingField("token")),
            Some(Value::String(token)) => Ok(Command::Refresh {
                token: token.clone(),
            }),
            Some(_) => Err(ClientError::InvalidField {
                field: "token",
                expected: "a string",
            }),
        };
    }
    let channel = match &raw.channel {
        None | Some(Value::Null) => return Err(ClientError::MissingField("channel")),
        Some(Value::String(channel)) => channel.clone(),
        Some(_) => {
            return Err(ClientError::InvalidField {
                field: "channel",
                expected: "a string",
            });
        }
    };
    Ok(match kind {
        "subscribe" => Command::Subscribe {
            channel,
            since: since(raw)?,
        },
        "unsubscribe" => Command::Unsubscribe { channel },
        "publish" => Command::Publish {
            channel,
            data: checked_data(raw.data.ok_or(ClientError::MissingField("data"))?)?,
            idempotency_key: match &raw.idempotency_key {
                None | Some(Value::Null) => None,
                Some(Value::String(key)) => {
                    check_idempotency_key(key)?;
                    Some(key.clone())
                }
                Some(_) => return Err(idempotency_key_error()),
            },
        },
        "presence" => Command::Presence { channel },
        _ => Command::History {
            channel,
            limit: match &raw.limit {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    // Compared in 64 bits: a cast first would truncate on a 32-bit target.
                    Some(n) if n <= MAX_HISTORY_LIMIT as u64 => Some(n as usize),
                    _ => return Err(limit_error()),
                },
                Some(_) => return Err(limit_error()),
            },
            since: since(raw)?,
        },
    })
}

/// A publish's `data`, held to the rules of the frame around it (see [`super::data`]).
fn checked_data(data: &RawValue) -> Result<&RawValue, ClientError> {
    super::data::check_data(data.get()).map_err(ClientError::InvalidData)?;
    Ok(data)
}

fn limit_error() -> ClientError {
    ClientError::InvalidField {
        field: "limit",
        expected: "a whole number from 0 to 1000",
    }
}

fn since(raw: &Raw<'_>) -> Result<Option<StreamPosition>, ClientError> {
    match &raw.since {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|_| ClientError::InvalidField {
                field: "since",
                expected: "an object {\"offset\": <whole number>, \"epoch\": <string>}",
            }),
    }
}

/// Every v1 frame the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Frame<'a> {
    /// Reply to `subscribe`.
    Subscribed {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Channel name.
        channel: &'a str,
        /// Offset of the last publication before live delivery starts.
        offset: u64,
        /// The stream's epoch.
        epoch: &'a str,
        /// Whether `since` was given and everything after it is in `publications`.
        recovered: bool,
        /// What was missed (only when recovered).
        publications: &'a [Publication],
    },
    /// Reply to `unsubscribe`.
    Unsubscribed {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Channel name.
        channel: &'a str,
    },
    /// Reply to `publish`.
    Published {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Channel name.
        channel: &'a str,
        /// The publication's offset.
        offset: u64,
        /// The `idempotency_key` was used before: nothing was published, `offset` is the
        /// first publish's (sent only when true).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    /// Reply to `presence`.
    Presence {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Channel name.
        channel: &'a str,
        /// One entry per subscribed connection.
        clients: &'a [ClientInfo],
    },
    /// Reply to `history`.
    History {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Channel name.
        channel: &'a str,
        /// Current offset.
        offset: u64,
        /// Current epoch.
        epoch: &'a str,
        /// Oldest first.
        publications: &'a [Publication],
        /// With `since`: whether `publications` start right after it, in the same epoch (no
        /// publication in between was lost to history bounds or a new epoch).
        #[serde(skip_serializing_if = "Option::is_none")]
        complete: Option<bool>,
    },
    /// A command failed; the connection stays open.
    Error {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Stable snake_case code.
        code: &'static str,
        /// Human sentence.
        message: String,
    },
    /// A live publication.
    Publication {
        /// Channel name.
        channel: &'a str,
        /// Its offset.
        offset: u64,
        /// The epoch of the stream `offset` belongs to. A client that subscribed before the
        /// channel's first publication holds the epoch `""` and takes this one; one whose
        /// epoch differs knows the stream restarted and its old offsets mean nothing here.
        epoch: &'a str,
        /// The value.
        data: &'a RawValue,
        /// The publisher, if a client.
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<ClientId>,
    },
    /// Someone subscribed.
    Join {
        /// Channel name.
        channel: &'a str,
        /// Who.
        client: &'a ClientInfo,
    },
    /// Someone left.
    Leave {
        /// Channel name.
        channel: &'a str,
        /// Who.
        client: &'a ClientInfo,
    },
    /// This client's outbox overflowed: publications after `offset` were dropped for it;
    /// fetch them with `history` (`since` = this offset).
    Gap {
        /// Channel name.
        channel: &'a str,
        /// The last offset this client got.
        offset: u64,
    },
    /// The connection's token expires soon: answer with a `refresh` command and a new token.
    Refresh {
        /// When the current token expires (seconds since the Unix epoch).
        expires_at: u64,
    },
    /// The first frame of a `rusty-socks.v1` connection: who it is, before anything else
    /// (such a connection gets no legacy `Connect`, so this is where it learns its id).
    Welcome {
        /// The connection's id (as in presence, `join`, `leave` and `client_id` of its
        /// publications).
        client_id: ClientId,
        /// The server's version, for client logs and feature checks.
        version: &'a str,
        /// The token's `sub`, `null` for an anonymous connection.
        user: Option<&'a str>,
        /// When the connection's token expires (seconds since the Unix epoch), if it does.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// Reply to `refresh`.
    Refreshed {
        /// The command's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// When the new token expires (seconds since the Unix epoch), if it does.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
}

impl Frame<'_> {
    /// The JSON text of this frame.
    pub fn to_json(&self) -> String {
        super::to_json(
            self,
            r#"{"type":"error","code":"internal","message":"could not encode frame"}"#,
        )
    }

    /// The error frame for a failed command.
    pub fn error<'a>(id: Option<&'a RawValue>, err: &ClientError) -> Frame<'a> {
        Frame::Error {
            id,
            code: err.code(),
            message: err.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(text: &str) -> (Option<String>, Command<'_>) {
        match parse(text) {
            Parsed::Command(id, c) => (id.map(|i| i.get().to_owned()), c),
            other => panic!("{text}: {other:?}"),
        }
    }

    fn bad(text: &str) -> (Option<String>, &'static str) {
        match parse(text) {
            Parsed::BadCommand(id, e) => (id.map(|i| i.get().to_owned()), e.code()),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn parses_every_command() {
        let (id, c) = command(
            r#"{"type":"subscribe","id":1,"channel":"chat:lobby","since":{"offset":12,"epoch":"ab"}}"#,
        );
        assert_eq!(id.as_deref(), Some("1"));
        match c {
            Command::Subscribe { channel, since } => {
                assert_eq!(channel, "chat:lobby");
                assert_eq!(
                    since,
                    Some(StreamPosition {
                        offset: 12,
                        epoch: "ab".into()
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        let (id, c) = command(r#"{"type":"publish","id":"x","channel":"c","data":{"a":[1,2]}}"#);
        assert_eq!(id.as_deref(), Some("\"x\""));
        match c {
            Command::Publish {
                data,
                idempotency_key,
                ..
            } => {
                assert_eq!(data.get(), r#"{"a":[1,2]}"#);
                assert_eq!(idempotency_key, None);
            }
            other => panic!("{other:?}"),
        }
        match command(r#"{"type":"publish","channel":"c","data":1,"idempotency_key":"k-1"}"#).1 {
            Command::Publish {
                idempotency_key, ..
            } => assert_eq!(idempotency_key.as_deref(), Some("k-1")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            command(r#"{"type":"unsubscribe","channel":"c"}"#).1,
            Command::Unsubscribe { .. }
        ));
        assert!(matches!(
            command(r#"{"type":"presence","channel":"c"}"#).1,
            Command::Presence { .. }
        ));
        assert!(matches!(
            command(r#"{"type":"history","channel":"c","limit":5}"#).1,
            Command::History {
                limit: Some(5),
                since: None,
                ..
            }
        ));
    }

    #[test]
    fn legacy_and_invalid_are_told_apart() {
        assert!(matches!(
            parse(r#"{"sender":"a","content":"b"}"#),
            Parsed::Legacy
        ));
        assert!(matches!(
            parse(r#"{"type":"Chat","sender":"a"}"#),
            Parsed::Legacy
        ));
        assert!(matches!(
            parse("{nope"),
            Parsed::Invalid(ClientError::InvalidJson(_))
        ));
        assert!(matches!(
            parse("[1]"),
            Parsed::Invalid(ClientError::NotAnObject(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"Shout"}"#),
            Parsed::Invalid(ClientError::UnknownType(_))
        ));
        match parse(r#"{"type":"shout","id":4}"#) {
            Parsed::BadCommand(Some(id), ClientError::UnknownType(_)) => assert_eq!(id.get(), "4"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"type":5}"#),
            Parsed::Invalid(ClientError::InvalidField { .. })
        ));
    }

    #[test]
    fn a_v1_only_connection_gets_v1_errors_for_legacy_and_invalid_messages() {
        let bad_v1 = |text| match parse_v1_only(text) {
            Parsed::BadCommand(id, e) => (id.map(|i| i.get().to_owned()), e.code()),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            bad_v1(r#"{"sender":"a","content":"b","id":"x"}"#),
            (Some("\"x\"".into()), "missing_field")
        );
        assert_eq!(
            bad_v1(r#"{"type":"Chat","sender":"a"}"#),
            (None, "unknown_type")
        );
        assert_eq!(bad_v1("{nope"), (None, "invalid_json"));
        assert_eq!(bad_v1("[1]"), (None, "invalid_message"));
        assert_eq!(bad_v1(r#"{"type":"Shout"}"#), (None, "unknown_type"));
        assert_eq!(bad_v1(r#"{"type":5}"#), (None, "invalid_field"));
        assert!(matches!(
            parse_v1_only(r#"{"type":"presence","id":1,"channel":"c"}"#),
            Parsed::Command(Some(_), Command::Presence { .. })
        ));
    }

    #[test]
    fn malformed_commands_keep_their_id() {
        assert_eq!(
            bad(r#"{"type":"subscribe","id":7}"#),
            (Some("7".into()), "missing_field")
        );
        assert_eq!(
            bad(r#"{"type":"subscribe","id":7,"channel":3}"#),
            (Some("7".into()), "invalid_field")
        );
        assert_eq!(
            bad(r#"{"type":"publish","id":8,"channel":"c"}"#),
            (Some("8".into()), "missing_field")
        );
        assert_eq!(
            bad(r#"{"type":"history","id":9,"channel":"c","limit":-1}"#),
            (Some("9".into()), "invalid_field")
        );
        assert_eq!(
            bad(r#"{"type":"history","channel":"c","limit":1001}"#),
            (None, "invalid_field")
        );
        assert_eq!(
            bad(r#"{"type":"subscribe","channel":"c","since":{"offset":"x"}}"#),
            (None, "invalid_field")
        );
        assert_eq!(
            bad(r#"{"type":"subscribe","id":{"a":1},"channel":"c"}"#),
            (None, "invalid_field")
        );
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
        for key in [r#""""#, "5", r#""a\nb""#, &format!("\"{long}\"")] {
            let text = format!(
                r#"{{"type":"publish","id":1,"channel":"c","data":1,"idempotency_key":{key}}}"#
            );
            assert_eq!(bad(&text), (Some("1".into()), "invalid_field"), "{key}");
        }
        let longest = "k".repeat(MAX_IDEMPOTENCY_KEY);
        assert!(check_idempotency_key(&longest).is_ok());
        // Hostile data: syntactically JSON, refused before anything is stored.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        for data in [deep.as_str(), "1e400", r#"{"n":-1e400}"#, r#""\ud800""#] {
            let text = format!(r#"{{"type":"publish","id":2,"channel":"c","data":{data}}}"#);
            assert_eq!(bad(&text), (Some("2".into()), "invalid_data"), "{data:.20}");
        }
    }

    #[test]
    fn frames_have_the_contract_shapes() {
        let id = RawValue::from_string("3".into()).expect("json");
        assert_eq!(
            Frame::Published {
                id: Some(&id),
                channel: "c",
                offset: 9,
                duplicate: false,
            }
            .to_json(),
            r#"{"type":"published","id":3,"channel":"c","offset":9}"#
        );
        assert_eq!(
            Frame::Published {
                id: None,
                channel: "c",
                offset: 9,
                duplicate: true,
            }
            .to_json(),
            r#"{"type":"published","channel":"c","offset":9,"duplicate":true}"#
        );
        assert_eq!(
            Frame::Gap {
                channel: "c",
                offset: 4
            }
            .to_json(),
            r#"{"type":"gap","channel":"c","offset":4}"#
        );
        let client_id = ClientId::nil();
        assert_eq!(
            Frame::Welcome {
                client_id,
                version: "1.2.3",
                user: None,
                expires_at: None
            }
            .to_json(),
            r#"{"type":"welcome","client_id":"00000000-0000-0000-0000-000000000000","version":"1.2.3","user":null}"#
        );
        assert_eq!(
            Frame::Welcome {
                client_id,
                version: "1.2.3",
                user: Some("ann"),
                expires_at: Some(7)
            }
            .to_json(),
            r#"{"type":"welcome","client_id":"00000000-0000-0000-0000-000000000000","version":"1.2.3","user":"ann","expires_at":7}"#
        );
        let data = RawValue::from_string(r#"{"x":1}"#.into()).expect("json");
        assert_eq!(
            Frame::Publication {
                channel: "c",
                offset: 1,
                epoch: "e1",
                data: &data,
                client_id: None
            }
            .to_json(),
            r#"{"type":"publication","channel":"c","offset":1,"epoch":"e1","data":{"x":1}}"#
        );
    }
}
