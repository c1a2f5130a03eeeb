//! Where a client puts its token in an upgrade request, and which subprotocol to answer with.

use crate::auth::{SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX};

/// Where a token was found in an upgrade request, and which subprotocol to answer with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Presented {
    /// The token, if any.
    pub token: Option<String>,
    /// The subprotocol to select in the 101, if the client offered ours.
    pub subprotocol: Option<String>,
    /// The client offered `rusty-socks.v1` (with or without a `token.<jwt>` entry): it speaks
    /// protocol v1 only, so it gets the v1 welcome and no legacy traffic. A client that offered
    /// only `token.<jwt>` did not ask for v1 and stays a legacy connection.
    pub v1: bool,
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
        found.v1 = true;
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
    let in_query = super::query::query_param(query, "token")
        .map(|raw| super::query::percent_decode(raw).unwrap_or_else(|| raw.to_owned()));
    found.token = bearer
        .map(str::to_owned)
        .or(in_query)
        .or(in_subprotocol.map(str::to_owned));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_where_browsers_and_servers_put_them() {
        let mut headers = hyper::HeaderMap::new();
        assert!(!presented(&headers, None).v1, "no subprotocol: legacy");
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
        assert!(p.v1, "rusty-socks.v1 with a token is a v1 connection");
        headers.insert(
            hyper::header::AUTHORIZATION,
            "Bearer xxx.yyy.zzz".parse().expect("valid header"),
        );
        assert_eq!(
            presented(&headers, None).token.as_deref(),
            Some("xxx.yyy.zzz")
        );
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            "token.aaa.bbb.ccc".parse().expect("valid header"),
        );
        let p = presented(&headers, None);
        assert!(!p.v1, "a token alone does not ask for v1");
        assert_eq!(p.subprotocol.as_deref(), Some("token.aaa.bbb.ccc"));
    }
}
