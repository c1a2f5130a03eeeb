//! JWT authentication, token refresh and namespace permissions over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::engine::namespace::{Access, NamespaceOptions};
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-0123456789";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, claims: Value) -> String {
    let key = match alg {
        Algorithm::RS256 => {
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap()
        }
        _ => EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap(),
    };
    encode(&Header::new(alg), &claims, &key).unwrap()
}

fn with_secret(config: &mut Config) {
    config.jwt_secret = Some(Secret(SECRET.into()));
}

/// An upgrade request with `token` in the query; returns the status and body.
async fn try_upgrade(server: &TestServer, token: &str) -> (u16, String) {
    let (status, _, body) = http(
        server.addr,
        "GET",
        &format!("/ws?token={token}"),
        &UPGRADE_HEADERS,
    )
    .await;
    (status, body)
}

async fn v1_with_token(server: &TestServer, token: &str) -> (Ws, String) {
    v1_client_url(&server.url(&format!("/ws?token={token}"))).await
}

#[tokio::test]
async fn with_a_key_set_a_connection_needs_a_valid_token() {
    let server = TestServer::start(with_secret).await;
    let (status, _, body) = http(server.addr, "GET", "/ws", &UPGRADE_HEADERS).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token is required"), "{body}");
    let n = now();
    let other_key = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"a"}),
        &EncodingKey::from_secret(b"another-secret-entirely"),
    )
    .unwrap();
    let cases = [
        (hs256(json!({"sub":"a","exp":n-60})), "expired"),
        (hs256(json!({"sub":"a","nbf":n+600})), "not valid yet"),
        (other_key, "signature"),
        // alg "none": an unsigned token.
        (
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIn0.".to_owned(),
            "token",
        ),
        // RS256 while only an HS256 secret is configured.
        (signed(Algorithm::RS256, json!({"sub":"a"})), "algorithm"),
        ("not-a-jwt".to_owned(), "malformed"),
        (hs256(json!({"exp":n+60})), "malformed"),
        ("a".repeat(9000), "larger than"),
    ];
    for (token, reason) in cases {
        let (status, body) = try_upgrade(&server, &token).await;
        assert_eq!(status, 401, "{reason}: {body}");
        assert!(body.contains(reason), "expected {reason:?} in {body:?}");
    }
    // A valid one gets in, and presence shows the user.
    let token = hs256(json!({"sub":"ann","exp":n+600,"info":{"name":"Ann"}}));
    let (mut ws, _) = v1_with_token(&server, &token).await;
    subscribe(&mut ws, "room").await;
    let reply = call(&mut ws, json!({"type":"presence","id":1,"channel":"room"})).await;
    assert_eq!(reply["clients"][0]["user"], "ann", "{reply}");
    assert_eq!(
        reply["clients"][0]["info"],
        json!({"name":"Ann"}),
        "{reply}"
    );
    let stats = server.stats().await;
    assert_eq!(stats["connections"], 1);
    server.stop().await;
}

