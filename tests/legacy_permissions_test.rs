//! Legacy chat on `default` obeys the unnamed namespace `""` (publish, subscribe, read_history)
//! and, on a connection with a token, carries the token's user as `sender`. Real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::engine::namespace::{Access, NamespaceOptions};
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-0123456789";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Tokens verified, anonymous connections let in, and `""` configured as `unnamed`.
fn server_with(unnamed: NamespaceOptions) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.jwt_secret = Some(Secret(SECRET.into()));
        c.allow_anonymous = true;
        c.namespaces.insert("", unnamed);
    }
}

/// A legacy connection authenticated as `sub`, after its `Connect`.
async fn legacy_as(server: &TestServer, sub: &str) -> Ws {
    join_url(&server.url(&format!("/ws?token={}", token(sub))))
        .await
        .0
}

fn chat(sender: &str, content: &str) -> String {
    json!({"sender": sender, "content": content}).to_string()
}

/// Sends a message that is not an object and returns the next frame, which must be its
/// `invalid_message` error: everything queued for the client before it has been received, so
/// this shows that nothing else was (or that the previous message was fully handled).
async fn next_is_only_the_reply_to_a_probe(ws: &mut Ws) {
    send_text(ws, "[]").await;
    let next = recv_json(ws).await;
    assert_eq!(
        (&next["type"], &next["code"]),
        (&json!("Error"), &json!("invalid_message")),
        "expected nothing before the probe's reply, got {next}"
    );
}

fn assert_denied(frame: &Value) {
    assert_eq!(
        (&frame["type"], &frame["code"]),
        (&json!("Error"), &json!("permission_denied")),
        "{frame}"
    );
}

#[tokio::test]
async fn legacy_chat_needs_the_publish_right_of_the_unnamed_namespace() {
    let server = TestServer::start(server_with(NamespaceOptions {
        publish: Access::Authenticated,
        ..NamespaceOptions::default()
    }))
    .await;
    let mut gil = legacy_as(&server, "gil").await;
    let (mut anon, _) = join(&server).await;

    send_text(&mut anon, &chat("anon", "let me in")).await;
    assert_denied(&recv_json(&mut anon).await);
    // Nothing was published: gil's next frame is the reply to its own probe.
    next_is_only_the_reply_to_a_probe(&mut gil).await;

    // A user with a token chats, and the anonymous one (who may subscribe) receives it.
    send_text(&mut gil, &chat("gil", "members only")).await;
    let got = recv_json(&mut anon).await;
    assert_eq!(
        (&got["type"], &got["content"]),
        (&json!("Chat"), &json!("members only")),
        "{got}"
    );
    // The same rule as v1 on a channel without ':'.
    let reply = call(
        &mut anon,
        json!({"type":"publish","id":1,"channel":"lobby","data":1}),
    )
    .await;
    assert_eq!(reply["code"], "permission_denied", "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn the_welcome_replay_needs_the_read_history_right() {
    let server = TestServer::start(server_with(NamespaceOptions {
        read_history: Access::Authenticated,
        ..NamespaceOptions::default()
    }))
    .await;
    let mut gil = legacy_as(&server, "gil").await;
    send_text(&mut gil, &chat("gil", "stored")).await;
    // Messages are handled in order: once the probe is answered, the chat is stored.
    next_is_only_the_reply_to_a_probe(&mut gil).await;

    // An anonymous newcomer gets no replay ...
    let (mut anon, _) = join(&server).await;
    next_is_only_the_reply_to_a_probe(&mut anon).await;
    let reply = call(
        &mut anon,
        json!({"type":"history","id":1,"channel":"default"}),
    )
    .await;
    assert_eq!(reply["code"], "permission_denied", "{reply}");
    // ... one with a token does.
    let mut hal = legacy_as(&server, "hal").await;
    let replayed = recv_json(&mut hal).await;
    assert_eq!(
        (&replayed["type"], &replayed["content"]),
        (&json!("Chat"), &json!("stored")),
        "{replayed}"
    );
    // Live chat still reaches the anonymous one: reading live is the `subscribe` right.
    send_text(&mut gil, &chat("gil", "live")).await;
    assert_eq!(recv_json(&mut anon).await["content"], "live");
    server.stop().await;
}

#[tokio::test]
async fn membership_of_the_default_channel_needs_the_subscribe_right() {
    let server = TestServer::start(server_with(NamespaceOptions {
        subscribe: Access::Authenticated,
        ..NamespaceOptions::default()
    }))
    .await;
    let (mut anon, _) = join(&server).await;
    // Told at once why no chat will come.
    assert_denied(&recv_json(&mut anon).await);
    let mut gil = legacy_as(&server, "gil").await;
    let mut hal = legacy_as(&server, "hal").await;

    send_text(&mut gil, &chat("gil", "for members")).await;
    assert_eq!(recv_json(&mut hal).await["content"], "for members");
    // Delivered to every member at once: had the anonymous one been a member, it would be
    // queued before the probe's reply.
    next_is_only_the_reply_to_a_probe(&mut anon).await;
    // Publishing is a separate right, which `""` still gives to anyone.
    send_text(&mut anon, &chat("anon", "hello from outside")).await;
    let got = recv_json(&mut hal).await;
    assert_eq!(
        (&got["sender"], &got["content"]),
        (&json!("anon"), &json!("hello from outside")),
        "{got}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_token_sets_the_sender_and_anonymous_chat_is_unchanged() {
    // No namespace settings: the defaults keep the original behaviour.
    let server = TestServer::start(|c| {
        c.jwt_secret = Some(Secret(SECRET.into()));
        c.allow_anonymous = true;
    })
    .await;
    let mut gil = legacy_as(&server, "gil").await;
    let (mut anon, _) = join(&server).await;

    send_text(&mut gil, &chat("mallory", "who am I?")).await;
    let got = recv_json(&mut anon).await;
    assert_eq!(
        (&got["type"], &got["sender"], &got["content"]),
        (&json!("Chat"), &json!("gil"), &json!("who am I?")),
        "the token's sub, whatever the client wrote: {got}"
    );
    send_text(&mut anon, &chat("whoever", "free-form")).await;
    let got = recv_json(&mut gil).await;
    assert_eq!(
        got["sender"], "whoever",
        "anonymous senders are as written: {got}"
    );

    // Stored as broadcast: a newcomer's replay shows the same senders.
    let (mut newcomer, _) = join(&server).await;
    let first = recv_json(&mut newcomer).await;
    let second = recv_json(&mut newcomer).await;
    assert_eq!(
        (&first["sender"], &second["sender"]),
        (&json!("gil"), &json!("whoever")),
        "{first} {second}"
    );
    server.stop().await;
}
