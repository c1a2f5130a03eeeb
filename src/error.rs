//! Errors a client can cause without breaking the WebSocket protocol.
//!
//! Each becomes an error frame (legacy `{"type":"Error",...}` or v1 `{"type":"error",...}`) and
//! the connection stays open. The codes are part of the protocol: stable, snake_case, and one
//! variant maps to exactly one code (tables in README.md and `docs/protocol.md`).

use crate::namespace::ChannelError;

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
    /// A binary frame arrived where only JSON text is understood.
    #[error("binary frames are not supported on this endpoint; send JSON as a text frame")]
    BinaryNotSupported,
    /// The channel name is malformed.
    #[error("invalid channel name: {0}")]
    InvalidChannel(ChannelError),
    /// The channel's namespace is not configured.
    #[error("{0}")]
    UnknownNamespace(ChannelError),
    /// `subscribe` on a channel the connection is already on.
    #[error("already subscribed to {0:?}")]
    AlreadySubscribed(String),
    /// `unsubscribe` on a channel the connection is not on.
    #[error("not subscribed to {0:?}")]
    NotSubscribed(String),
    /// The connection is on as many channels as allowed.
    #[error("a connection may be subscribed to at most {0} channels")]
    TooManyChannels(usize),
    /// The namespace does not allow this to clients.
    #[error("not allowed: {0}")]
    PermissionDenied(&'static str),
    /// The namespace has presence switched off.
    #[error("presence is disabled for this channel's namespace")]
    PresenceDisabled,
    /// `data` is larger than allowed.
    #[error("data is larger than the {0}-byte limit")]
    DataTooBig(usize),
    /// The message could not be delivered or the channel joined (broker failure).
    #[error("not done: {0}")]
    Unavailable(String),
    /// A `refresh` token was refused (the connection keeps its current token).
    #[error("token refused: {0}")]
    InvalidToken(crate::auth::AuthError),
    /// `refresh` on a connection without authentication configured.
    #[error("this server does not use tokens")]
    AuthDisabled,
    /// The connection sends faster than `RUSTY_SOCKS_CLIENT_RATE`; the message was dropped.
    #[error("too many messages: at most {0} per second")]
    RateLimited(u32),
}

impl From<ChannelError> for ClientError {
    fn from(err: ChannelError) -> Self {
        match err {
            ChannelError::InvalidName => Self::InvalidChannel(err),
            ChannelError::UnknownNamespace(_) => Self::UnknownNamespace(err),
        }
    }
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
            Self::BinaryNotSupported => "binary_not_supported",
            Self::InvalidChannel(_) => "invalid_channel",
            Self::UnknownNamespace(_) => "unknown_namespace",
            Self::AlreadySubscribed(_) => "already_subscribed",
            Self::NotSubscribed(_) => "not_subscribed",
            Self::TooManyChannels(_) => "too_many_channels",
            Self::PermissionDenied(_) => "permission_denied",
            Self::PresenceDisabled => "presence_disabled",
            Self::DataTooBig(_) => "data_too_big",
            Self::Unavailable(_) => "unavailable",
            Self::InvalidToken(_) => "invalid_token",
            Self::AuthDisabled => "auth_disabled",
            Self::RateLimited(_) => "rate_limited",
        }
    }
}
