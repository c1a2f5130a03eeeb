//! Connection authentication with JWT.
//!
//! A token is verified with `RUSTY_SOCKS_JWT_SECRET` (HS256) or the public key in the file
//! `RUSTY_SOCKS_JWT_PUBLIC_KEY` (RS256 for an RSA key, ES256 for a P-256 key); both may be set.
//! The algorithm a token names must be the one its key is for: `none`, or an RS256 token checked
//! against the HS256 secret (the classic key-confusion attack), is refused.
//!
//! Claims: `sub` (the user, required), `exp` (optional; a connection is asked to refresh its
//! token before it passes), `nbf`, `channels` (patterns of channels the user may use where a
//! namespace asks for `listed`), and `info` (any JSON, shown in presence).

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::Config;

/// Largest token accepted, in bytes: a token is carried in a URL or header, and verifying a
/// huge one would be work an attacker gets for free.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_S: u64 = 5;

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
    /// A refresh token for a different user than the connection's.
    #[error("token is for a different user")]
    WrongUser,
}

/// Who a verified token says the client is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The `sub` claim.
    pub user: Arc<str>,
    /// Channel patterns from the `channels` claim.
    pub channels: Arc<[String]>,
    /// The `info` claim, verbatim.
    pub info: Option<Arc<RawValue>>,
    /// The `exp` claim (seconds since the Unix epoch), if any.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Whether the token lists `channel`: an exact name, or a pattern ending in `*` that is a
    /// prefix of it (`chat:*`, `*`).
    pub fn lists(&self, channel: &str) -> bool {
        self.channels
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => channel.starts_with(prefix),
                None => pattern == channel,
            })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    secret: Option<DecodingKey>,
    public: Option<(DecodingKey, Algorithm)>,
    /// Whether a connection without a token is let in (as an anonymous user).
    pub allow_anonymous: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.secret.is_some())
            .field("public", &self.public.as_ref().map(|(_, alg)| alg))
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

/// A key that could not be loaded at startup; names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct KeyError {
    /// The setting at fault.
    pub var: &'static str,
    /// What went wrong.
    pub reason: String,
}

impl Verifier {
    /// The verifier `config` asks for, or `None` when no key is configured (every connection
    /// is anonymous, as in the original server). Reads the public key file.
    pub fn load(config: &Config) -> Result<Option<Self>, KeyError> {
        let secret = config
            .jwt_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.expose().as_bytes()));
        let public = match &config.jwt_public_key {
            None => None,
            Some(path) => {
                let var = "RUSTY_SOCKS_JWT_PUBLIC_KEY";
                let pem = std::fs::read(path).map_err(|e| KeyError {
                    var,
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                let key = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(KeyError {
                        var,
                        reason: format!(
                            "{} is not a PEM RSA or EC (P-256) public key",
                            path.display()
                        ),
                    });
                };
                Some(key)
            }
        };
        if secret.is_none() && public.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            secret,
            public,
            allow_anonymous: config.allow_anonymous,
        }))
    }

    /// Verifies a token and returns who it is for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLarge);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.as_ref(),
            alg => self
                .public
                .as_ref()
                .filter(|(_, expected)| *expected == alg)
                .map(|(key, _)| key),
        }
        .ok_or(AuthError::WrongAlgorithm)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm
            }
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Malformed("empty sub".into()));
        }
        Ok(Identity {
            user: Arc::from(claims.sub),
            channels: Arc::from(claims.channels),
            info: claims.info.map(Arc::from),
            expires_at: claims.exp,
        })
    }
}

/// The subprotocol a browser offers alongside its token subprotocol; the server selects it (a
/// browser fails the handshake if the server selects nothing it offered).
pub const SUBPROTOCOL: &str = "rusty-socks.v1";

/// Prefix of the subprotocol that carries a token: `token.<jwt>`.
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "token.";

/// Where a token was found in an upgrade request, and which subprotocol to answer with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Presented {
    /// The token, if any.
    pub token: Option<String>,
    /// The subprotocol to select in the 101, if the client offered ours.
    pub subprotocol: Option<String>,
}

