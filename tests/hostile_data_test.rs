//! JSON that is valid but that readers could not parse back (10,000 nested arrays, `1e400`,
//! a 400-digit integer, lone surrogate escapes) is refused on every path that publishes,
//! so it is never stored, and the channel's history stays readable. Real sockets and HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "api-key-0123456789abcdef";

/// `data` values a client can send as JSON text that must be refused.
fn hostile() -> Vec<String> {
    vec![
        // 20,000 bytes: under the 32 KiB data limit, so it is the nesting that is refused.
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("{}1{}", r#"{"a":"#.repeat(65), "}".repeat(65)),
        "1e400".to_owned(),
        r#"{"price":-1e400}"#.to_owned(),
        // Too long for any float; shorter integers past 64 bits are kept (read as floats).
        format!("[{}]", "9".repeat(400)),
        r#"{"text":"\ud800"}"#.to_owned(),
    ]
}

/// The next frame, which must parse as JSON (the harness parses with serde_json).
async fn refusal(ws: &mut Ws) -> Value {
    let reply = recv_json(ws).await;
    assert_eq!(reply["code"], "invalid_data", "{reply}");
    reply
}

#[tokio::test]
async fn a_v1_publish_of_hostile_data_is_refused_and_history_stays_readable() {
    let server = TestServer::start(|_| {}).await;
    let (mut publisher, _) = v1_client(&server).await;
    let (mut reader, _) = v1_client(&server).await;
    subscribe(&mut reader, "lobby").await;
    for (n, data) in hostile().iter().enumerate() {
        send_text(
            &mut publisher,
            &format!(r#"{{"type":"publish","id":{n},"channel":"lobby","data":{data}}}"#),
        )
        .await;
        let reply = refusal(&mut publisher).await;
        assert_eq!(
            (&reply["type"], &reply["id"]),
            (&json!("error"), &json!(n)),
            "{reply}"
        );
    }
    // The connection is fine, and nothing was stored: the next publication is the first.
    assert_eq!(
        publish(&mut publisher, "lobby", json!({"ok":true})).await,
        1
    );
    let push = recv_json(&mut reader).await;
    assert_eq!(
        push["data"],
        json!({"ok":true}),
        "only the good one: {push}"
    );
    let history = call(
        &mut reader,
        json!({"type":"history","id":"h","channel":"lobby"}),
    )
    .await;
    assert_eq!(offsets(&history["publications"]), vec![1], "{history}");
    // 64 levels are fine, and read back as sent.
    let deep_ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
    send_text(
        &mut publisher,
        &format!(r#"{{"type":"publish","id":"ok","channel":"lobby","data":{deep_ok}}}"#),
    )
    .await;
    assert_eq!(recv_json(&mut publisher).await["offset"], 2);
    let push = recv_json(&mut reader).await;
    assert_eq!(push["data"].to_string(), deep_ok);
    server.stop().await;
}

/// One API request; returns the status and the body as text, which must parse as JSON.
async fn api(server: &TestServer, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: apikey {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (status, _, body) = split_response(&raw);
    let parsed = serde_json::from_str(&body)
        .unwrap_or_else(|err| panic!("the answer does not parse ({err}): {body:.200}"));
    (status, parsed)
}

#[tokio::test]
async fn the_api_refuses_hostile_data_with_400() {
    let server = TestServer::start(|c: &mut Config| c.api_key = Some(Secret(KEY.into()))).await;
    for data in hostile() {
        let body = format!(r#"{{"channel":"news","data":{data}}}"#);
        let (status, answer) = api(&server, "POST", "/api/publish", &body).await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!("invalid_data")),
            "{answer}"
        );
        let body = format!(r#"{{"channels":["news","other"],"data":{data}}}"#);
        let (status, answer) = api(&server, "POST", "/api/broadcast", &body).await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!("invalid_data")),
            "{answer}"
        );
    }
    let (status, answer) = api(
        &server,
        "POST",
        "/api/publish",
        r#"{"channel":"news","data":[1.5,-0,18446744073709551615,1e308]}"#,
    )
    .await;
    assert_eq!((status, &answer["offset"]), (200, &json!(1)), "{answer}");
    let (status, history) = api(&server, "GET", "/api/history/news", "").await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(offsets(&history["publications"]), vec![1], "{history}");
    assert_eq!(
        history["publications"][0]["data"],
        json!([1.5, -0.0, 18446744073709551615u64, 1e308])
    );
    server.stop().await;
}

#[tokio::test]
async fn a_legacy_message_with_hostile_json_gets_an_error_and_is_not_stored() {
    let server = TestServer::start(|_| {}).await;
    let (mut sender, _) = join(&server).await;
    let hostile_messages = [
        // An ignored extra field still has to be JSON a reader could parse.
        format!(
            r#"{{"sender":"a","content":"x","extra":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        ),
        r#"{"sender":"a","content":"x","extra":1e400}"#.to_owned(),
        r#"{"sender":"a","content":"x\udc00"}"#.to_owned(),
    ];
    for text in &hostile_messages {
        send_text(&mut sender, text).await;
        let reply = refusal(&mut sender).await;
        assert_eq!(reply["type"], "Error", "{reply}");
    }
    send_text(&mut sender, r#"{"sender":"a","content":"fine"}"#).await;
    // Messages are handled in order: once this is answered, the chat above is stored.
    send_text(&mut sender, "[]").await;
    assert_eq!(recv_json(&mut sender).await["code"], "invalid_message");
    // A newcomer's replay holds only the good message, and its history reads back.
    let (mut newcomer, _) = join(&server).await;
    let replayed = recv_json(&mut newcomer).await;
    assert_eq!(replayed["content"], "fine", "{replayed}");
    let history = call(
        &mut newcomer,
        json!({"type":"history","id":1,"channel":"default"}),
    )
    .await;
    assert_eq!(offsets(&history["publications"]), vec![1], "{history}");
    server.stop().await;
}
