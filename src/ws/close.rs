//! Every close code the server sends, and why.
//!
//! This is the one place that decides which code a client sees; `docs/protocol.md` carries the
//! same table. Codes 1000-1014 are RFC 6455's; 4000-4499 are ours and mean "the client may
//! reconnect (with backoff)", 4500-4999 are reserved for "do not reconnect as is".

/// Why the server is closing a WebSocket connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client started the close handshake with no code, or a normal end.
    Normal,
    /// 1001: the server is shutting down.
    GoingAway,
    /// 1002: the client broke RFC 6455 (unmasked frame, bad opcode, bad fragmentation, ...).
    ProtocolError,
    /// 1007: a text message (or close reason) was not valid UTF-8, or a compressed message
    /// did not inflate.
    InvalidPayload,
    /// 1009: a message was larger than the configured limit.
    MessageTooBig,
    /// 1011: the server hit an unexpected internal condition.
    InternalError,
    /// 1013: the server cannot serve the connection now (a legacy client could not join the
    /// `default` channel because the broker is unavailable); reconnect with backoff.
    TryAgainLater,
    /// 4000: nothing arrived from the client (not even a pong) within `RUSTY_SOCKS_TIMEOUT`.
    HeartbeatTimeout,
    /// 4001: the client read too slowly and its outbox (`RUSTY_SOCKS_BUFFER`) overflowed.
    SlowConsumer,
    /// 4002: a legacy-dialect client may have missed chat messages because this node lost
    /// its broker connection; it should reconnect (the legacy dialect has no `gap` frame).
    MessagesMissed,
    /// 4003: the connection's token expired and no valid `refresh` came in time.
    TokenExpired,
    /// 4004: the client kept sending faster than `RUSTY_SOCKS_CLIENT_RATE` after errors.
    RateLimited,
    /// 4501: the application disconnected this user through the server API; do not
    /// reconnect as is.
    Disconnected,
}

impl CloseCode {
    /// Every code the server sends (for documentation checks).
    pub const ALL: [CloseCode; 13] = [
        Self::Normal,
        Self::GoingAway,
        Self::ProtocolError,
        Self::InvalidPayload,
        Self::MessageTooBig,
        Self::InternalError,
        Self::TryAgainLater,
        Self::HeartbeatTimeout,
        Self::SlowConsumer,
        Self::MessagesMissed,
        Self::TokenExpired,
        Self::RateLimited,
        Self::Disconnected,
    ];

    /// The numeric code put on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::ProtocolError => 1002,
            Self::InvalidPayload => 1007,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::TryAgainLater => 1013,
            Self::HeartbeatTimeout => 4000,
            Self::SlowConsumer => 4001,
            Self::MessagesMissed => 4002,
            Self::TokenExpired => 4003,
            Self::RateLimited => 4004,
            Self::Disconnected => 4501,
        }
    }

    /// The short reason sent with the code (always fits a control frame).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "",
            Self::GoingAway => "server shutting down",
            Self::ProtocolError => "protocol error",
            Self::InvalidPayload => "invalid utf-8",
            Self::MessageTooBig => "message too big",
            Self::InternalError => "internal error",
            Self::TryAgainLater => "try again later",
            Self::HeartbeatTimeout => "heartbeat timeout",
            Self::SlowConsumer => "slow consumer: outbox full",
            Self::MessagesMissed => "messages missed: reconnect",
            Self::TokenExpired => "token expired",
            Self::RateLimited => "rate limit exceeded",
            Self::Disconnected => "disconnected by the server",
        }
    }
}

/// A WebSocket-level violation by the client; each one ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsViolation {
    /// The frame stream broke RFC 6455.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason was not UTF-8.
    #[error("invalid utf-8 in a text message")]
    InvalidUtf8,
    /// A compressed (permessage-deflate) message whose data does not inflate.
    #[error("compressed message data that does not inflate")]
    BadCompressedData,
    /// A message grew past the endpoint's limit.
    #[error("message larger than the {limit}-byte limit")]
    TooBig {
        /// The limit in bytes that was exceeded.
        limit: usize,
    },
}

impl WsViolation {
    /// The close code this violation is answered with.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::Protocol(_) => CloseCode::ProtocolError,
            Self::InvalidUtf8 | Self::BadCompressedData => CloseCode::InvalidPayload,
            Self::TooBig { .. } => CloseCode::MessageTooBig,
        }
    }
}

/// Whether a close code received from a client is one RFC 6455 lets an endpoint send.
pub fn is_valid_received_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parses the payload of a close frame a client sent: empty (no code), or a code RFC 6455 lets
/// an endpoint send followed by a UTF-8 reason. Returns the code; a bad code or a one-byte
/// payload is a protocol error (1002), a reason that is not UTF-8 an invalid payload (1007).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, WsViolation> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsViolation::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_received_code(code) {
                return Err(WsViolation::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsViolation::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_code_validity_follows_rfc_6455() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 4999] {
            assert!(is_valid_received_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_valid_received_code(bad), "{bad}");
        }
    }

    #[test]
    fn reasons_fit_a_control_frame() {
        for code in CloseCode::ALL {
            assert!(code.reason().len() <= 123);
        }
    }
}
