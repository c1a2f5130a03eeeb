//! The backend proxy (issue 15): connect decided before the upgrade, subscribe and publish
//! asked per namespace, against a real HTTP backend on port 0.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::backend::{Backend, Recorded, Reply};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::engine::backend::{BackendUrl, ProxyOptions};
use rusty_socks::engine::namespace::{NamespaceOptions, Namespaces};
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderMap, HeaderName};

const SECRET: &str = "test-secret-0123456789";
const KEY: &str = "api-key-0123456789abcdef";

fn url(backend: &Backend, path: &str) -> Option<BackendUrl> {
    Some(BackendUrl::parse(&backend.url(path)).unwrap())
}

/// The connect answer: a session cookie admits its user, anything else is refused.
fn by_cookie(req: &Recorded) -> Reply {
    let cookie = req.body["headers"]["cookie"].as_str().unwrap_or_default();
    if cookie.contains("session=ann") {
        Reply::json(json!({"result":{"user":"u42","info":{"name":"Ann"},"channels":["chat:*"]}}))
    } else {
        Reply::json(json!({"error":{"code":1000,"message":"log in first"}}))
    }
}

fn connect_proxy(backend: &Backend) -> impl FnOnce(&mut Config) + '_ {
    move |config: &mut Config| {
        config.proxy = ProxyOptions {
            connect_url: url(backend, "/connect"),
            timeout: Duration::from_secs(1),
            ..ProxyOptions::default()
        };
    }
}

/// An upgrade of `path` with extra `headers`: the 101's WebSocket, or the refusal's status and
/// headers.
async fn upgrade(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, (u16, HeaderMap)> {
    let mut request = server.url(path).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("upgrade timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err((response.status().as_u16(), response.headers().clone()))
        }
        Err(other) => panic!("upgrade failed: {other}"),
    }
}

#[tokio::test]
async fn the_connect_proxy_admits_by_cookie_as_the_backend_user() {
    let backend = Backend::start(by_cookie).await;
    let server = TestServer::start(connect_proxy(&backend)).await;

    let mut ws = upgrade(
        &server,
        "/ws?room=7",
        &[
            ("cookie", "session=ann; theme=dark"),
            ("sec-websocket-protocol", "rusty-socks.v1"),
            ("origin", "http://app.example"),
        ],
    )
    .await
    .expect("admitted");
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], "u42");
    let asked = &backend.requests()[0];
    assert_eq!(asked.path, "/connect");
    assert_eq!(asked.body["client"], welcome["client_id"], "{}", asked.body);
    assert_eq!(asked.body["remote_addr"], "127.0.0.1");
    assert_eq!(asked.body["query"], "room=7");
    assert_eq!(asked.body["headers"]["cookie"], "session=ann; theme=dark");
    assert_eq!(asked.body["headers"]["origin"], "http://app.example");
    assert_eq!(asked.headers["content-type"], "application/json");

    // The backend's user is the connection's everywhere: presence shows it with its info,
    // and the `channels` it listed are the token's.
    call(
        &mut ws,
        json!({"type":"subscribe","id":1,"channel":"lobby"}),
    )
    .await;
    let presence = call(&mut ws, json!({"type":"presence","id":2,"channel":"lobby"})).await;
    assert_eq!(presence["clients"][0]["user"], "u42", "{presence}");
    assert_eq!(presence["clients"][0]["info"], json!({"name":"Ann"}));

    // The legacy dialect goes through the same decision.
    let mut legacy = upgrade(&server, "/ws", &[("cookie", "session=ann")])
        .await
        .expect("admitted");
    let hello = recv_json(&mut legacy).await;
    assert_eq!(hello["type"], "Connect", "{hello}");
    assert_eq!(backend.requests()[1].body["client"], hello["client_id"]);
    server.stop().await;
}

