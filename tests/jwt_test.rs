//! JWT as operators expect: issuer and audience, required `exp`, several keys chosen by `kid`,
//! a JWKS document (file or http URL) that rotates without a restart, and algorithm confusion
//! refused. Every token is presented in a real upgrade request to a real server.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::settings::{Config, JwksSource, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "test-secret-0123456789";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn hs256(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// A fresh P-256 key pair: its JWK (with `kid`) and the key to sign with.
fn ec_key(kid: &str) -> (Value, EncodingKey) {
    let pair = rcgen::KeyPair::generate().unwrap();
    let raw = pair.public_key_raw(); // 0x04 || x || y
    let jwk =
        json!({"kty":"EC","crv":"P-256","kid":kid,"x":b64(&raw[1..33]),"y":b64(&raw[33..65])});
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    (jwk, key)
}

fn jwks(keys: &[&Value]) -> String {
    json!({ "keys": keys }).to_string()
}

fn claims() -> Value {
    json!({"sub":"ann","exp":now()+600})
}

/// A temporary file, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "rusty-socks-{}-{}-{name}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        Self(path)
    }

    /// Replaces the content at once (write then rename), as an operator's rotation would.
    fn write(&self, content: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Presents `token` in an upgrade request: (status, body). A 101 is not read further.
async fn attempt(addr: SocketAddr, token: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    // Generous: the server may be waiting for a JWKS fetch (bounded by its own deadline).
    let wait = Duration::from_secs(15);
    while !raw.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(wait, stream.read(&mut byte))
            .await
            .expect("no response head")
            .unwrap();
        assert!(n > 0, "connection closed mid-head: {raw:?}");
        raw.push(byte[0]);
    }
    let (status, head, _) = split_response(&raw);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; length];
    tokio::time::timeout(wait, stream.read_exact(&mut body))
        .await
        .expect("no body")
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn assert_refused(addr: SocketAddr, token: &str, reason: &str) {
    let (status, body) = attempt(addr, token).await;
    assert_eq!(status, 401, "expected a refusal ({reason}): {body}");
    assert!(body.contains(reason), "expected {reason:?} in {body:?}");
}

async fn assert_accepted(addr: SocketAddr, token: &str) {
    let (status, body) = attempt(addr, token).await;
    assert_eq!(status, 101, "expected an upgrade: {body}");
}

