//! Cluster-wide transitions on one node (memory broker): real server, real WebSocket clients,
//! and a recording `TransitionSink` set on the node before it serves.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::recording::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::engine::namespace::NamespaceOptions;
use rusty_socks::server::Prepared;
use rusty_socks::settings::{Config, Secret};
use serde_json::json;
use tokio::net::TcpListener;

const SECRET: &str = "test-secret-0123456789";

struct Server {
    url: String,
    recording: Arc<Recording>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config {
        host: "127.0.0.1".parse().unwrap(),
        port: 0,
        ..Config::default()
    };
    tweak(&mut config);
    let prepared = Prepared::new(config).await.unwrap();
    let recording = Arc::new(Recording::default());
    prepared
        .node()
        .set_transition_sink(recording.clone())
        .unwrap();
    assert!(
        prepared
            .node()
            .set_transition_sink(recording.clone())
            .is_err(),
        "a second sink is refused"
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(prepared.serve(listener, async move {
        let _ = stopped.await;
    }));
    Server {
        url,
        recording,
        stop: Some(stop),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn with_users(config: &mut Config) {
    config.jwt_secret = Some(Secret(SECRET.into()));
    config.namespaces.insert(
        "quiet",
        NamespaceOptions {
            presence: false,
            ..NamespaceOptions::default()
        },
    );
}

async fn as_user(server: &Server, user: &str) -> Ws {
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": user }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    v1_client_url(&format!("{}?token={token}", server.url))
        .await
        .0
}

async fn unsubscribe(ws: &mut Ws, channel: &str) {
    let reply = call(ws, json!({"type":"unsubscribe","id":99,"channel":channel})).await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
}

#[tokio::test]
async fn channels_and_members_transition_once_per_change() {
    let server = start(with_users).await;
    let rec = server.recording.clone();
    let mut a = as_user(&server, "u1").await;
    let mut b = as_user(&server, "u1").await;
    let mut c = as_user(&server, "u2").await;

    assert_eq!(subscribe(&mut a, "room").await["type"], "subscribed");
    let got = rec.wait_for(2).await;
    assert_eq!(
        got,
        vec![
            ev("channel_occupied", "room", None),
            ev("member_added", "room", Some("u1")),
        ]
    );
    // The same user on a second connection, and a channel without presence: no member
    // events there, only its occupancy.
    assert_eq!(subscribe(&mut b, "room").await["type"], "subscribed");
    assert_eq!(subscribe(&mut a, "quiet:x").await["type"], "subscribed");
    assert_eq!(subscribe(&mut c, "room").await["type"], "subscribed");
    let got = rec.wait_for(4).await;
    assert_eq!(
        got[2..],
        [
            ev("channel_occupied", "quiet:x", None),
            ev("member_added", "room", Some("u2")),
        ]
    );
    // u1 still has a connection on room: its first one leaving changes nothing.
    unsubscribe(&mut a, "room").await;
    unsubscribe(&mut a, "quiet:x").await;
    let got = rec.wait_for(5).await;
    assert_eq!(got[4], ev("channel_vacated", "quiet:x", None));
    // u1's last connection goes away without unsubscribing.
    drop(b);
    let got = rec.wait_for(6).await;
    assert_eq!(got[5], ev("member_removed", "room", Some("u1")));
    unsubscribe(&mut c, "room").await;
    let got = rec.wait_for(8).await;
    assert_eq!(
        got[6..],
        [
            ev("member_removed", "room", Some("u2")),
            ev("channel_vacated", "room", None),
        ]
    );
    // Occupied again by the next subscriber.
    assert_eq!(subscribe(&mut a, "room").await["type"], "subscribed");
    let got = rec.wait_for(10).await;
    assert_eq!(
        got[8..],
        [
            ev("channel_occupied", "room", None),
            ev("member_added", "room", Some("u1")),
        ]
    );
    drop(a);
    drop(c);
    let got = rec.wait_for(12).await;
    assert_eq!(
        got[10..],
        [
            ev("member_removed", "room", Some("u1")),
            ev("channel_vacated", "room", None),
        ]
    );
    server.stop().await;
    assert_eq!(rec.all().len(), 12, "{:?}", rec.all());
    // One node decides alone: `seq` follows the order of its decisions, one id each.
    let decided = rec.transitions();
    assert!(
        decided.windows(2).all(|w| w[0].seq < w[1].seq),
        "{decided:?}"
    );
    let ids: std::collections::HashSet<_> = decided.iter().map(|t| t.id).collect();
    assert_eq!(ids.len(), decided.len());
}

#[tokio::test]
async fn anonymous_subscribers_occupy_channels_without_member_events() {
    let server = start(|_| {}).await;
    let rec = server.recording.clone();
    let (mut a, _) = v1_client_url(&server.url).await;
    let (mut b, _) = v1_client_url(&server.url).await;
    assert_eq!(subscribe(&mut a, "lobby").await["type"], "subscribed");
    assert_eq!(subscribe(&mut b, "lobby").await["type"], "subscribed");
    assert_eq!(
        rec.wait_for(1).await,
        vec![ev("channel_occupied", "lobby", None)]
    );
    drop(a);
    unsubscribe(&mut b, "lobby").await;
    assert_eq!(
        rec.wait_for(2).await,
        vec![
            ev("channel_occupied", "lobby", None),
            ev("channel_vacated", "lobby", None),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_shutting_down_reports_what_its_closed_sessions_left() {
    let server = start(with_users).await;
    let rec = server.recording.clone();
    let mut a = as_user(&server, "u1").await;
    assert_eq!(subscribe(&mut a, "room").await["type"], "subscribed");
    rec.wait_for(2).await;
    server.stop().await;
    assert_eq!(
        rec.all()[2..],
        [
            ev("member_removed", "room", Some("u1")),
            ev("channel_vacated", "room", None),
        ],
        "told before the server returned"
    );
}