#[tokio::test]
async fn the_connect_proxy_refuses_with_403_before_the_upgrade() {
    let backend = Backend::start(|req: &Recorded| {
        if req.body["query"] == "broken=1" {
            Reply::raw(500, "oops")
        } else if req.body["query"] == "garbage=1" {
            Reply::raw(200, "not json")
        } else {
            by_cookie(req)
        }
    })
    .await;
    let server = TestServer::start(connect_proxy(&backend)).await;
    for (path, cookie) in [
        ("/ws", "session=bob"),
        ("/ws", ""),
        ("/ws?broken=1", "session=ann"),
        ("/ws?garbage=1", "session=ann"),
    ] {
        let headers: Vec<(&str, &str)> = if cookie.is_empty() {
            vec![]
        } else {
            vec![("cookie", cookie)]
        };
        let (status, _) = upgrade(&server, path, &headers).await.expect_err("refused");
        assert_eq!(status, 403, "{path} {cookie}");
    }
    // The refusal carries the backend's message, before any 101.
    let (status, _, body) = http(
        server.addr,
        "GET",
        "/ws",
        &[UPGRADE_HEADERS.as_slice(), &[("cookie", "x=1")]].concat(),
    )
    .await;
    assert_eq!((status, body.trim()), (403, "log in first"));
    let metrics = http(server.addr, "GET", "/metrics", &[]).await.2;
    assert!(
        metrics.contains(r#"rusty_socks_proxy_calls_total{kind="connect",outcome="refused"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"rusty_socks_proxy_calls_total{kind="connect",outcome="error"} 2"#));
    assert!(
        metrics.contains(r#"rusty_socks_refusals_total{reason="proxy"} 5"#),
        "{metrics}"
    );
    assert!(metrics.contains("rusty_socks_proxy_call_seconds_count{kind=\"connect\"} 5"));
    server.stop().await;
}

#[tokio::test]
async fn a_valid_token_skips_the_backend_unless_connect_always() {
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"tok-user"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    for always in [false, true] {
        let backend = Backend::start(by_cookie).await;
        let server = TestServer::start(|config: &mut Config| {
            connect_proxy(&backend)(config);
            config.proxy.connect_always = always;
            config.jwt_secret = Some(Secret(SECRET.into()));
        })
        .await;
        let path = format!("/ws?token={token}");
        let result = upgrade(
            &server,
            &path,
            &[("sec-websocket-protocol", "rusty-socks.v1")],
        )
        .await;
        if always {
            // No session cookie: the backend refuses even a valid token.
            assert_eq!(result.err().map(|(s, _)| s), Some(403));
            assert_eq!(backend.requests().len(), 1);
            let mut ws = upgrade(
                &server,
                &path,
                &[
                    ("sec-websocket-protocol", "rusty-socks.v1"),
                    ("cookie", "session=ann"),
                ],
            )
            .await
            .expect("admitted");
            assert_eq!(recv_json(&mut ws).await["user"], "u42");
        } else {
            let mut ws = result.expect("a valid token is enough");
            assert_eq!(recv_json(&mut ws).await["user"], "tok-user");
            assert!(backend.requests().is_empty(), "the backend was asked");
            // A bad token is no token: the backend decides.
            let mut ws = upgrade(
                &server,
                "/ws?token=not.a.jwt",
                &[
                    ("sec-websocket-protocol", "rusty-socks.v1"),
                    ("cookie", "session=ann"),
                ],
            )
            .await
            .expect("admitted by the backend");
            assert_eq!(recv_json(&mut ws).await["user"], "u42");
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_slow_backend_gets_503_with_retry_after_and_the_server_stays_responsive() {
    let backend =
        Backend::start(|req: &Recorded| by_cookie(req).after(Duration::from_secs(4))).await;
    let server = TestServer::start(connect_proxy(&backend)).await;
    let started = Instant::now();
    let addr = server.addr;
    let pending = tokio::spawn(async move {
        http(
            addr,
            "GET",
            "/ws",
            &[UPGRADE_HEADERS.as_slice(), &[("cookie", "session=ann")]].concat(),
        )
        .await
    });
    // While the upgrade waits for the backend, the server answers other requests at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, _) = http(server.addr, "GET", "/health", &[]).await;
    assert_eq!(status, 200);
    assert!(
        !pending.is_finished(),
        "the upgrade did not wait for the backend"
    );
    let (status, head, _) = pending.await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    // The 1 s proxy deadline, with a generous margin for a loaded machine.
    assert!(took < Duration::from_millis(3500), "took {took:?}");
    let metrics = http(server.addr, "GET", "/metrics", &[]).await.2;
    assert!(
        metrics.contains(r#"rusty_socks_proxy_calls_total{kind="connect",outcome="timeout"} 1"#)
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_backend_gets_503_with_retry_after() {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = gone.local_addr().unwrap().port();
    drop(gone);
    let server = TestServer::start(|config: &mut Config| {
        config.proxy.connect_url =
            Some(BackendUrl::parse(&format!("http://127.0.0.1:{port}/connect")).unwrap());
    })
    .await;
    let (status, headers) = upgrade(&server, "/ws", &[("cookie", "session=ann")])
        .await
        .expect_err("refused");
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    server.stop().await;
}

/// A server whose `chat` namespace asks the backend about subscriptions and publications.
async fn proxied_server(backend: &Backend, timeout_s: u64, concurrency: usize) -> TestServer {
    let mut namespaces = Namespaces::default();
    namespaces.insert(
        "chat",
        NamespaceOptions {
            proxy_subscribe: true,
            proxy_publish: true,
            ..NamespaceOptions::default()
        },
    );
    namespaces.insert("open", NamespaceOptions::default());
    let subscribe_url = url(backend, "/subscribe");
    let publish_url = url(backend, "/publish");
    TestServer::start(move |config: &mut Config| {
        config.namespaces = namespaces;
        config.api_key = Some(Secret(KEY.into()));
        config.proxy = ProxyOptions {
            subscribe_url,
            publish_url,
            timeout: Duration::from_secs(timeout_s),
            max_concurrency: concurrency,
            ..ProxyOptions::default()
        };
    })
    .await
}

/// Allows `chat:open*`, refuses the rest; on publish replaces `{"text":"darn"}`.
fn channel_rules(req: &Recorded) -> Reply {
    let channel = req.body["channel"].as_str().unwrap_or_default();
    if !channel.starts_with("chat:open") {
        return Reply::json(json!({"error":{"code":403,"message":"members only"}}));
    }
    if req.path == "/publish" && req.body["data"]["text"] == "darn" {
        return Reply::json(json!({"result":{"data":{"text":"d**n","checked":true}}}));
    }
    Reply::json(json!({"result":{}}))
}

#[tokio::test]
async fn subscriptions_are_allowed_or_refused_with_the_backend_message() {
    let backend = Backend::start(channel_rules).await;
    let server = proxied_server(&backend, 2, 64).await;
    let (mut ws, id) = v1_client(&server).await;
    subscribe(&mut ws, "chat:open").await;
    let refused = call(
        &mut ws,
        json!({"type":"subscribe","id":"s2","channel":"chat:secret"}),
    )
    .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "permission_denied");
    assert_eq!(refused["message"], "members only");
    // Namespaces without the flag are not asked.
    subscribe(&mut ws, "open:x").await;
    let asked = backend.requests();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0].path, "/subscribe");
    assert_eq!(
        asked[0].body,
        json!({"client":id,"user":null,"channel":"chat:open","data":null})
    );
    // The connection is fine after a refusal.
    publish(&mut ws, "open:x", json!(1)).await;
    let metrics = http(server.addr, "GET", "/metrics", &[]).await.2;
    assert!(
        metrics.contains(r#"rusty_socks_proxy_calls_total{kind="subscribe",outcome="allowed"} 1"#)
    );
    assert!(
        metrics.contains(r#"rusty_socks_proxy_calls_total{kind="subscribe",outcome="refused"} 1"#)
    );
    server.stop().await;
}

#[tokio::test]
async fn the_backend_replaces_published_data_and_the_api_is_not_proxied() {
    let backend = Backend::start(channel_rules).await;
    let server = proxied_server(&backend, 2, 64).await;
    let (mut reader, _) = v1_client(&server).await;
    subscribe(&mut reader, "chat:open").await;
    let (mut writer, writer_id) = v1_client(&server).await;

    publish(&mut writer, "chat:open", json!({"text":"darn"})).await;
    let push = recv_json(&mut reader).await;
    assert_eq!(
        push["data"],
        json!({"text":"d**n","checked":true}),
        "{push}"
    );
    publish(&mut writer, "chat:open", json!({"text":"hi"})).await;
    assert_eq!(recv_json(&mut reader).await["data"], json!({"text":"hi"}));
    let refused = call(
        &mut writer,
        json!({"type":"publish","id":"p","channel":"chat:closed","data":1}),
    )
    .await;
    assert_eq!(
        (&refused["code"], &refused["message"]),
        (&json!("permission_denied"), &json!("members only"))
    );
    let publishes: Vec<Value> = backend
        .requests()
        .into_iter()
        .filter(|r| r.path == "/publish")
        .map(|r| r.body)
        .collect();
    assert_eq!(publishes.len(), 3);
    assert_eq!(
        publishes[0],
        json!({"client":writer_id,"user":null,"channel":"chat:open","data":{"text":"darn"}})
    );

    // The server API is the backend itself: not asked again.
    let (status, body) = api_post_keyed(
        KEY,
        &server,
        "/api/publish",
        &json!({"channel":"chat:closed","data":{"text":"darn"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        backend
            .requests()
            .iter()
            .filter(|r| r.path == "/publish")
            .count(),
        3
    );
    server.stop().await;
}

#[tokio::test]
async fn a_slow_subscribe_proxy_answers_unavailable_and_the_session_goes_on() {
    let backend = Backend::start(|req: &Recorded| {
        if req.body["channel"] == "chat:open-slow" {
            Reply::json(json!({"result":{}})).after(Duration::from_secs(4))
        } else {
            channel_rules(req)
        }
    })
    .await;
    let server = proxied_server(&backend, 1, 64).await;
    let (mut ws, _) = v1_client(&server).await;
    let (mut other, _) = v1_client(&server).await;
    subscribe(&mut other, "open:x").await;
    let started = Instant::now();
    send_text(
        &mut ws,
        &json!({"type":"subscribe","id":"slow","channel":"chat:open-slow"}).to_string(),
    )
    .await;
    // Other clients are not held up meanwhile.
    publish(&mut other, "open:x", json!("still here")).await;
    let reply = recv_json(&mut ws).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(started.elapsed() < Duration::from_millis(3500));
    // And the session that waited goes on.
    subscribe(&mut ws, "chat:open").await;
    server.stop().await;
}

#[tokio::test]
async fn calls_to_the_backend_are_bounded_and_reuse_connections() {
    let backend =
        Backend::start(|req: &Recorded| channel_rules(req).after(Duration::from_millis(300))).await;
    let server = proxied_server(&backend, 5, 2).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(v1_client(&server).await.0);
    }
    let subscribed = clients.iter_mut().enumerate().map(|(i, ws)| async move {
        call(
            ws,
            json!({"type":"subscribe","id":i,"channel":format!("chat:open{i}")}),
        )
        .await
    });
    for reply in futures_util::future::join_all(subscribed).await {
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }
    assert_eq!(backend.requests().len(), 5);
    assert_eq!(backend.max_in_flight(), 2, "at most two calls at once");
    // Kept alive: the calls shared the two connections.
    assert_eq!(backend.connections(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_full_server_refuses_with_503_without_asking_the_backend() {
    let backend = Backend::start(by_cookie).await;
    let server = TestServer::start(|c| {
        connect_proxy(&backend)(c);
        c.max_connections = 1;
    })
    .await;
    let mut admitted = upgrade(&server, "/ws", &[("cookie", "session=ann")])
        .await
        .expect("admitted");
    assert_eq!(recv_json(&mut admitted).await["type"], "Connect");
    assert_eq!(backend.requests().len(), 1);

    let (status, headers) = upgrade(&server, "/ws", &[("cookie", "session=ann")])
        .await
        .expect_err("the server is full");
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(
        backend.requests().len(),
        1,
        "a connection the server cannot take costs the backend nothing"
    );
    server.stop().await;
}

#[tokio::test]
async fn expire_at_zero_means_no_expiry() {
    let backend =
        Backend::start(|_: &Recorded| Reply::json(json!({"result":{"user":"u7","expire_at":0}})))
            .await;
    let server = TestServer::start(connect_proxy(&backend)).await;
    let mut ws = upgrade(
        &server,
        "/ws",
        &[("sec-websocket-protocol", "rusty-socks.v1")],
    )
    .await
    .expect("admitted: 0 is no expiry, not a time long past");
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["user"], "u7", "{welcome}");
    let subscribed = subscribe(&mut ws, "lobby").await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    server.stop().await;
}
