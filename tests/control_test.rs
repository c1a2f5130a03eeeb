//! Control messages between nodes survive a broken broker link: `/api/disconnect` sent on one
//! node reaches a node whose link to the broker was down at that moment, once the link is
//! back (control messages are kept in history and recovered after a gap, like publications).
//! Also: an idempotency key is honoured across nodes. Two servers in one test, on a real Redis
//! and on a real NATS (`RUSTY_SOCKS_TEST_REDIS_URL`, `RUSTY_SOCKS_TEST_NATS_URL`), one of them
//! behind the fault-injecting proxy.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::proxy::FaultProxy;
use common::*;
use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use rusty_socks::settings::{BrokerUrl, Config, Secret};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const API_KEY: &str = "api-key-0123456789abcdef";
const JWT_SECRET: &str = "test-secret-0123456789";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Nats,
}

impl Kind {
    /// The shared broker's URL; a test that needs it and runs without it fails.
    fn url(self) -> String {
        let (var, example) = match self {
            Kind::Redis => ("RUSTY_SOCKS_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
            Kind::Nats => ("RUSTY_SOCKS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        };
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: this test needs a {self:?} broker, e.g. {var}={example}")
        })
    }

    fn scheme(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }

    fn broker(self, url: String) -> BrokerUrl {
        match self {
            Kind::Redis => BrokerUrl::Redis(url),
            Kind::Nats => BrokerUrl::Nats(url),
        }
    }

    /// The broker's address, for the proxy.
    fn addr(self) -> SocketAddr {
        let url = self.url();
        let rest = url.split("://").nth(1).unwrap();
        let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
        std::net::ToSocketAddrs::to_socket_addrs(host_port)
            .unwrap()
            .next()
            .unwrap()
    }
}

/// A node on `broker` sharing `prefix`, with the server API and tokens.
async fn node(kind: Kind, broker: String, prefix: &str) -> TestServer {
    let prefix = prefix.to_owned();
    TestServer::start(move |c: &mut Config| {
        c.broker = kind.broker(broker);
        c.broker_prefix = prefix;
        c.api_key = Some(Secret(API_KEY.into()));
        c.jwt_secret = Some(Secret(JWT_SECRET.into()));
        c.presence_ttl = Duration::from_secs(3);
    })
    .await
}

fn token(user: &str) -> String {
    encode(
        &Header::default(),
        &json!({ "sub": user }),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// The close code `ws` gets within `within` (`None`: still open then).
async fn closed_within(ws: &mut Ws, within: Duration) -> Option<u16> {
    let wait = async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(within, wait).await.ok().flatten()
}

/// A run's key prefix. What a NATS run created under it is deleted when this is dropped, also
/// when the test fails: each stream reserves JetStream storage on the shared server, and
/// leftovers pile up until it refuses new streams.
struct Prefix {
    #[cfg_attr(
        not(feature = "nats"),
        expect(dead_code, reason = "read only to clean up after NATS")
    )]
    kind: Kind,
    name: String,
}

impl std::ops::Deref for Prefix {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        #[cfg(feature = "nats")]
        if let Kind::Nats = self.kind {
            delete_nats_prefix(&self.kind.url(), &self.name);
        }
    }
}

fn prefix(kind: Kind) -> Prefix {
    Prefix {
        kind,
        name: format!("ctl{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
    }
}

async fn a_disconnect_reaches_a_node_whose_broker_link_was_down(kind: Kind) {
    let prefix = prefix(kind);
    let proxy = FaultProxy::start(kind.addr()).await;
    let a = node(kind, kind.url(), &prefix).await;
    let b = node(kind, proxy.url(kind.scheme()), &prefix).await;
    let url = b.url(&format!("/ws?token={}", token("gus")));
    let (mut gus, _) = v1_client_url(&url).await;
    // A first disconnect of someone else, while the link is up: the link works.
    let (mut ida, _) = v1_client_url(&b.url(&format!("/ws?token={}", token("ida")))).await;
    let (status, body) =
        api_post_keyed(API_KEY, &a, "/api/disconnect", &json!({"user":"ida"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        closed_within(&mut ida, WAIT).await,
        Some(4501),
        "the link works"
    );

    proxy.black_hole();
    let (status, body) =
        api_post_keyed(API_KEY, &a, "/api/disconnect", &json!({"user":"gus"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected_here"], 0, "gus is on the other node");
    assert_eq!(
        closed_within(&mut gus, Duration::from_millis(500)).await,
        None,
        "node b cannot have heard of it: its broker link is down"
    );
    // The link comes back (the connections that were cut get an RST, new ones pass).
    proxy.reset();
    assert_eq!(
        closed_within(&mut gus, Duration::from_secs(20)).await,
        Some(4501),
        "the disconnect reached node b once its link was back"
    );
    b.stop().await;
    a.stop().await;
}

async fn an_idempotency_key_is_honoured_across_nodes(kind: Kind) {
    let prefix = prefix(kind);
    let a = node(kind, kind.url(), &prefix).await;
    let b = node(kind, kind.url(), &prefix).await;
    let body = json!({"channel":"orders","data":1,"idempotency_key":"order-1"});
    let (status, first) = api_post_keyed(API_KEY, &a, "/api/publish", &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    let (status, retry) = api_post_keyed(API_KEY, &b, "/api/publish", &body).await;
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(
        (&retry["offset"], &retry["epoch"]),
        (&first["offset"], &first["epoch"])
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_a_disconnect_reaches_a_node_whose_broker_link_was_down() {
    a_disconnect_reaches_a_node_whose_broker_link_was_down(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_a_disconnect_reaches_a_node_whose_broker_link_was_down() {
    a_disconnect_reaches_a_node_whose_broker_link_was_down(Kind::Nats).await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_an_idempotency_key_is_honoured_across_nodes() {
    an_idempotency_key_is_honoured_across_nodes(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_an_idempotency_key_is_honoured_across_nodes() {
    an_idempotency_key_is_honoured_across_nodes(Kind::Nats).await;
}
