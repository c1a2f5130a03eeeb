//! Errors a client can cause without breaking the WebSocket protocol.
//!
//! Each becomes an error frame (legacy `{"type":"Error",...}` or v1 `{"type":"error",...}`) and
//! the connection stays open. The codes are part of the protocol: stable, snake_case, and one
//! variant maps to exactly one code (tables in README.md and `docs/protocol.md`).

use super::channel::ChannelError;

/// Largest token accepted, in bytes: a token is carried in a URL or header, and verifying a
/// huge one would be work an attacker gets for free.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Why a token was refused. Every variant is answered with HTTP 401 before the upgrade, or an
/// `error` reply to a `refresh`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A key is configured, anonymous connections are not allowed, and no token came.
    #[error("a token is required (?token=, Authorization: Bearer, or subprotocol token.<jwt>)")]
    Missing,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// Not a JWT, or its claims have the wrong shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names an algorithm no configured key is for (including `none`).
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` is absent or not `RUSTY_SOCKS_JWT_ISSUER`.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// `aud` is absent or names none of `RUSTY_SOCKS_JWT_AUDIENCE`, or the token names an
    /// audience while none is configured (a token meant for another service).
    #[error("token audience not accepted")]
    WrongAudience,
    /// A claim the settings require (`exp` with `RUSTY_SOCKS_JWT_REQUIRE_EXP`) is absent.
    #[error("token lacks the required `{0}` claim")]
    MissingClaim(&'static str),
    /// The header's `kid` names no key the server has, even after fetching the JWKS again.
    #[error("token key id (kid) is not known")]
    UnknownKey,
    /// A refresh token for a different user than the connection's.
    #[error("token is for a different user")]
    WrongUser,
}

/// Why the JSON of a publication's `data` (or of a legacy chat message) was refused: it is
/// valid JSON the server could store, but that common parsers cannot read (`serde_json`
/// refuses it, Python's `json` runs out of stack) or read as another kind of value (infinity,
/// zero), so one publish would make the channel's history unreadable for every client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// Arrays and objects nest deeper than the limit (`serde_json` stops at 128 levels,
    /// Python's `json` at its recursion limit).
    #[error("arrays and objects nest deeper than {0} levels")]
    TooDeep(usize),
    /// A number a 64-bit float cannot hold: it would read as infinity (`serde_json` refuses
    /// it), or, written as non-zero, as zero.
    #[error("the number {0} does not fit a 64-bit float; send it as a string")]
    NumberOutOfRange(String),
    /// A `\u` escape of half a UTF-16 surrogate pair, which decodes to no character.
    #[error("a string holds the lone surrogate escape {0}")]
    LoneSurrogate(String),
}

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
    /// The application's backend refused it (the proxy; see docs/BACKEND.md): its message.
    #[error("{0}")]
    RefusedByBackend(String),
    /// The namespace has presence switched off.
    #[error("presence is disabled for this channel's namespace")]
    PresenceDisabled,
    /// `data` is larger than allowed.
    #[error("data is larger than the {0}-byte limit")]
    DataTooBig(usize),
    /// `data` (or a legacy message) is JSON that would not read back as sent.
    #[error("data refused: {0}")]
    InvalidData(DataError),
    /// The message could not be delivered or the channel joined (broker failure).
    #[error("not done: {0}")]
    Unavailable(String),
    /// A `refresh` token was refused (the connection keeps its current token).
    #[error("token refused: {0}")]
    InvalidToken(AuthError),
    /// `refresh` on a connection without authentication configured.
    #[error("this server does not use tokens")]
    AuthDisabled,
    /// The connection sends faster than `RUSTY_SOCKS_CLIENT_RATE`; the message was dropped.
    #[error("too many messages: at most {0} per second")]
    RateLimited(u32),
    /// The publication could not be stored durably: `RUSTY_SOCKS_DATA_MAX_BYTES` is reached or
    /// the disk is full. Nothing was published; subscriptions, delivery and reads go on.
    #[error("storage full; nothing was published: {0}")]
    StorageFull(String),
    /// The server has begun shutting down: the publish was refused, not stored and not
    /// delivered. Refusing is what makes an acknowledgement mean "delivered to the local
    /// subscribers before their 1001"; publish again on another node or after reconnecting.
    #[error("the server is shutting down; nothing was published")]
    ShuttingDown,
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
            Self::PermissionDenied(_) | Self::RefusedByBackend(_) => "permission_denied",
            Self::PresenceDisabled => "presence_disabled",
            Self::DataTooBig(_) => "data_too_big",
            Self::InvalidData(_) => "invalid_data",
            Self::Unavailable(_) => "unavailable",
            Self::InvalidToken(_) => "invalid_token",
            Self::AuthDisabled => "auth_disabled",
            Self::RateLimited(_) => "rate_limited",
            Self::ShuttingDown => "shutting_down",
            Self::StorageFull(_) => "storage_full",
        }
    }
}
