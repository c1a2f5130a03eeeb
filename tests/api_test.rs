//! The server HTTP API under `/api` and `/metrics`, over real HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "api-key-0123456789abcdef";

fn with_api(config: &mut Config) {
    config.api_key = Some(Secret(KEY.into()));
}

/// One API request with a JSON body; returns (status, JSON body).
async fn api(server: &TestServer, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    api_with_key(server, method, path, body, Some(KEY)).await
}

async fn api_with_key(
    server: &TestServer,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    if let Some(key) = key {
        request.push_str(&format!("authorization: apikey {key}\r\n"));
    }
    let body = body.unwrap_or("");
    request.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (status, head, body) = split_response(&raw);
    if !body.is_empty() {
        assert!(head.contains("application/json"), "{head}");
    }
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn publish_reaches_subscribers_and_returns_the_offset() {
    let server = TestServer::start(with_api).await;
    let (mut ws, _) = v1_client(&server).await;
    subscribe(&mut ws, "news").await;
    let (status, body) = api(
        &server,
        "POST",
        "/api/publish",
        Some(r#"{"channel":"news","data":{"headline":"hi"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 1);
    let push = recv_json(&mut ws).await;
    assert_eq!(push["data"], json!({"headline":"hi"}));
    assert!(push.get("client_id").is_none(), "published by the server");

    let (status, body) = api(
        &server,
        "POST",
        "/api/broadcast",
        Some(r#"{"channels":["news","sport"],"data":2}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["offset"], 2);
    assert_eq!(body["results"][1]["offset"], 1);
    assert_eq!(recv_json(&mut ws).await["data"], 2);

    let (status, body) = api(&server, "GET", "/api/history/news?limit=1", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offset"], 2);
    assert_eq!(body["publications"].as_array().unwrap().len(), 1);

    let (status, body) = api(&server, "GET", "/api/presence/news", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["clients"].as_array().unwrap().len(), 1);

    let (status, body) = api(&server, "GET", "/api/channels", None).await;
    assert_eq!(status, 200, "{body}");
    let channels: Vec<&str> = body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, vec!["news"]);
    server.stop().await;
}

#[tokio::test]
async fn the_api_key_is_required_and_checked() {
    let server = TestServer::start(with_api).await;
    for key in [None, Some("wrong-key-0123456789abcd"), Some("")] {
        let (status, body) = api_with_key(&server, "GET", "/api/channels", None, key).await;
        assert_eq!(status, 401, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    server.stop().await;
    let disabled = TestServer::start(|_| {}).await;
    let (status, body) = api(&disabled, "GET", "/api/channels", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "api_disabled");
    disabled.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_the_right_status() {
    let server = TestServer::start(|c| {
        with_api(c);
        c.max_data_size = 100;
    })
    .await;
    let big = format!(
        r#"{{"channel":"a","data":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let too_much_data = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(200));
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        ("POST", "/api/publish", Some("{not json"), 400, "bad_json"),
        // A struct's fields as an array is JSON serde would take; the API wants an object.
        (
            "POST",
            "/api/disconnect",
            Some(r#"["alice"]"#),
            400,
            "bad_json",
        ),
        ("POST", "/api/publish", Some(r#"["a",1]"#), 400, "bad_json"),
        (
            "POST",
            "/api/publish",
            Some(r#"{"channel":"a"}"#),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/api/publish",
            Some(r#"{"channel":7,"data":1}"#),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/api/publish",
            Some(r#"{"channel":"a b","data":1}"#),
            400,
            "invalid_channel",
        ),
        (
            "POST",
            "/api/publish",
            Some(r#"{"channel":"nope:a","data":1}"#),
            400,
            "unknown_namespace",
        ),
        // As the WebSocket `publish` answers (`missing_field`): a publication carries data.
        (
            "POST",
            "/api/publish",
            Some(r#"{"channel":"a","data":null}"#),
            400,
            "missing_field",
        ),
        (
            "POST",
            "/api/broadcast",
            Some(r#"{"channels":["a"],"data":null}"#),
            400,
            "missing_field",
        ),
        ("POST", "/api/publish", Some(&big), 413, "body_too_large"),
        (
            "POST",
            "/api/publish",
            Some(&too_much_data),
            413,
            "data_too_big",
        ),
        (
            "POST",
            "/api/broadcast",
            Some(r#"{"channels":[],"data":1}"#),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/api/disconnect",
            Some(r#"{"user":""}"#),
            400,
            "bad_json",
        ),
        ("GET", "/api/publish", None, 405, "method_not_allowed"),
        (
            "POST",
            "/api/channels",
            Some("{}"),
            405,
            "method_not_allowed",
        ),
        ("GET", "/api/nothing", None, 404, "not_found"),
        (
            "GET",
            "/api/history/news?limit=5000",
            None,
            400,
            "invalid_field",
        ),
    ];
    let (mut ws, _) = v1_client(&server).await;
    let refused = call(
        &mut ws,
        serde_json::json!({"type":"publish","id":1,"channel":"a","data":null}),
    )
    .await;
    assert_eq!(refused["code"], "missing_field", "{refused}");
    for (method, path, body, status, code) in cases {
        let (got, reply) = api(&server, method, path, body).await;
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {reply}"
        );
        assert!(reply["error"]["message"].is_string());
    }
    server.stop().await;
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_with_4501() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "test-secret-0123456789";
    let server = TestServer::start(|c| {
        with_api(c);
        c.jwt_secret = Some(Secret(secret.into()));
    })
    .await;
    let token = encode(
        &Header::default(),
        &json!({"sub":"gus"}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let url = server.url(&format!("/ws?token={token}"));
    let (mut a, _) = join_url(&url).await;
    let (mut b, _) = join_url(&url).await;
    let (status, body) = api(
        &server,
        "POST",
        "/api/disconnect",
        Some(r#"{"user":"gus"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected_here"], 2);
    assert_eq!(recv_close_code(&mut a).await, 4501);
    assert_eq!(recv_close_code(&mut b).await, 4501);
    server.stop().await;
}

/// With a write delay, frames held back for it would already have been written without it:
/// a disconnect does not drop them. The publish is acknowledged only once it is in the
/// subscriber's queue, so the disconnect comes while the frame waits there (or, on a slow
/// machine, after the delay wrote it: the order seen is the same).
#[tokio::test]
async fn disconnect_delivers_what_the_write_delay_held_back_first() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "test-secret-0123456789";
    let server = TestServer::start(|c| {
        with_api(c);
        c.jwt_secret = Some(Secret(secret.into()));
        c.write_delay = Duration::from_millis(100);
    })
    .await;
    let url = |user: &str| {
        let claims = json!({"sub": user});
        let key = EncodingKey::from_secret(secret.as_bytes());
        let token = encode(&Header::default(), &claims, &key).unwrap();
        server.url(&format!("/ws?token={token}"))
    };
    let (mut gus, _) = v1_client_url(&url("gus")).await;
    subscribe(&mut gus, "news").await;
    let (mut publisher, _) = v1_client_url(&url("pia")).await;
    for (id, data) in [(1, "m0"), (2, "m1")] {
        let command = json!({"type":"publish","id":id,"channel":"news","data":data});
        let reply = call(&mut publisher, command).await;
        assert_eq!(reply["type"], "published", "{reply}");
        if id == 1 {
            assert_eq!(recv_json(&mut gus).await["data"], "m0");
        }
    }
    let body = r#"{"user":"gus"}"#;
    let (status, reply) = api(&server, "POST", "/api/disconnect", Some(body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(recv_json(&mut gus).await["data"], "m1");
    assert_eq!(recv_close_code(&mut gus).await, 4501);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_live_values() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, _) = join(&server).await;
    let (mut b, _) = join(&server).await;
    send_text(&mut a, r#"{"sender":"a","content":"hi"}"#).await;
    recv_json(&mut b).await;
    let (status, head, body) = http(server.addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
    };
    assert_eq!(value("rusty_socks_connections"), 2.0);
    assert_eq!(value("rusty_socks_connects_total"), 2.0);
    assert_eq!(value("rusty_socks_messages_in_total"), 1.0);
    assert!(value("rusty_socks_bytes_out_total") > 0.0);
    assert_eq!(
        value("rusty_socks_subscriptions{namespace=\"default\"}"),
        2.0
    );
    assert_eq!(
        value("rusty_socks_refusals_total{reason=\"overload\"}"),
        0.0
    );
    assert_eq!(value("rusty_socks_broker_connected{kind=\"memory\"}"), 1.0);
    assert!(value("rusty_socks_queue_to_socket_seconds_count") >= 1.0);
    for name in [
        "rusty_socks_slow_consumer_closes_total",
        "rusty_socks_gaps_total",
        "rusty_socks_broker_errors_total",
    ] {
        assert_eq!(value(name), 0.0, "{name}");
    }
    server.stop().await;
}

#[tokio::test]
async fn metrics_can_live_on_their_own_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = TestServer::start(|c| c.metrics_addr = Some(addr)).await;
    let (status, _, _) = http(server.addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 404, "not on the main port any more");
    // The listener comes up with the server; wait (bounded) until it accepts.
    let deadline = std::time::Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "metrics listener never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, _, body) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("rusty_socks_connections 0"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_broadcast_reports_each_channel_and_one_bad_channel_does_not_stop_the_others() {
    let server = TestServer::start(with_api).await;
    let (mut ws, _) = v1_client(&server).await;
    subscribe(&mut ws, "late").await;
    let (status, body) = api(
        &server,
        "POST",
        "/api/broadcast",
        Some(r#"{"channels":["early","nope:x","a b","late"],"data":7}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "{body}");
    assert_eq!(results[0]["channel"], "early");
    assert_eq!(results[0]["offset"], 1, "{body}");
    assert_eq!(results[1]["channel"], "nope:x");
    assert_eq!(results[1]["error"]["code"], "unknown_namespace", "{body}");
    assert!(results[1].get("offset").is_none(), "{body}");
    assert_eq!(results[2]["channel"], "a b");
    assert_eq!(results[2]["error"]["code"], "invalid_channel", "{body}");
    assert_eq!(results[3]["channel"], "late");
    assert_eq!(results[3]["offset"], 1, "{body}");
    assert_eq!(
        recv_json(&mut ws).await["data"],
        7,
        "the good channels got it"
    );
    server.stop().await;
}