/// Finds a token in `Authorization: Bearer`, `?token=` or the `token.<jwt>` subprotocol (in
/// that order of preference), and the subprotocol to select.
pub fn presented(headers: &hyper::HeaderMap, query: Option<&str>) -> Presented {
    let mut found = Presented::default();
    let offered: Vec<&str> = headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let in_subprotocol = offered
        .iter()
        .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX));
    if offered.contains(&SUBPROTOCOL) {
        found.subprotocol = Some(SUBPROTOCOL.to_owned());
    } else if let Some(token) = in_subprotocol {
        // Only the token entry was offered: it is the one we can select.
        found.subprotocol = Some(format!("{TOKEN_SUBPROTOCOL_PREFIX}{token}"));
    }
    let bearer = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    // A JWT needs no escapes, but a client library may escape anyway. A malformed escape is
    // kept as sent, and the token then fails verification.
    let in_query = crate::http::query_param(query, "token")
        .map(|raw| crate::http::percent_decode(raw).unwrap_or_else(|| raw.to_owned()));
    found.token = bearer
        .map(str::to_owned)
        .or(in_query)
        .or(in_subprotocol.map(str::to_owned));
    found
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn verifier() -> Verifier {
        Verifier {
            secret: Some(DecodingKey::from_secret(b"s3cret")),
            public: None,
            allow_anonymous: false,
        }
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap_or_default()
    }

    #[test]
    fn a_valid_token_gives_the_identity() {
        let t = token(
            serde_json::json!({"sub":"ann","exp":now_s()+60,"channels":["chat:*","news"],"info":{"name":"Ann"}}),
            b"s3cret",
        );
        let id = verifier().verify(&t).expect("valid");
        assert_eq!(&*id.user, "ann");
        assert!(id.lists("chat:x") && id.lists("news") && !id.lists("newsy"));
        assert_eq!(
            id.info.as_deref().map(RawValue::get),
            Some(r#"{"name":"Ann"}"#)
        );
    }

    #[test]
    fn bad_tokens_are_refused_each_for_its_reason() {
        let v = verifier();
        let now = now_s();
        let cases = [
            (
                token(serde_json::json!({"sub":"a","exp":now-60}), b"s3cret"),
                AuthError::Expired,
            ),
            (
                token(serde_json::json!({"sub":"a","nbf":now+60}), b"s3cret"),
                AuthError::NotYetValid,
            ),
            (
                token(serde_json::json!({"sub":"a"}), b"other"),
                AuthError::BadSignature,
            ),
            ("x".repeat(MAX_TOKEN_LEN + 1), AuthError::TooLarge),
        ];
        for (t, expected) in cases {
            assert_eq!(v.verify(&t).err(), Some(expected));
        }
        // alg none: header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIn0.";
        assert!(matches!(
            v.verify(none),
            Err(AuthError::Malformed(_) | AuthError::WrongAlgorithm)
        ));
        assert!(matches!(
            v.verify("not a jwt"),
            Err(AuthError::Malformed(_))
        ));
        let no_sub = token(serde_json::json!({"exp":now+60}), b"s3cret");
        assert!(matches!(v.verify(&no_sub), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn tokens_are_found_where_browsers_and_servers_put_them() {
        let mut headers = hyper::HeaderMap::new();
        assert_eq!(
            presented(&headers, Some("token=abc.def.g%2D"))
                .token
                .as_deref(),
            Some("abc.def.g-")
        );
        headers.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            "rusty-socks.v1, token.aaa.bbb.ccc"
                .parse()
                .expect("valid header"),
        );
        let p = presented(&headers, None);
        assert_eq!(p.token.as_deref(), Some("aaa.bbb.ccc"));
        assert_eq!(p.subprotocol.as_deref(), Some(SUBPROTOCOL));
        headers.insert(
            hyper::header::AUTHORIZATION,
            "Bearer xxx.yyy.zzz".parse().expect("valid header"),
        );
        assert_eq!(
            presented(&headers, None).token.as_deref(),
            Some("xxx.yyy.zzz")
        );
    }
}
