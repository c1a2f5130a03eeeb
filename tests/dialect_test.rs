//! Which dialect a `/ws` connection speaks, over real sockets: offering the `rusty-socks.v1`
//! subprotocol makes a v1-only connection (a `welcome`, no legacy traffic, never on
//! `default`); a connection without it keeps the legacy contract (`Connect`, replay, `Chat`,
//! `Disconnect`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A legacy chat message from `sender`.
fn chat(sender: &str, content: &str) -> String {
    json!({"sender": sender, "content": content}).to_string()
}

#[tokio::test]
async fn a_v1_connection_gets_the_welcome_first_and_no_legacy_frame_while_legacy_clients_chat() {
    let server = TestServer::start(|_| {}).await;
    let (mut old, _) = join(&server).await;
    send_text(&mut old, &chat("old", "before anyone else")).await;
    let (mut v1, v1_id) = tokio::time::timeout(WAIT, async {
        let (mut ws, response) = tokio_tungstenite::connect_async(v1_request(&server.url("/ws")))
            .await
            .unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "rusty-socks.v1"
        );
        let welcome = recv_json(&mut ws).await;
        (ws, welcome)
    })
    .await
    .map(|(ws, welcome)| {
        assert_eq!(welcome["type"], "welcome", "the first frame: {welcome}");
        assert_eq!(welcome["version"], env!("CARGO_PKG_VERSION"), "{welcome}");
        assert_eq!(welcome["user"], json!(null), "anonymous: {welcome}");
        assert!(welcome.get("expires_at").is_none(), "no token: {welcome}");
        let id = welcome["client_id"].as_str().unwrap().to_owned();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        (ws, id)
    })
    .unwrap();

    // Legacy traffic while the v1 connection is open: a newcomer, chat, a leaver.
    let (mut newcomer, _) = join(&server).await;
    let replayed = recv_json(&mut newcomer).await;
    assert_eq!(replayed["content"], "before anyone else", "{replayed}");
    send_text(&mut newcomer, &chat("newcomer", "hello")).await;
    assert_eq!(recv_json(&mut old).await["content"], "hello");
    old.send(Message::Close(None)).await.unwrap();
    let gone = recv_json(&mut newcomer).await;
    assert_eq!(gone["type"], "Disconnect", "{gone}");
    // The newcomer saw all of it, so the v1 connection would have by now too. Its next frame
    // is the reply to its own command: nothing legacy came before.
    let reply = call(
        &mut v1,
        json!({"type":"history","id":1,"channel":"default"}),
    )
    .await;
    assert_eq!(reply["type"], "history", "{reply}");
    assert_eq!(
        reply["publications"].as_array().unwrap().len(),
        2,
        "{reply}"
    );

    // It never joins `default`: not on open, not on request, so a gap there (4002 for legacy
    // clients) cannot close it.
    let reply = call(
        &mut v1,
        json!({"type":"subscribe","id":2,"channel":"default"}),
    )
    .await;
    assert_eq!(reply["code"], "permission_denied", "{reply}");
    let reply = call(
        &mut v1,
        json!({"type":"unsubscribe","id":3,"channel":"default"}),
    )
    .await;
    assert_eq!(reply["code"], "not_subscribed", "{reply}");
    // What a legacy connection would answer with a legacy `Error` gets a v1 `error` here.
    send_text(&mut v1, &chat("v1", "legacy chat from a v1 connection")).await;
    let reply = recv_json(&mut v1).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "missing_field", "{reply}");
    send_text(&mut v1, "not json").await;
    let reply = recv_json(&mut v1).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "invalid_json", "{reply}");
    v1.send(Message::binary(vec![1u8, 2])).await.unwrap();
    let reply = recv_json(&mut v1).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "binary_not_supported", "{reply}");
    // Its legacy chat was not published: the newcomer got nothing.
    send_text(&mut newcomer, &chat("newcomer", "still here")).await;
    let reply = call(
        &mut v1,
        json!({"type":"history","id":4,"channel":"default"}),
    )
    .await;
    let contents: Vec<&str> = reply["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["before anyone else", "hello", "still here"]);

    // v1 works as usual, and the connection's id is the welcome's.
    subscribe(&mut v1, "room").await;
    publish(&mut v1, "room", json!("mine")).await;
    let push = recv_json(&mut v1).await;
    assert_eq!(push["type"], "publication", "{push}");
    assert_eq!(push["client_id"], v1_id.as_str(), "{push}");
    // Leaving: the legacy clients hear nothing of it. Once only the newcomer is connected,
    // its next frame is the reply to its own command, not a `Disconnect`.
    v1.send(Message::Close(None)).await.unwrap();
    server.wait_for_stat("connections", 1).await;
    let reply = call(
        &mut newcomer,
        json!({"type":"history","id":5,"channel":"default","limit":1}),
    )
    .await;
    assert_eq!(reply["type"], "history", "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn a_legacy_connection_still_gets_connect_and_the_replay() {
    let server = TestServer::start(|_| {}).await;
    let (mut first, first_id) = join(&server).await;
    for n in 1..=3 {
        send_text(&mut first, &chat("first", &format!("message {n}"))).await;
    }
    // A v1 connection in the middle changes nothing for the legacy ones.
    let (_v1, _) = v1_client(&server).await;
    let (mut second, second_id) = join(&server).await;
    assert_ne!(first_id, second_id);
    for n in 1..=3 {
        let replayed = recv_json(&mut second).await;
        assert_eq!(replayed["type"], "Chat", "{replayed}");
        assert_eq!(replayed["content"], format!("message {n}"), "{replayed}");
    }
    send_text(&mut second, &chat("second", "hi")).await;
    let got = recv_json(&mut first).await;
    assert_eq!(got["type"], "Chat", "{got}");
    assert_eq!(got["content"], "hi");
    second.send(Message::Close(None)).await.unwrap();
    let gone = recv_json(&mut first).await;
    assert_eq!(gone, json!({"type":"Disconnect","client_id":second_id}));
    server.stop().await;
}
