//! The HTTP side of the WebSocket opening handshake (RFC 6455 §4.2).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::header::{CONNECTION, HeaderMap, HeaderValue, UPGRADE};
use sha1::{Digest, Sha1};

/// GUID every server appends to the client's key before hashing.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a request to a WebSocket endpoint cannot be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No `Upgrade: websocket` (e.g. a plain browser visit).
    #[error("this endpoint speaks WebSocket only: send an Upgrade: websocket request")]
    NotAnUpgrade,
    /// `Connection` does not contain the `upgrade` token.
    #[error("the Connection header must contain \"upgrade\"")]
    MissingConnectionUpgrade,
    /// A WebSocket version other than 13.
    #[error("unsupported Sec-WebSocket-Version; this server speaks version 13")]
    UnsupportedVersion,
    /// The key is missing or not 16 base64-encoded bytes.
    #[error("Sec-WebSocket-Key must be 16 bytes, base64-encoded")]
    BadKey,
}

fn has_token(headers: &HeaderMap, name: hyper::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Checks the upgrade headers and returns the `Sec-WebSocket-Accept` value to answer with.
pub fn accept(headers: &HeaderMap) -> Result<HeaderValue, HandshakeError> {
    if !has_token(headers, UPGRADE, "websocket") {
        return Err(HandshakeError::NotAnUpgrade);
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    if headers
        .get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = headers
        .get("sec-websocket-key")
        .ok_or(HandshakeError::BadKey)?
        .as_bytes();
    match STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let accept = accept_key(key);
    HeaderValue::from_str(&accept).map_err(|_| HandshakeError::BadKey)
}

/// The permessage-deflate agreement for an upgrade request, and the
/// `Sec-WebSocket-Extensions` value to answer with: `None` when the client offered nothing the
/// server accepts (see [`super::deflate::negotiate`]).
pub fn negotiate_deflate(
    headers: &HeaderMap,
    settings: super::deflate::DeflateSettings,
) -> Option<(super::deflate::Deflate, HeaderValue)> {
    let values = headers
        .get_all("sec-websocket-extensions")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let (deflate, answer) = super::deflate::negotiate(values, settings)?;
    HeaderValue::from_str(&answer)
        .ok()
        .map(|answer| (deflate, answer))
}

/// `base64(sha1(key + GUID))`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6455_example_key() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn validates_each_header() {
        let good = [
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(accept(&headers(&good)).is_ok());
        assert_eq!(
            accept(&headers(&good[1..])),
            Err(HandshakeError::NotAnUpgrade)
        );
        assert_eq!(
            accept(&headers(&[good[0], good[2], good[3]])),
            Err(HandshakeError::MissingConnectionUpgrade)
        );
        assert_eq!(
            accept(&headers(&[
                good[0],
                good[1],
                ("sec-websocket-version", "8"),
                good[3]
            ])),
            Err(HandshakeError::UnsupportedVersion)
        );
        assert_eq!(
            accept(&headers(&[
                good[0],
                good[1],
                good[2],
                ("sec-websocket-key", "short")
            ])),
            Err(HandshakeError::BadKey)
        );
    }
}
