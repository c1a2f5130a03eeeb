//! Errors a client can cause without breaking the WebSocket protocol.
//!
//! Each becomes an `{"type":"Error","code":...,"message":...}` frame and the connection stays
//! open. The codes are part of the protocol (see `docs/protocol.md`): they are stable,
//! snake_case, and one variant maps to exactly one code.

/// A message the server understood at the WebSocket level but cannot act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The text frame was not JSON.
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    /// The JSON was not an object.
    #[error("message must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// A required field was absent.
    #[error("field `{0}` is required")]
    MissingField(&'static str),
    /// A field had the wrong type or format.
    #[error("field `{field}` must be {expected}")]
    InvalidField {
        /// The field at fault.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The `type` field named something this endpoint does not handle.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// The message could not be delivered or the channel joined (broker failure).
    #[error("message not delivered: {0}")]
    Unavailable(String),
    /// A binary frame arrived where only JSON text is understood.
    #[error("binary frames are not supported on this endpoint; send JSON as a text frame")]
    BinaryNotSupported,
}

impl ClientError {
    /// The stable machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::NotAnObject(_) => "invalid_message",
            Self::MissingField(_) => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownType(_) => "unknown_type",
            Self::Unavailable(_) => "unavailable",
            Self::BinaryNotSupported => "binary_not_supported",
        }
    }
}
