//! Reloading settings without a restart (`POST /api/reload` and SIGHUP), over real sockets.
//!
//! A process's environment cannot change once it runs, so most tests run the server in this
//! process with a reload source the test controls (the settings it returns next); one test
//! sends SIGHUP to the real binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{Logged, signal};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::engine::namespace::{NamespaceOptions, Namespaces};
use rusty_socks::server::Prepared;
use rusty_socks::server::reload::LogLevel;
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const API_KEY: &str = "reload-test-api-key-0123";

/// What the server's reload source returns next.
type Next = Arc<Mutex<Result<Config, Vec<String>>>>;

/// A server in this process whose reload source is [`Next`].
struct Reloadable {
    addr: SocketAddr,
    next: Next,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Reloadable {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(tweak, None).await
    }

    /// [`Reloadable::start`] with a log filter hook.
    async fn start_with(tweak: impl FnOnce(&mut Config), log: Option<LogLevel>) -> Self {
        let mut config = Config {
            host: "127.0.0.1".parse().unwrap(),
            port: 0,
            api_key: Some(Secret(API_KEY.into())),
            ..Config::default()
        };
        tweak(&mut config);
        let next: Next = Arc::new(Mutex::new(Ok(config.clone())));
        let listener = TcpListener::bind((config.host, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut prepared = Prepared::new(config).await.unwrap();
        let source = Arc::clone(&next);
        prepared.reload_with(Box::new(move || source.lock().unwrap().clone()), log);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(prepared.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            next,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Changes the settings the next reload reads.
    fn change(&self, tweak: impl FnOnce(&mut Config)) {
        let mut next = self.next.lock().unwrap();
        let mut config = next.clone().unwrap();
        tweak(&mut config);
        *next = Ok(config);
    }

    /// `POST /api/reload`: (status, JSON body).
    async fn reload(&self) -> (u16, Value) {
        let auth = format!("apikey {API_KEY}");
        let (status, _, body) = http(
            self.addr,
            "POST",
            "/api/reload",
            &[("authorization", &auth)],
        )
        .await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// A reload that must succeed: its report.
    async fn reload_ok(&self) -> Value {
        let (status, body) = self.reload().await;
        assert_eq!(status, 200, "{body}");
        body
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("server did not stop within 5 s")
                .unwrap();
        }
    }
}

impl Drop for Reloadable {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn with_namespace(name: &str) -> Namespaces {
    let mut namespaces = Namespaces::default();
    namespaces.insert(name, NamespaceOptions::default());
    namespaces
}

/// The reply to a subscribe that must be refused: its error code.
async fn refused_subscribe(ws: &mut Ws, channel: &str) -> String {
    let reply = call(ws, json!({"type":"subscribe","id":"s","channel":channel})).await;
    assert_eq!(reply["type"], "error", "{reply}");
    reply["code"].as_str().unwrap_or_default().to_owned()
}

fn names(report: &Value, key: &str) -> Vec<String> {
    report[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} in {report}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_namespace_added_by_a_reload_takes_subscriptions() {
    let server = Reloadable::start(|_| {}).await;
    let (mut ws, _) = v1_client_url(&server.url()).await;
    assert_eq!(
        refused_subscribe(&mut ws, "news:today").await,
        "unknown_namespace"
    );
    server.change(|c| c.namespaces = with_namespace("news"));
    let report = server.reload_ok().await;
    assert_eq!(names(&report, "applied"), ["RUSTY_SOCKS_NAMESPACES"]);
    assert!(names(&report, "needs_restart").is_empty(), "{report}");
    // The same connection, opened before the reload.
    subscribe(&mut ws, "news:today").await;
    server.stop().await;
}

#[tokio::test]
async fn a_removed_namespace_refuses_new_subscriptions_and_keeps_existing_ones() {
    let server = Reloadable::start(|c| c.namespaces = with_namespace("news")).await;
    let (mut old, _) = v1_client_url(&server.url()).await;
    subscribe(&mut old, "news:today").await;
    server.change(|c| c.namespaces = Namespaces::default());
    let report = server.reload_ok().await;
    assert_eq!(names(&report, "applied"), ["RUSTY_SOCKS_NAMESPACES"]);
    let (mut new, _) = v1_client_url(&server.url()).await;
    assert_eq!(
        refused_subscribe(&mut new, "news:today").await,
        "unknown_namespace"
    );
    // Also on the connection that is subscribed there: a second channel is a new subscription.
    assert_eq!(
        refused_subscribe(&mut old, "news:other").await,
        "unknown_namespace"
    );
    // The existing subscription still receives, and its connection still publishes.
    publish(&mut old, "news:today", json!("still here")).await;
    let pushed = recv_json(&mut old).await;
    assert_eq!(pushed["type"], "publication", "{pushed}");
    assert_eq!(pushed["data"], "still here");
    // Other namespaces are untouched.
    subscribe(&mut new, "lobby").await;
    server.stop().await;
}

#[tokio::test]
async fn a_member_leaving_after_presence_was_turned_off_leaves_no_presence_entry() {
    let server = Reloadable::start(|c| c.namespaces = with_namespace("news")).await;
    let (mut ann, _) = v1_client_url(&server.url()).await;
    subscribe(&mut ann, "news:x").await;
    let off = NamespaceOptions {
        presence: false,
        ..NamespaceOptions::default()
    };
    server.change(|c| c.namespaces.insert("news", off));
    server.reload_ok().await;
    let reply = call(
        &mut ann,
        json!({"type":"unsubscribe","id":"u","channel":"news:x"}),
    )
    .await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    server.change(|c| c.namespaces = with_namespace("news"));
    server.reload_ok().await;
    let (mut bob, bob_id) = v1_client_url(&server.url()).await;
    subscribe(&mut bob, "news:x").await;
    assert_eq!(presence_of(&mut bob, "news:x").await, [bob_id]);
    server.stop().await;
}

#[tokio::test]
async fn new_upgrades_follow_the_reloaded_origin_list() {
    let server = Reloadable::start(|c| c.allowed_origins = vec!["https://a.example".into()]).await;
    let status = |origin: &'static str| async move {
        let mut headers = UPGRADE_HEADERS.to_vec();
        headers.push(("origin", origin));
        http_head(server.addr, "GET", "/ws", &headers).await.0
    };
    assert_eq!(status("https://a.example").await, 101);
    assert_eq!(status("https://b.example").await, 403);
    server.change(|c| c.allowed_origins = vec!["https://b.example".into()]);
    let report = server.reload_ok().await;
    assert_eq!(names(&report, "applied"), ["RUSTY_SOCKS_ALLOWED_ORIGINS"]);
    assert_eq!(status("https://b.example").await, 101);
    assert_eq!(status("https://a.example").await, 403);
    server.stop().await;
}

#[tokio::test]
async fn reloaded_rate_limits_apply_to_open_and_new_connections() {
    let server = Reloadable::start(|_| {}).await;
    let (mut ws, _) = v1_client_url(&server.url()).await;
    for i in 0..5 {
        publish(&mut ws, "lobby", json!(i)).await;
    }
    server.change(|c| {
        c.client_rate = 1;
        c.client_burst = 2;
        c.connect_rate = 1;
        c.connect_burst = 1;
    });
    let mut applied = names(&server.reload_ok().await, "applied");
    applied.sort();
    assert_eq!(
        applied,
        [
            "RUSTY_SOCKS_CLIENT_BURST",
            "RUSTY_SOCKS_CLIENT_RATE",
            "RUSTY_SOCKS_CONNECT_BURST",
            "RUSTY_SOCKS_CONNECT_RATE"
        ]
    );
    // The connection opened before the reload: its burst, then refusals.
    let mut codes = Vec::new();
    for i in 0..3 {
        let reply = call(
            &mut ws,
            json!({"type":"publish","id":"p","channel":"lobby","data":i}),
        )
        .await;
        codes.push(reply["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert_eq!(codes, ["ok", "ok", "rate_limited"]);
    // New connections from this address: one a second.
    let first = http_head(server.addr, "GET", "/ws", &UPGRADE_HEADERS)
        .await
        .0;
    let second = http_head(server.addr, "GET", "/ws", &UPGRADE_HEADERS)
        .await
        .0;
    assert_eq!((first, second), (101, 429));
    server.stop().await;
}

fn token(secret: &str, user: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A v1 connection presenting `token`, or the refusal's status.
async fn connect_with(addr: SocketAddr, token: &str) -> Result<Ws, u16> {
    let mut request = v1_request(&format!("ws://{addr}/ws"));
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    welcomed(tokio_tungstenite::connect_async(request)).await
}

#[tokio::test]
async fn a_new_jwt_secret_verifies_new_tokens_and_open_connections_keep_working() {
    let server = Reloadable::start(|c| {
        c.jwt_secret = Some(Secret("first-secret-0123456789".into()));
    })
    .await;
    let mut old = connect_with(server.addr, &token("first-secret-0123456789", "ann"))
        .await
        .unwrap();
    server.change(|c| c.jwt_secret = Some(Secret("second-secret-0123456789".into())));
    let report = server.reload_ok().await;
    assert_eq!(names(&report, "applied"), ["RUSTY_SOCKS_JWT_SECRET"]);
    assert_eq!(
        connect_with(server.addr, &token("first-secret-0123456789", "bob"))
            .await
            .err(),
        Some(401)
    );
    let mut new = connect_with(server.addr, &token("second-secret-0123456789", "bob"))
        .await
        .unwrap();
    // Both work: the old connection subscribes and receives what the new one publishes.
    subscribe(&mut old, "lobby").await;
    publish(&mut new, "lobby", json!("hi")).await;
    let pushed = recv_json(&mut old).await;
    assert_eq!(pushed["data"], "hi", "{pushed}");
    server.stop().await;
}

/// A fresh P-256 key pair: the public key's PEM and the key to sign ES256 tokens with.
fn ec_pair() -> (String, EncodingKey) {
    let pair = rcgen::KeyPair::generate().unwrap();
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    (pair.public_key_pem(), key)
}

fn es256(key: &EncodingKey, user: &str) -> String {
    encode(&Header::new(Algorithm::ES256), &json!({"sub": user}), key).unwrap()
}

#[tokio::test]
async fn a_public_key_file_replaced_in_place_is_read_again() {
    let path = std::env::temp_dir().join(format!(
        "rusty-socks-reload-{}-{}.pem",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let (first_pem, first) = ec_pair();
    let (second_pem, second) = ec_pair();
    std::fs::write(&path, first_pem).unwrap();
    let server = Reloadable::start(|c| c.jwt_public_key = Some(path.clone())).await;
    let mut old = connect_with(server.addr, &es256(&first, "ann"))
        .await
        .unwrap();
    assert_eq!(
        connect_with(server.addr, &es256(&second, "bob"))
            .await
            .err(),
        Some(401)
    );
    std::fs::write(&path, second_pem).unwrap();
    let report = server.reload_ok().await;
    // The setting (the path) did not change; the key behind it did.
    assert!(names(&report, "applied").is_empty(), "{report}");
    let mut new = connect_with(server.addr, &es256(&second, "bob"))
        .await
        .unwrap();
    assert_eq!(
        connect_with(server.addr, &es256(&first, "ann")).await.err(),
        Some(401)
    );
    subscribe(&mut old, "lobby").await;
    publish(&mut new, "lobby", json!("rotated")).await;
    assert_eq!(recv_json(&mut old).await["data"], "rotated");
    let _ = std::fs::remove_file(&path);
    server.stop().await;
}

#[tokio::test]
async fn a_restart_only_setting_is_reported_and_left_as_it_was() {
    let server = Reloadable::start(|_| {}).await;
    server.change(|c| {
        c.port = 1;
        c.max_connections = 7;
        c.api_key = Some(Secret("another-key".into()));
    });
    let report = server.reload_ok().await;
    assert!(names(&report, "applied").is_empty(), "{report}");
    let mut needs = names(&report, "needs_restart");
    needs.sort();
    assert_eq!(
        needs,
        [
            "RUSTY_SOCKS_API_KEY",
            "RUSTY_SOCKS_MAX_CONN",
            "RUSTY_SOCKS_PORT"
        ]
    );
    // Still served where it was, with the old API key (this reload used it).
    let report = server.reload_ok().await;
    assert_eq!(names(&report, "needs_restart").len(), 3, "{report}");
    let (status, _, body) = http(server.addr, "GET", "/stats", &[]).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn invalid_settings_change_nothing_and_are_reported() {
    let server = Reloadable::start(|_| {}).await;
    *server.next.lock().unwrap() = Err(vec![
        "invalid RUSTY_SOCKS_CLIENT_RATE=\"fast\": expected a whole number".to_owned(),
    ]);
    let (status, body) = server.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config", "{body}");
    assert!(
        body["error"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("RUSTY_SOCKS_CLIENT_RATE"),
        "{body}"
    );
    // Settings that read fine but cannot be put in force (a key file that is not there)
    // refuse the whole reload: the namespace changed beside it is not applied either.
    *server.next.lock().unwrap() = Ok(Config {
        host: "127.0.0.1".parse().unwrap(),
        port: 0,
        api_key: Some(Secret(API_KEY.into())),
        namespaces: with_namespace("news"),
        jwt_public_key: Some("/nonexistent/reload-test-key.pem".into()),
        ..Config::default()
    });
    let (status, body) = server.reload().await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("RUSTY_SOCKS_JWT_PUBLIC_KEY"),
        "{body}"
    );
    let (mut ws, _) = v1_client_url(&server.url()).await;
    assert_eq!(
        refused_subscribe(&mut ws, "news:today").await,
        "unknown_namespace"
    );
    // Anonymous connections still get in: no key was put in force.
    drop(ws);
    let (status, _) = http_head(server.addr, "GET", "/ws", &UPGRADE_HEADERS).await;
    assert_eq!(status, 101);
    let (_, _, metrics) = http(server.addr, "GET", "/metrics", &[]).await;
    assert!(
        metrics.contains("rusty_socks_reloads_total{result=\"failed\"} 2"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_log_filter_changes_through_its_hook_and_an_invalid_one_changes_nothing() {
    let installed = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = LogLevel {
        name: "RUSTY_SOCKS_LOG_LEVEL",
        // As `main` does when RUST_LOG is not set: the filter the settings ask for.
        wanted: Box::new(|config| Some(config.log_level.clone())),
        // As `main` does, without touching this test process's own subscriber.
        set: Box::new({
            let installed = Arc::clone(&installed);
            move |filter| {
                tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
                installed.lock().unwrap().push(filter.to_owned());
                Ok(())
            }
        }),
        current: "info".to_owned(),
    };
    let server = Reloadable::start_with(|_| {}, Some(log)).await;
    let report = server.reload_ok().await;
    assert!(names(&report, "applied").is_empty(), "unchanged: {report}");
    server.change(|c| c.log_level = "debug".to_owned());
    let report = server.reload_ok().await;
    assert_eq!(names(&report, "applied"), ["RUSTY_SOCKS_LOG_LEVEL"]);
    assert_eq!(*installed.lock().unwrap(), ["debug"]);
    // An invalid filter refuses the whole reload, the namespace changed beside it included.
    // (The settings refuse such a value when they are read; the hook is the last guard.)
    server.change(|c| {
        c.log_level = "rusty_socks=loudest".to_owned();
        c.namespaces = with_namespace("news");
    });
    let (status, body) = server.reload().await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("RUSTY_SOCKS_LOG_LEVEL"),
        "{body}"
    );
    assert_eq!(*installed.lock().unwrap(), ["debug"]);
    let (mut ws, _) = v1_client_url(&server.url()).await;
    assert_eq!(
        refused_subscribe(&mut ws, "news:today").await,
        "unknown_namespace"
    );
    server.stop().await;
}

#[tokio::test]
async fn reload_needs_the_api_key_and_post() {
    let server = Reloadable::start(|_| {}).await;
    let (status, _, _) = http(server.addr, "POST", "/api/reload", &[]).await;
    assert_eq!(status, 401);
    let auth = format!("apikey {API_KEY}");
    let (status, _, _) = http(
        server.addr,
        "GET",
        "/api/reload",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 405);
    server.stop().await;
}

#[test]
fn sighup_reloads_the_real_binary_and_it_keeps_serving() {
    let mut server = Logged::start(&[("RUSTY_SOCKS_API_KEY", API_KEY)]);
    let addr = server.address();
    signal(&server.child, "HUP");
    server.wait_for("SIGHUP received");
    server.wait_for("reload done: 0 applied, 0 need a restart");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (status, _, _) = http(addr, "GET", "/health", &[]).await;
        assert_eq!(status, 200);
        let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
        subscribe(&mut ws, "lobby").await;
        let auth = format!("apikey {API_KEY}");
        let (status, _, body) =
            http(addr, "POST", "/api/reload", &[("authorization", &auth)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"applied": [], "needs_restart": []})
        );
    });
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server exited"
    );
    signal(&server.child, "TERM");
    server.wait_for("stopped");
}

/// The whole path an operator takes: the real binary started with `--config`-style file
/// (`RUSTY_SOCKS_CONFIG`), the file edited, SIGHUP. The new namespace and the new log filter
/// are put in force from the file; a restart-only key changed beside them is reported and left.
#[test]
fn sighup_reads_the_config_file_again() {
    let dir = std::env::temp_dir().join(format!("rusty-socks-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("settings.toml");
    std::fs::write(&file, "log_level = \"info\"\nbuffer = 100\n").unwrap();
    let path = file.to_str().unwrap().to_owned();
    // An empty RUST_LOG counts as unset: the file's log_level is the filter.
    let mut server = Logged::start(&[("RUSTY_SOCKS_CONFIG", &path), ("RUST_LOG", "")]);
    let addr = server.address();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
        assert_eq!(
            refused_subscribe(&mut ws, "news:today").await,
            "unknown_namespace"
        );
    });
    std::fs::write(
        &file,
        "log_level = \"rusty_socks=debug,info\"\nbuffer = 200\n\n[namespaces.news]\n\n[namespaces.\"\"]\n",
    )
    .unwrap();
    signal(&server.child, "HUP");
    server.wait_for("reload: RUSTY_SOCKS_NAMESPACES applied");
    server.wait_for("reload: RUSTY_SOCKS_LOG_LEVEL applied");
    server.wait_for("reload: RUSTY_SOCKS_BUFFER changed but needs a restart");
    server.wait_for("reload done: 2 applied, 1 need a restart");
    runtime.block_on(async {
        let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
        subscribe(&mut ws, "news:today").await;
    });
    // The debug filter is in force: the server now logs at DEBUG.
    server.wait_for("DEBUG");
    // A file that no longer parses changes nothing and the server keeps serving.
    std::fs::write(&file, "log_level = [\n").unwrap();
    signal(&server.child, "HUP");
    server.wait_for("reload refused, nothing changed");
    runtime.block_on(async {
        let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
        subscribe(&mut ws, "news:today").await;
    });
    signal(&server.child, "TERM");
    server.wait_for("stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

fn feed_keeping(history_size: usize) -> Namespaces {
    let mut namespaces = Namespaces::default();
    namespaces.insert(
        "feed",
        NamespaceOptions {
            history_size,
            ..NamespaceOptions::default()
        },
    );
    namespaces
}

/// The next `publication` frame (other frames are skipped): (offset, epoch).
async fn next_publication(ws: &mut Ws) -> (u64, Value) {
    loop {
        let frame = recv_json(ws).await;
        if frame["type"] == "publication" {
            return (frame["offset"].as_u64().unwrap(), frame["epoch"].clone());
        }
    }
}

/// With `RUSTY_SOCKS_DATA_DIR`, a reload turns a namespace's history off while a channel is
/// live: its later publications are delivered in order, and after a restart their offsets are
/// not handed out again in the same epoch.
#[tokio::test]
async fn history_size_switched_to_0_by_a_reload_keeps_a_durable_channels_offsets() {
    let dir = std::env::temp_dir().join(format!("rusty-socks-reload-{}", uuid::Uuid::new_v4()));
    let durable = |dir: &std::path::Path, history_size: usize| {
        let dir = dir.to_owned();
        move |c: &mut Config| {
            c.data_dir = Some(dir);
            c.namespaces = feed_keeping(history_size);
        }
    };
    let server = Reloadable::start(durable(&dir, 100)).await;
    let (mut watcher, _) = v1_client_url(&server.url()).await;
    subscribe(&mut watcher, "feed:x").await;
    let (mut ws, _) = v1_client_url(&server.url()).await;
    for n in 1..=3 {
        assert_eq!(publish(&mut ws, "feed:x", json!(n)).await, n);
    }
    server.change(|c| c.namespaces = feed_keeping(0));
    server.reload_ok().await;
    for n in 4..=5 {
        assert_eq!(publish(&mut ws, "feed:x", json!(n)).await, n);
    }
    let (_, epoch) = next_publication(&mut watcher).await;
    for n in 2..=5 {
        assert_eq!(next_publication(&mut watcher).await, (n, epoch.clone()));
    }
    drop((ws, watcher));
    server.stop().await;

    let server = Reloadable::start(durable(&dir, 100)).await;
    let (mut watcher, _) = v1_client_url(&server.url()).await;
    subscribe(&mut watcher, "feed:x").await;
    let (mut ws, _) = v1_client_url(&server.url()).await;
    publish(&mut ws, "feed:x", json!("after")).await;
    let (offset, again) = next_publication(&mut watcher).await;
    assert!(
        again != epoch || offset == 6,
        "offset {offset} of epoch {again} was handed out before the restart"
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