#[tokio::test]
async fn the_token_may_come_as_bearer_or_subprotocol() {
    let server = TestServer::start(with_secret).await;
    let exp = now() + 600;
    let token = hs256(json!({"sub":"bob","exp":exp}));
    // Authorization: Bearer (servers and native clients).
    let mut request = server.url("/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(recv_json(&mut ws).await["type"], "Connect");
    // Subprotocol (browsers): the server must select the one it accepted.
    let mut request = server.url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("rusty-socks.v1, token.{token}").parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "rusty-socks.v1"
    );
    // Offering rusty-socks.v1 makes it a v1 connection: the v1 welcome, naming the user.
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], "bob", "{welcome}");
    assert_eq!(welcome["expires_at"], exp, "{welcome}");
    server.stop().await;
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_a_public_key_file() {
    for (alg, key) in [
        (Algorithm::RS256, "rsa_public.pem"),
        (Algorithm::ES256, "ec_public.pem"),
    ] {
        let server = TestServer::start(|c| c.jwt_public_key = Some(fixture(key))).await;
        let token = signed(alg, json!({"sub":"carol","exp":now()+600}));
        let (mut ws, _) = v1_with_token(&server, &token).await;
        subscribe(&mut ws, "room").await;
        // The HS256 secret is not configured: an HS256 token is the wrong algorithm.
        let (status, body) = try_upgrade(&server, &hs256(json!({"sub":"x"}))).await;
        assert_eq!(status, 401, "{body}");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_missing_key_file_stops_startup_naming_the_setting() {
    let config = Config {
        host: "127.0.0.1".parse().unwrap(),
        port: 0,
        jwt_public_key: Some("/nonexistent/key.pem".into()),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = rusty_socks::server::run(listener, config, std::future::pending())
        .await
        .expect_err("no key file");
    assert!(
        err.to_string().contains("RUSTY_SOCKS_JWT_PUBLIC_KEY"),
        "{err}"
    );
}

#[tokio::test]
async fn anonymous_connections_can_be_allowed_but_bad_tokens_never_are() {
    let server = TestServer::start(|c| {
        with_secret(c);
        c.allow_anonymous = true;
    })
    .await;
    // Without a token: in, as an anonymous user who chats like anyone on the default channel.
    let (mut anon, _) = join(&server).await;
    let token = hs256(json!({"sub":"gil","exp":now()+600}));
    let (mut gil, _) = join_url(&server.url(&format!("/ws?token={token}"))).await;
    send_text(&mut anon, r#"{"sender":"a","content":"hi"}"#).await;
    let chat = recv_json(&mut gil).await;
    assert_eq!(
        (&chat["type"], &chat["sender"], &chat["content"]),
        (&json!("Chat"), &json!("a"), &json!("hi")),
        "the anonymous chat reaches the others: {chat}"
    );
    // The sender got neither a copy nor an error: its next frame answers its next message.
    send_text(&mut anon, "[]").await;
    let next = recv_json(&mut anon).await;
    assert_eq!(next["code"], "invalid_message", "{next}");
    // And in v1 it is listed as a client without a user.
    let (mut anon_v1, anon_id) = v1_client(&server).await;
    subscribe(&mut anon_v1, "room").await;
    let reply = call(
        &mut anon_v1,
        json!({"type":"presence","id":1,"channel":"room"}),
    )
    .await;
    assert_eq!(
        reply["clients"],
        json!([{"client_id":anon_id,"user":null}]),
        "{reply}"
    );
    // A bad token is refused all the same.
    let (status, body) = try_upgrade(&server, "garbage").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("malformed"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn tokens_are_refreshed_in_band_or_the_connection_closes_with_4003() {
    let server = TestServer::start(|c| {
        with_secret(c);
        c.refresh_window = Duration::from_secs(30);
    })
    .await;
    let exp = now() + 3;
    let token = hs256(json!({"sub":"dan","exp":exp}));
    let url = server.url(&format!("/ws?token={token}"));
    let (mut refresher, _) = join_url(&url).await;
    let (mut idle, _) = join_url(&url).await; // a user may hold many connections
    // Within the window: the server asks on its next tick.
    let ask = loop {
        let frame = recv_json(&mut refresher).await;
        if frame["type"] == "refresh" {
            break frame;
        }
    };
    assert_eq!(ask, json!({"type":"refresh","expires_at":exp}));
    // Another user's token is refused; the connection keeps its own.
    let reply = call(
        &mut refresher,
        json!({"type":"refresh","id":1,"token":hs256(json!({"sub":"eve","exp":now()+600}))}),
    )
    .await;
    assert_eq!(reply["code"], "invalid_token", "{reply}");
    let later = now() + 600;
    let reply = call(
        &mut refresher,
        json!({"type":"refresh","id":2,"token":hs256(json!({"sub":"dan","exp":later}))}),
    )
    .await;
    assert_eq!(reply, json!({"type":"refreshed","id":2,"expires_at":later}));
    // The one that did not refresh is closed once its token expires (not before; how soon
    // after is bounded by the wait for the close frame); the other stays.
    assert_eq!(recv_close_code(&mut idle).await, 4003);
    assert!(now() >= exp, "closed before its token expired");
    // The refreshed one is still served (it sees the other leave the default channel).
    assert_eq!(recv_json(&mut refresher).await["type"], "Disconnect");
    subscribe(&mut refresher, "room").await;
    server.stop().await;
}

#[tokio::test]
async fn namespaces_decide_who_may_subscribe_publish_and_read() {
    let server = TestServer::start(|c| {
        with_secret(c);
        c.allow_anonymous = true;
        c.namespaces.insert(
            "private",
            NamespaceOptions {
                subscribe: Access::Listed,
                publish: Access::Listed,
                ..NamespaceOptions::default()
            },
        );
        c.namespaces.insert(
            "members",
            NamespaceOptions {
                publish: Access::Authenticated,
                read_presence: Access::Authenticated,
                read_history: Access::Authenticated,
                ..NamespaceOptions::default()
            },
        );
    })
    .await;
    let (mut anon, _) = v1_client(&server).await;
    let token = hs256(json!({"sub":"fay","exp":now()+600,"channels":["private:fay*"]}));
    let (mut fay, _) = v1_with_token(&server, &token).await;
    let denied = |reply: &Value| reply["code"] == "permission_denied";

    let reply = call(
        &mut anon,
        json!({"type":"subscribe","id":1,"channel":"private:fay"}),
    )
    .await;
    assert!(denied(&reply), "{reply}");
    let reply = call(
        &mut fay,
        json!({"type":"subscribe","id":1,"channel":"private:other"}),
    )
    .await;
    assert!(denied(&reply), "not listed: {reply}");
    subscribe(&mut fay, "private:fay-inbox").await;
    publish(&mut fay, "private:fay-inbox", json!("mine")).await;
    assert_eq!(
        recv_json(&mut fay).await["data"],
        "mine",
        "her own publication"
    );

    subscribe(&mut anon, "members:lobby").await;
    for command in [
        json!({"type":"publish","id":2,"channel":"members:lobby","data":1}),
        json!({"type":"presence","id":3,"channel":"members:lobby"}),
        json!({"type":"history","id":4,"channel":"members:lobby"}),
    ] {
        let reply = call(&mut anon, command.clone()).await;
        assert!(denied(&reply), "{command}: {reply}");
    }
    publish(&mut fay, "members:lobby", json!("hello")).await;
    // The anonymous subscriber still receives it: reading live is `subscribe`'s right.
    let push = recv_json(&mut anon).await;
    assert_eq!(push["type"], "publication", "{push}");
    server.stop().await;
}