/// Asks until `token` gets `status`, for at most `within`.
async fn eventually(addr: SocketAddr, token: &str, status: u16, within: Duration) {
    let start = Instant::now();
    loop {
        let (got, body) = attempt(addr, token).await;
        if got == status {
            return;
        }
        assert!(
            start.elapsed() < within,
            "still {got} ({body}) after {within:?}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn issuer_and_audience_must_match_when_set() {
    let server = TestServer::start(|c| {
        c.jwt_secret = Some(Secret(SECRET.into()));
        c.jwt_issuer = Some("https://idp.example".into());
        c.jwt_audience = vec!["chat".into(), "admin".into()];
    })
    .await;
    let n = now();
    for good in [
        json!({"sub":"a","iss":"https://idp.example","aud":"chat"}),
        json!({"sub":"a","iss":"https://idp.example","aud":"admin","exp":n+60}),
        json!({"sub":"a","iss":"https://idp.example","aud":["billing","chat"]}),
    ] {
        assert_accepted(server.addr, &hs256(good)).await;
    }
    let cases = [
        (
            json!({"sub":"a","iss":"https://evil.example","aud":"chat"}),
            "issuer",
        ),
        (json!({"sub":"a","aud":"chat"}), "issuer"),
        (
            json!({"sub":"a","iss":"https://idp.example","aud":"billing"}),
            "audience",
        ),
        (
            json!({"sub":"a","iss":"https://idp.example","aud":["billing","crm"]}),
            "audience",
        ),
        (json!({"sub":"a","iss":"https://idp.example"}), "audience"),
    ];
    for (claims, reason) in cases {
        assert_refused(server.addr, &hs256(claims), reason).await;
    }
    server.stop().await;

    // Unset, neither is checked, but a token naming an audience was meant for another service.
    let server = TestServer::start(|c| c.jwt_secret = Some(Secret(SECRET.into()))).await;
    assert_accepted(server.addr, &hs256(json!({"sub":"a","iss":"anyone"}))).await;
    assert_refused(
        server.addr,
        &hs256(json!({"sub":"a","aud":"chat"})),
        "audience",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn require_exp_refuses_tokens_without_exp() {
    let server = TestServer::start(|c| {
        c.jwt_secret = Some(Secret(SECRET.into()));
        c.jwt_require_exp = true;
    })
    .await;
    assert_refused(server.addr, &hs256(json!({"sub":"a"})), "`exp`").await;
    assert_accepted(server.addr, &hs256(json!({"sub":"a","exp":now()+60}))).await;
    assert_refused(
        server.addr,
        &hs256(json!({"sub":"a","exp":now()-60})),
        "expired",
    )
    .await;
    server.stop().await;

    let server = TestServer::start(|c| c.jwt_secret = Some(Secret(SECRET.into()))).await;
    assert_accepted(server.addr, &hs256(json!({"sub":"a"}))).await;
    server.stop().await;
}

#[tokio::test]
async fn several_keys_are_chosen_by_kid() {
    let (ec_jwk, ec) = ec_key("ec-1");
    let (_, stranger) = ec_key("ec-2");
    let mut rsa_jwk: Value =
        serde_json::from_slice(&std::fs::read(fixture("rsa_public.jwk.json")).unwrap()).unwrap();
    rsa_jwk["kid"] = json!("rsa-1");
    let oct = b"an-hmac-key-from-the-jwks-0123456";
    let oct_jwk = json!({"kty":"oct","kid":"hs-1","k":b64(oct)});
    let file = TempFile::new("jwks.json");
    file.write(&jwks(&[&ec_jwk, &rsa_jwk, &oct_jwk]));
    let server = TestServer::start(|c| {
        c.jwt_secret = Some(Secret(SECRET.into()));
        c.jwt_jwks = Some(JwksSource::File(file.0.clone()));
    })
    .await;
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let hs = EncodingKey::from_secret(oct);
    let c = claims();
    for token in [
        sign(Algorithm::ES256, Some("ec-1"), &c, &ec),
        sign(Algorithm::RS256, Some("rsa-1"), &c, &rsa),
        sign(Algorithm::HS256, Some("hs-1"), &c, &hs),
        // No kid: the keys without one (the secret).
        hs256(c.clone()),
    ] {
        assert_accepted(server.addr, &token).await;
    }
    // The kid picks one key: another key's signature does not pass under its name.
    assert_refused(
        server.addr,
        &sign(Algorithm::ES256, Some("ec-1"), &c, &stranger),
        "signature",
    )
    .await;
    assert_refused(
        server.addr,
        &sign(Algorithm::HS256, Some("rsa-1"), &c, &hs),
        "algorithm",
    )
    .await;
    assert_refused(
        server.addr,
        &sign(Algorithm::ES256, Some("nobody"), &c, &ec),
        "kid",
    )
    .await;
    // An HS256 token with a kid the JWKS lacks fails against the secret, but the reason given
    // is the unknown kid (which made the server look for it), not the signature.
    let hs2 = EncodingKey::from_secret(b"a-newer-hmac-key-0123456789abcdef");
    assert_refused(
        server.addr,
        &sign(Algorithm::HS256, Some("hs-2"), &c, &hs2),
        "kid",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_jwks_file_rotated_on_disk_is_used_without_a_restart() {
    let (old_jwk, old) = ec_key("2026-01");
    let (new_jwk, new) = ec_key("2026-02");
    let file = TempFile::new("rotated.json");
    file.write(&jwks(&[&old_jwk]));
    let server = TestServer::start(|c| {
        c.jwt_jwks = Some(JwksSource::File(file.0.clone()));
        c.jwt_jwks_refresh = Duration::from_secs(1);
        c.jwt_jwks_cooldown = Duration::from_secs(3600);
    })
    .await;
    let c = claims();
    let old_token = sign(Algorithm::ES256, Some("2026-01"), &c, &old);
    let new_token = sign(Algorithm::ES256, Some("2026-02"), &c, &new);
    assert_accepted(server.addr, &old_token).await;
    assert_refused(server.addr, &new_token, "kid").await;

    // Both published during the rotation, then only the new one.
    file.write(&jwks(&[&old_jwk, &new_jwk]));
    eventually(server.addr, &new_token, 101, Duration::from_secs(5)).await;
    assert_accepted(server.addr, &old_token).await;
    file.write(&jwks(&[&new_jwk]));
    eventually(server.addr, &old_token, 401, Duration::from_secs(5)).await;

    // A broken document keeps the keys in force.
    file.write("{\"keys\": [ this is not json");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_accepted(server.addr, &new_token).await;
    std::fs::remove_file(&file.0).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_accepted(server.addr, &new_token).await;
    server.stop().await;
}

#[tokio::test]
async fn an_in_band_refresh_with_a_new_kid_succeeds_once_the_jwks_is_fetched() {
    let (old_jwk, old) = ec_key("a");
    let (new_jwk, new) = ec_key("b");
    let file = TempFile::new("in-band.json");
    file.write(&jwks(&[&old_jwk]));
    let server = TestServer::start(|c| {
        c.jwt_jwks = Some(JwksSource::File(file.0.clone()));
        c.jwt_jwks_refresh = Duration::from_secs(3600);
        c.jwt_jwks_cooldown = Duration::from_secs(1);
    })
    .await;
    let c = claims();
    let token = sign(Algorithm::ES256, Some("a"), &c, &old);
    let (mut ws, _) = v1_client_url(&server.url(&format!("/ws?token={token}"))).await;
    file.write(&jwks(&[&old_jwk, &new_jwk]));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let renewed = sign(Algorithm::ES256, Some("b"), &c, &new);
    // The session does not wait for the fetch: the first try is refused and starts it.
    let reply = call(&mut ws, json!({"type":"refresh","id":1,"token":renewed})).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "invalid_token", "{reply}");
    let start = Instant::now();
    let mut id = 2;
    loop {
        let reply = call(&mut ws, json!({"type":"refresh","id":id,"token":renewed})).await;
        if reply["type"] == "refreshed" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{reply}");
        id += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

/// Answers one request for `/keys.json` with the document (500 without one).
async fn answer<S>(mut stream: S, doc: &Mutex<Option<String>>, hits: &AtomicUsize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return,
        }
    }
    assert!(head.starts_with(b"GET /keys.json HTTP/1.1\r\n"), "{head:?}");
    hits.fetch_add(1, Ordering::SeqCst);
    let body = doc.lock().unwrap().clone();
    let response = match body {
        Some(body) => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        None => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\
                 connection: close\r\n\r\n"
            .to_owned(),
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A real HTTP server serving a JWKS document, counting requests; `None` answers 500.
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<Option<String>>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: String) -> Self {
        Self::start_with(doc, None).await
    }

    /// Serves https with `tls` when given.
    async fn start_with(doc: String, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(Some(doc)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (serving, counter) = (Arc::clone(&doc), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (doc, hits, tls) = (Arc::clone(&serving), Arc::clone(&counter), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => answer(stream, &doc, &hits).await,
                        Some(tls) => {
                            if let Ok(Ok(stream)) =
                                tokio::time::timeout(WAIT, tls.accept(stream)).await
                            {
                                answer(stream, &doc, &hits).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            doc,
            hits,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/keys.json", self.addr)
    }

    fn serve(&self, doc: Option<String>) {
        *self.doc.lock().unwrap() = doc;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_jwks_url_is_fetched_again_for_an_unknown_kid_at_a_bounded_rate() {
    const COOLDOWN: Duration = Duration::from_secs(2);
    let (first_jwk, first) = ec_key("k1");
    let (second_jwk, second) = ec_key("k2");
    let idp = JwksServer::start(jwks(&[&first_jwk])).await;
    let server = TestServer::start(|c| {
        c.jwt_jwks = Some(JwksSource::parse(&idp.url()).unwrap());
        c.jwt_jwks_refresh = Duration::from_secs(3600);
        c.jwt_jwks_cooldown = COOLDOWN;
    })
    .await;
    let c = claims();
    let first_token = sign(Algorithm::ES256, Some("k1"), &c, &first);
    let second_token = sign(Algorithm::ES256, Some("k2"), &c, &second);
    assert_accepted(server.addr, &first_token).await;
    assert_eq!(idp.hits(), 1, "fetched once at startup");

    // The identity provider rotates; the first token with the new kid makes the server fetch
    // again (once the cooldown since the last fetch has passed) and is let in.
    idp.serve(Some(jwks(&[&first_jwk, &second_jwk])));
    tokio::time::sleep(COOLDOWN + Duration::from_millis(200)).await;
    let burst_start = Instant::now();
    assert_accepted(server.addr, &second_token).await;
    assert_eq!(idp.hits(), 2);

    // Made-up kids: refused, and no more than one fetch per cooldown.
    let (_, forger) = ec_key("x");
    for i in 0..20 {
        let forged = sign(Algorithm::ES256, Some(&format!("made-up-{i}")), &c, &forger);
        assert_refused(server.addr, &forged, "kid").await;
    }
    let elapsed = burst_start.elapsed();
    let allowed = 1 + (elapsed.as_secs_f64() / COOLDOWN.as_secs_f64()).floor() as usize;
    assert!(
        idp.hits() <= 1 + allowed,
        "{} fetches in {elapsed:?} with a {COOLDOWN:?} cooldown",
        idp.hits()
    );

    // A failing identity provider: the keys in force stay.
    idp.serve(None);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(200)).await;
    let hits = idp.hits();
    let (_, third) = ec_key("k3");
    assert_refused(
        server.addr,
        &sign(Algorithm::ES256, Some("k3"), &c, &third),
        "kid",
    )
    .await;
    assert_eq!(idp.hits(), hits + 1, "the unknown kid caused a fetch");
    assert_accepted(server.addr, &first_token).await;
    assert_accepted(server.addr, &second_token).await;
    server.stop().await;
}

#[tokio::test]
async fn an_unusable_jwks_at_startup_stops_the_server_naming_the_setting() {
    let bad_file = TempFile::new("bad.json");
    bad_file.write(r#"{"keys":[{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}"#);
    let idp = JwksServer::start("{}".into()).await;
    idp.serve(None);
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/keys.json", dead.local_addr().unwrap());
    drop(dead);
    for source in [
        JwksSource::File("/nonexistent/jwks.json".into()),
        JwksSource::File(bad_file.0.clone()),
        JwksSource::Url(idp.url()),
        JwksSource::Url(dead_url),
    ] {
        let config = Config {
            host: "127.0.0.1".parse().unwrap(),
            port: 0,
            jwt_jwks: Some(source.clone()),
            ..Config::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = rusty_socks::server::run(listener, config, std::future::pending())
            .await
            .expect_err("no usable JWKS");
        assert!(
            err.to_string().contains("RUSTY_SOCKS_JWT_JWKS"),
            "{source:?}: {err}"
        );
    }
}

#[tokio::test]
async fn algorithm_confusion_and_alg_none_are_refused() {
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let c = claims();
    // An HS256 token "signed" with the RSA public key's bytes, which anyone has.
    let confused = |kid: Option<&str>| {
        sign(
            Algorithm::HS256,
            kid,
            &c,
            &EncodingKey::from_secret(&public_pem),
        )
    };
    let unsigned = |kid: Option<&str>| {
        let mut header = json!({"alg":"none","typ":"JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        format!(
            "{}.{}.",
            b64(header.to_string().as_bytes()),
            b64(c.to_string().as_bytes())
        )
    };

    // The RSA key as a PEM file, alone and next to an HS256 secret.
    let server = TestServer::start(|c| c.jwt_public_key = Some(fixture("rsa_public.pem"))).await;
    assert_refused(server.addr, &confused(None), "algorithm").await;
    assert_refused(server.addr, &unsigned(None), "algorithm").await;
    server.stop().await;
    let server = TestServer::start(|c| {
        c.jwt_public_key = Some(fixture("rsa_public.pem"));
        c.jwt_secret = Some(Secret(SECRET.into()));
    })
    .await;
    assert_refused(server.addr, &confused(None), "signature").await;
    assert_refused(server.addr, &unsigned(None), "algorithm").await;
    server.stop().await;

    // The RSA key in a JWKS, with and without an `alg` of its own.
    let mut rsa_jwk: Value =
        serde_json::from_slice(&std::fs::read(fixture("rsa_public.jwk.json")).unwrap()).unwrap();
    rsa_jwk["kid"] = json!("rsa-1");
    let mut pinned = rsa_jwk.clone();
    pinned["kid"] = json!("rsa-2");
    pinned["alg"] = json!("RS256");
    let file = TempFile::new("confusion.json");
    file.write(&jwks(&[&rsa_jwk, &pinned]));
    let server = TestServer::start(|c| c.jwt_jwks = Some(JwksSource::File(file.0.clone()))).await;
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    for kid in ["rsa-1", "rsa-2"] {
        assert_accepted(server.addr, &sign(Algorithm::RS256, Some(kid), &c, &rsa)).await;
        assert_refused(server.addr, &confused(Some(kid)), "algorithm").await;
        assert_refused(server.addr, &unsigned(Some(kid)), "algorithm").await;
        // RS512 with the same key is not the algorithm the key is for.
        assert_refused(
            server.addr,
            &sign(Algorithm::RS512, Some(kid), &c, &rsa),
            "algorithm",
        )
        .await;
    }
    server.stop().await;
}

/// A self-signed certificate for `localhost` in a fresh directory, and an acceptor using it.
fn tls_for_localhost(dir: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The JWKS over https, with the server's certificate trusted through `SSL_CERT_FILE` (so the
/// real binary runs, with a variable of its own); an untrusted certificate stops startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_over_https_is_checked_against_the_trusted_roots() {
    use common::process::{BIN, Logged, clean_env, wait_exit};
    let dir = std::env::temp_dir().join(format!("rusty-socks-jwks-tls-{}", uuid::Uuid::new_v4()));
    let other = dir.join("other");
    let (jwk, key) = ec_key("tls-1");
    let idp = JwksServer::start_with(jwks(&[&jwk]), Some(tls_for_localhost(&dir))).await;
    let _ = tls_for_localhost(&other);
    let url = format!("https://localhost:{}/keys.json", idp.addr.port());
    let trusted = dir.join("cert.pem").display().to_string();
    let untrusted = other.join("cert.pem").display().to_string();

    let env = [
        ("RUSTY_SOCKS_JWT_JWKS", url.clone()),
        ("SSL_CERT_FILE", trusted),
    ];
    let (server, addr) = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut server = Logged::start(&env);
        let addr = server.address();
        (server, addr)
    })
    .await
    .unwrap();
    assert_accepted(
        addr,
        &sign(Algorithm::ES256, Some("tls-1"), &claims(), &key),
    )
    .await;
    assert_eq!(idp.hits(), 1);
    drop(server);

    let stderr = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(BIN);
        clean_env(&mut cmd)
            .env("RUSTY_SOCKS_HOST", "127.0.0.1")
            .env("RUSTY_SOCKS_PORT", "0")
            .env("RUSTY_SOCKS_JWT_JWKS", &url)
            .env("SSL_CERT_FILE", &untrusted)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = common::process::Reap(cmd.spawn().unwrap());
        let status = wait_exit(&mut child, Duration::from_secs(15));
        assert!(!status.success());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        stderr
    })
    .await
    .unwrap();
    assert!(
        stderr.contains("RUSTY_SOCKS_JWT_JWKS") && stderr.contains("TLS"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
