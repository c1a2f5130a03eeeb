//! Server API requests are bounded by `RUSTY_SOCKS_API_TIMEOUT`, not by the handshake deadline
//! that bounds how long a socket may take to send its request headers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "api-key-0123456789abcdef";

fn slow_api(config: &mut Config, api_timeout: u64) {
    config.api_key = Some(Secret(KEY.into()));
    config.handshake_timeout = Duration::from_secs(1);
    config.api_timeout = Duration::from_secs(api_timeout);
}

/// Sends the request head of a `POST /api/publish` with a body of `body.len()` bytes, then
/// the body in `pieces` pieces `pause` apart (only the first `sent` pieces), and returns the
/// response: (status, JSON body).
async fn publish_slowly(
    server: &TestServer,
    body: &str,
    pieces: usize,
    sent: usize,
    pause: Duration,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: apikey {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let size = body.len().div_ceil(pieces);
    for piece in body.as_bytes().chunks(size).take(sent) {
        tokio::time::sleep(pause).await;
        // The server may have answered (and closed) already: the response tells.
        if stream.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("an answer within the wait")
        .unwrap();
    assert!(!raw.is_empty(), "the connection closed without an answer");
    let (status, head, body) = split_response(&raw);
    assert!(head.contains("application/json"), "{head}");
    (status, serde_json::from_str(&body).unwrap())
}

#[tokio::test]
async fn a_slow_api_request_within_the_api_timeout_outlives_the_handshake_timeout() {
    let server = TestServer::start(|c| slow_api(c, 5)).await;
    let (mut ws, _) = v1_client(&server).await;
    subscribe(&mut ws, "slow").await;
    // The body takes about 2 s to arrive: longer than the 1 s handshake timeout, well within
    // the 5 s API timeout.
    let body = json!({"channel":"slow","data":{"n":1}}).to_string();
    let (status, reply) = publish_slowly(&server, &body, 4, 4, Duration::from_millis(500)).await;
    assert_eq!(status, 200, "{reply}");
    let offset = reply["offset"].as_u64().unwrap();
    let push = recv_json(&mut ws).await;
    assert_eq!(push["channel"], "slow", "{push}");
    assert_eq!(push["offset"], offset, "{push}");
    server.stop().await;
}

#[tokio::test]
async fn an_api_request_past_the_api_timeout_gets_504_with_a_json_error() {
    let server = TestServer::start(|c| slow_api(c, 2)).await;
    let (mut ws, _) = v1_client(&server).await;
    subscribe(&mut ws, "stalled").await;
    // Half the body, then nothing.
    let body = json!({"channel":"stalled","data":{"n":1}}).to_string();
    let (status, reply) = publish_slowly(&server, &body, 2, 1, Duration::ZERO).await;
    assert_eq!(status, 504, "{reply}");
    assert_eq!(reply["error"]["code"], "timeout", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("RUSTY_SOCKS_API_TIMEOUT"), "{message}");
    // Nothing was published: the next publication is the first the subscriber gets.
    let body = json!({"channel":"stalled","data":{"n":2}}).to_string();
    let (status, reply) = publish_slowly(&server, &body, 1, 1, Duration::ZERO).await;
    assert_eq!(status, 200, "{reply}");
    let push = recv_json(&mut ws).await;
    assert_eq!(push["data"]["n"], 2, "{push}");
    server.stop().await;
}
