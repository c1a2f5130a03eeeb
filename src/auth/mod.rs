//! Connection authentication with JWT.
//!
//! Keys: the HS256 secret `RUSTY_SOCKS_JWT_SECRET`, the PEM public key
//! `RUSTY_SOCKS_JWT_PUBLIC_KEY` (RS256 for an RSA key, ES256 for a P-256 key), and the keys of a
//! JWKS document `RUSTY_SOCKS_JWT_JWKS` (a file or an http(s) URL, kept fresh by `jwks.rs`); any
//! of them may be set together. A token whose header has a `kid` the document has is checked
//! with that key only; any other token with the keys that have no `kid` (the secret, the PEM
//! key, kid-less JWKs). Each key verifies one algorithm, fixed when it is loaded, and the token's
//! `alg` must be it: `none`, or an HS256 token "signed" with an RSA public key's bytes (the
//! classic key-confusion attack), is refused.
//!
//! Claims: `sub` (the user, required), `exp` (optional unless `RUSTY_SOCKS_JWT_REQUIRE_EXP`; a
//! connection is asked to refresh its token before it passes), `nbf`, `iss` (must be
//! `RUSTY_SOCKS_JWT_ISSUER` when that is set), `aud` (must name one of `RUSTY_SOCKS_JWT_AUDIENCE`
//! when that is set, and be absent when it is not), `channels` (patterns of channels the user
//! may use where a namespace asks for `listed`), and `info` (any JSON, shown in presence).

mod jwks;
mod keys;

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

pub use crate::types::AuthError;
use crate::types::error::MAX_TOKEN_LEN;
use crate::types::secret::Secret;
use jwks::Jwks;
pub use jwks::{FETCH_TIMEOUT, JwksSource};
use keys::Key;

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

/// The keys tokens are checked with, the claims they must carry, and whether connections
/// without one are let in.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    /// HS256 secret (`RUSTY_SOCKS_JWT_SECRET`).
    pub jwt_secret: Option<Secret>,
    /// PEM file of an RSA or P-256 public key (`RUSTY_SOCKS_JWT_PUBLIC_KEY`).
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// JWKS document (`RUSTY_SOCKS_JWT_JWKS`).
    pub jwks: Option<JwksSource>,
    /// Period of JWKS refreshes (`RUSTY_SOCKS_JWT_JWKS_REFRESH`).
    pub jwks_refresh: Duration,
    /// Least time between two JWKS fetches caused by unknown `kid`s
    /// (`RUSTY_SOCKS_JWT_JWKS_COOLDOWN`).
    pub jwks_cooldown: Duration,
    /// The `iss` every token must carry (`RUSTY_SOCKS_JWT_ISSUER`).
    pub issuer: Option<String>,
    /// Audiences a token's `aud` must name one of (`RUSTY_SOCKS_JWT_AUDIENCE`); empty: tokens
    /// must carry no `aud`.
    pub audience: Vec<String>,
    /// Whether a token without `exp` is refused (`RUSTY_SOCKS_JWT_REQUIRE_EXP`).
    pub require_exp: bool,
    /// Let connections without a token in when a key is set (`RUSTY_SOCKS_ALLOW_ANONYMOUS`).
    pub allow_anonymous: bool,
}

