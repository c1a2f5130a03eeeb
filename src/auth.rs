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

pub use crate::types::AuthError;
use crate::types::error::MAX_TOKEN_LEN;
use crate::types::secret::Secret;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_S: u64 = 5;

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

/// The keys tokens are checked with, and whether connections without one are let in.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    /// HS256 secret (`RUSTY_SOCKS_JWT_SECRET`).
    pub jwt_secret: Option<Secret>,
    /// PEM file of an RSA or P-256 public key (`RUSTY_SOCKS_JWT_PUBLIC_KEY`).
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// Let connections without a token in when a key is set (`RUSTY_SOCKS_ALLOW_ANONYMOUS`).
    pub allow_anonymous: bool,
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
    pub fn load(config: &KeyOptions) -> Result<Option<Self>, KeyError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::clock::now_s;
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
}
