//! The keys tokens are checked with: the HS256 secret, a PEM public key, and the keys of a JWKS
//! document.
//!
//! Every key accepts exactly one algorithm, fixed when the key is loaded (from the JWK's `alg`,
//! or from its type and curve). The token's header never chooses how a key is used: that is what
//! makes `alg: none` and key confusion (an HS256 token "signed" with an RSA public key's bytes)
//! impossible, because no key is both.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// One verification key.
#[derive(Clone)]
pub(crate) struct Key {
    /// The JWK's `kid`; `None` for the secret and the PEM key, and for a JWK without one.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    /// The key itself.
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A JWKS document's keys, each parsed on its own so that one key of a type this server does
/// not know (identity providers publish encryption keys, newer key types) does not make the
/// whole document unusable.
#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a JWKS document, and a note per key that was skipped.
#[derive(Debug)]
pub(crate) struct ParsedSet {
    /// Keys to verify with.
    pub keys: Vec<Key>,
    /// Why each skipped key was skipped (logged by the caller).
    pub skipped: Vec<String>,
}

/// Parses a JWKS document (`{"keys":[...]}`). Fails when it is not one, or when it holds no
/// key this server can verify with: a server whose document went empty would refuse everyone.
pub(crate) fn parse_jwks(bytes: &[u8]) -> Result<ParsedSet, String> {
    let raw: RawSet = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWKS document ({{\"keys\":[...]}}): {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                skipped.push(format!("key {i}: {e}"));
                continue;
            }
        };
        let name = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
        match from_jwk(&jwk) {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("key {name}: {why}")),
        }
    }
    if keys.is_empty() {
        let why = if skipped.is_empty() {
            "no keys".to_owned()
        } else {
            skipped.join("; ")
        };
        return Err(format!("no usable signing key ({why})"));
    }
    Ok(ParsedSet { keys, skipped })
}

/// One JWK as a key, with its algorithm: the JWK's `alg` when it has one (and it fits the key
/// type), else the usual one for its type.
fn from_jwk(jwk: &Jwk) -> Result<Key, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use: enc)".into());
    }
    let default = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            ref other => return Err(format!("curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
    };
    let alg = match jwk.common.key_algorithm {
        None => default,
        Some(named) => {
            let alg = signing_algorithm(named)
                .ok_or_else(|| format!("alg {named:?} is not a signature algorithm"))?;
            if family(alg) != family(default) || (family(default) == 'E' && alg != default) {
                return Err(format!("alg {alg:?} does not fit the key type"));
            }
            alg
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// The key type an algorithm needs: HMAC, RSA, ECDSA (each algorithm tied to one curve) or
/// EdDSA.
fn family(alg: Algorithm) -> char {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => 'H',
        Algorithm::ES256 | Algorithm::ES384 => 'E',
        Algorithm::EdDSA => 'O',
        _ => 'R',
    }
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::RSA1_5 | KeyAlgorithm::RSA_OAEP | KeyAlgorithm::RSA_OAEP_256 => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwks_keeps_the_keys_it_can_use_and_says_why_it_skipped_the_others() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"h","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQ"},
            {"kty":"oct","kid":"h5","alg":"HS512","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQ"},
            {"kty":"oct","kid":"bad-alg","alg":"RS256","k":"c2VjcmV0"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"XYZ","kid":"future"}
        ]}"#;
        let set = parse_jwks(doc).expect("two usable keys");
        let got: Vec<_> = set.keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        assert_eq!(
            got,
            [
                (Some("h"), Algorithm::HS256),
                (Some("h5"), Algorithm::HS512)
            ]
        );
        assert_eq!(set.skipped.len(), 3, "{:?}", set.skipped);
    }

    #[test]
    fn a_document_without_usable_keys_is_refused() {
        for doc in [
            &br#"{"keys":[]}"#[..],
            br#"{"keys":[{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}"#,
            b"[]",
            b"not json",
        ] {
            assert!(parse_jwks(doc).is_err(), "{}", String::from_utf8_lossy(doc));
        }
    }
}