/// Verifies tokens with the configured keys.
pub struct Verifier {
    /// The secret and the PEM key: they have no `kid`.
    fixed: Vec<Key>,
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Vec<String>,
    require_exp: bool,
    /// Whether a connection without a token is let in (as an anonymous user).
    pub allow_anonymous: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("fixed", &self.fixed)
            .field("jwks", &self.jwks)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("require_exp", &self.require_exp)
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
    /// is anonymous, as in the original server). Reads the public key file and fetches the
    /// JWKS document once.
    pub async fn load(config: &KeyOptions) -> Result<Option<Self>, KeyError> {
        let mut fixed = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            fixed.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
            });
        }
        if let Some(path) = &config.jwt_public_key {
            let var = "RUSTY_SOCKS_JWT_PUBLIC_KEY";
            let pem = std::fs::read(path).map_err(|e| KeyError {
                var,
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
            let (key, alg) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
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
            fixed.push(Key {
                kid: None,
                alg,
                key,
            });
        }
        let jwks = match &config.jwks {
            None => None,
            Some(source) => Some(
                Jwks::load(source.clone(), config.jwks_refresh, config.jwks_cooldown)
                    .await
                    .map_err(|reason| KeyError {
                        var: "RUSTY_SOCKS_JWT_JWKS",
                        reason: format!("{source}: {reason}"),
                    })?,
            ),
        };
        if fixed.is_empty() && jwks.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            fixed,
            jwks,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            require_exp: config.require_exp,
            allow_anonymous: config.allow_anonymous,
        }))
    }

    /// Keeps the JWKS keys fresh, until the returned future is dropped; `None` without a JWKS.
    /// The server runs it for as long as it runs.
    pub fn refresh_task(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        self.jwks.clone().map(Jwks::refresh_periodically)
    }

    /// Verifies a token, fetching the JWKS again first when its `kid` is unknown (at most once
    /// per cooldown, within the fetch deadline). For the upgrade, which can wait.
    pub async fn verify_fresh(&self, token: &str) -> Result<Identity, AuthError> {
        match self.check(token) {
            Err(AuthError::UnknownKey) => match &self.jwks {
                Some(jwks) => {
                    jwks.refresh_for_unknown_kid().await;
                    self.check(token)
                }
                None => Err(AuthError::UnknownKey),
            },
            other => other,
        }
    }

    /// Verifies a token with the keys in force. An unknown `kid` is refused, and starts a JWKS
    /// fetch (cooldown permitting) so that a retry may succeed. For callers that cannot wait.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let result = self.check(token);
        if let (Err(AuthError::UnknownKey), Some(jwks)) = (&result, &self.jwks) {
            jwks.refresh_soon();
        }
        result
    }

    fn check(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            if names_an_algorithm(token) {
                // An algorithm no key can be for: `none` above all.
                AuthError::WrongAlgorithm
            } else {
                AuthError::Malformed(e.to_string())
            }
        })?;
        let jwks = self.jwks.as_ref().map(|j| j.keys());
        let from_jwks = jwks.as_deref().map_or(&[][..], Vec::as_slice);
        let mut candidates: Vec<&Key> = Vec::new();
        if let Some(kid) = &header.kid {
            let named: Vec<&Key> = from_jwks
                .iter()
                .filter(|k| k.kid.as_ref() == Some(kid))
                .collect();
            if !named.is_empty() {
                // The kid names keys: the token's algorithm must be one of theirs.
                candidates = named.into_iter().filter(|k| k.alg == header.alg).collect();
                if candidates.is_empty() {
                    return Err(AuthError::WrongAlgorithm);
                }
            }
        }
        if candidates.is_empty() {
            // No kid, or one the document does not have (yet): keys without a kid. Issuers
            // often put a kid in every token, so an HS256 secret still verifies them.
            candidates = self
                .fixed
                .iter()
                .chain(from_jwks.iter().filter(|k| k.kid.is_none()))
                .filter(|k| k.alg == header.alg)
                .collect();
            if candidates.is_empty() {
                return Err(match (&header.kid, &self.jwks) {
                    (Some(_), Some(_)) => AuthError::UnknownKey,
                    _ => AuthError::WrongAlgorithm,
                });
            }
        }
        let validation = self.validation(header.alg);
        let mut result = Err(AuthError::BadSignature);
        for key in candidates {
            result = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
                .map_err(|e| self.refusal(&e));
            if !matches!(result, Err(AuthError::BadSignature)) {
                break;
            }
        }
        let unknown_kid = header.kid.as_ref().is_some_and(|kid| {
            self.jwks.is_some() && !from_jwks.iter().any(|k| k.kid.as_ref() == Some(kid))
        });
        if unknown_kid && matches!(result, Err(AuthError::BadSignature)) {
            // Signed with a key the JWKS may have gained since (an `oct` key next to the
            // secret, say): worth fetching the document again, as for any unknown kid.
            result = Err(AuthError::UnknownKey);
        }
        let claims = result?.claims;
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

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        // `exp` is checked whenever present; required only if the operator says so.
        let mut required = vec!["sub"];
        if self.require_exp {
            required.push("exp");
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if !self.audience.is_empty() {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        // Without a configured audience, a token that names one is refused: it was issued
        // for another service (one sharing the identity provider's keys).
        validation.validate_aud = true;
        validation.set_required_spec_claims(&required);
        validation
    }

    fn refusal(&self, e: &jsonwebtoken::errors::Error) -> AuthError {
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm
            }
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "exp" => AuthError::MissingClaim("exp"),
                "iss" => AuthError::WrongIssuer,
                "aud" => AuthError::WrongAudience,
                _ => AuthError::Malformed(e.to_string()),
            },
            _ => AuthError::Malformed(e.to_string()),
        }
    }
}

/// Whether the token's header is JSON naming an `alg` this library does not have.
fn names_an_algorithm(token: &str) -> bool {
    use base64::Engine as _;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|h| h.get("alg")?.as_str().map(str::to_owned))
        .is_some_and(|alg| alg.parse::<Algorithm>().is_err())
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
            fixed: vec![Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(b"s3cret"),
            }],
            jwks: None,
            issuer: None,
            audience: Vec::new(),
            require_exp: false,
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
        assert_eq!(v.verify(none).err(), Some(AuthError::WrongAlgorithm));
        assert!(matches!(
            v.verify("not a jwt"),
            Err(AuthError::Malformed(_))
        ));
        let no_sub = token(serde_json::json!({"exp":now+60}), b"s3cret");
        assert!(matches!(v.verify(&no_sub), Err(AuthError::Malformed(_))));
    }
}
