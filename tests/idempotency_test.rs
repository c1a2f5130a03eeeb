//! Idempotency keys on publish, end to end: a retried v1 `publish` or server API publish with
//! the same `idempotency_key` gets the first publish's offset with `"duplicate": true`, and
//! subscribers and history see the publication once. Bad keys are refused with a clear error.
//! (Every broker's own behaviour is in the broker conformance suite.)
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rusty_socks::settings::{Config, Secret};
use serde_json::json;
use std::time::Duration;

const KEY: &str = "api-key-0123456789abcdef";

fn with_api(config: &mut Config) {
    config.api_key = Some(Secret(KEY.into()));
}

/// Nothing more arrives on `ws` for a moment (a duplicate delivered nothing).
async fn nothing_more(ws: &mut Ws) {
    let more = tokio::time::timeout(Duration::from_millis(300), recv_json(ws)).await;
    assert!(more.is_err(), "unexpected frame: {more:?}");
}

#[tokio::test]
async fn a_retried_publish_with_the_same_key_is_published_once() {
    let server = TestServer::start(|_| {}).await;
    let (mut subscriber, _) = v1_client(&server).await;
    subscribe(&mut subscriber, "orders").await;
    let (mut publisher, _) = v1_client(&server).await;
    let keyed = |id: u32, data: u32, key: &str| json!({"type":"publish","id":id,"channel":"orders","data":data,"idempotency_key":key});
    let first = call(&mut publisher, keyed(1, 10, "order-17")).await;
    assert_eq!(first["type"], "published", "{first}");
    assert_eq!(first["offset"], 1);
    assert!(first.get("duplicate").is_none(), "{first}");
    let retry = call(&mut publisher, keyed(2, 11, "order-17")).await;
    assert_eq!(retry["type"], "published", "{retry}");
    assert_eq!(retry["offset"], 1, "the first publish's offset");
    assert_eq!(retry["duplicate"], true, "{retry}");
    let other = call(&mut publisher, keyed(3, 12, "order-18")).await;
    assert_eq!(
        (other["offset"].as_u64(), other.get("duplicate")),
        (Some(2), None)
    );

    let push = recv_json(&mut subscriber).await;
    assert_eq!(
        (push["offset"].as_u64(), push["data"].as_u64()),
        (Some(1), Some(10))
    );
    let push = recv_json(&mut subscriber).await;
    assert_eq!(
        (push["offset"].as_u64(), push["data"].as_u64()),
        (Some(2), Some(12))
    );
    nothing_more(&mut subscriber).await;
    let history = call(
        &mut publisher,
        json!({"type":"history","id":4,"channel":"orders","limit":10}),
    )
    .await;
    assert_eq!(offsets(&history["publications"]), vec![1, 2]);
    server.stop().await;
}

#[tokio::test]
async fn bad_idempotency_keys_are_refused_with_invalid_field() {
    let server = TestServer::start(with_api).await;
    let (mut ws, _) = v1_client(&server).await;
    let long = "k".repeat(129);
    for key in [json!(""), json!(7), json!("a\nb"), json!(long)] {
        let reply = call(
            &mut ws,
            json!({"type":"publish","id":1,"channel":"c","data":1,"idempotency_key":key}),
        )
        .await;
        assert_eq!(reply["type"], "error", "{key}: {reply}");
        assert_eq!(reply["code"], "invalid_field", "{key}: {reply}");
        let (status, body) = api_post_keyed(
            KEY,
            &server,
            "/api/publish",
            &json!({"channel":"c","data":1,"idempotency_key":key}),
        )
        .await;
        assert_eq!(status, 400, "{key}: {body}");
        let expected = if key.is_string() {
            "invalid_field"
        } else {
            "bad_json"
        };
        assert_eq!(body["error"]["code"], expected, "{key}: {body}");
    }
    let history = call(&mut ws, json!({"type":"history","id":2,"channel":"c"})).await;
    assert_eq!(history["offset"], 0, "nothing was published: {history}");
    server.stop().await;
}

#[tokio::test]
async fn the_server_api_honours_keys_on_publish_and_per_channel_on_broadcast() {
    let server = TestServer::start(with_api).await;
    let (mut ws, _) = v1_client(&server).await;
    subscribe(&mut ws, "b").await;
    let body = json!({"channel":"a","data":1,"idempotency_key":"k"});
    let (status, first) = api_post_keyed(KEY, &server, "/api/publish", &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    let (status, again) = api_post_keyed(KEY, &server, "/api/publish", &body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        (&again["offset"], &again["epoch"]),
        (&first["offset"], &first["epoch"])
    );
    // The broadcast's key was used on `a` already, not on `b`: only `b` gets it, once.
    let body = json!({"channels":["a","b"],"data":2,"idempotency_key":"k"});
    let (status, broadcast) = api_post_keyed(KEY, &server, "/api/broadcast", &body).await;
    assert_eq!(status, 200, "{broadcast}");
    let results = &broadcast["results"];
    assert_eq!(
        (&results[0]["offset"], &results[0]["duplicate"]),
        (&json!(1), &json!(true))
    );
    assert_eq!(results[1]["offset"], 1, "{broadcast}");
    assert!(results[1].get("duplicate").is_none(), "{broadcast}");
    let (_, retried) = api_post_keyed(KEY, &server, "/api/broadcast", &body).await;
    assert_eq!(retried["results"][1]["duplicate"], true, "{retried}");
    assert_eq!(recv_json(&mut ws).await["data"], 2);
    nothing_more(&mut ws).await;
    server.stop().await;
}
