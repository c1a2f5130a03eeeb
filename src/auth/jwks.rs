//! A JWKS document (`RUSTY_SOCKS_JWT_JWKS`), read from a file or fetched over http(s), and kept
//! fresh so that keys rotate without a restart.
//!
//! It is read again every `RUSTY_SOCKS_JWT_JWKS_REFRESH` seconds (the server runs
//! [`Jwks::refresh_periodically`]) and when a token names a `kid` the server does not know, but
//! then at most once per `RUSTY_SOCKS_JWT_JWKS_COOLDOWN` seconds: anyone can send tokens with
//! made-up `kid`s, and each must not cost a request to the identity provider. One fetch runs at
//! a time; a token waiting for a key waits for the fetch in flight. Every fetch has a deadline
//! ([`FETCH_TIMEOUT`]). A fetch that fails, or returns a document without usable keys, keeps the
//! keys the server has and logs a warning: a broken or unreachable document must not lock
//! everyone out.
//!
//! https uses the system's root certificates (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured);
//! redirects are not followed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_rustls::rustls;

use super::keys::{Key, parse_jwks};

/// How long one fetch (connect, TLS, request, body; or reading the file) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest JWKS document accepted: real ones hold a handful of keys, a few KB.
const MAX_DOCUMENT: usize = 1 << 20;

/// Where the JWKS document comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A file, read again on every refresh (rotate by replacing it).
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
}

impl JwksSource {
    /// A URL when `value` starts with `http://` or `https://` (and has a host), else a path.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("a file path or an http(s) URL".into());
        }
        let lower = value.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let uri: Uri = value.parse().map_err(|e| format!("an http(s) URL ({e})"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err("an http(s) URL with a host".into());
            }
            Ok(Self::Url(value.to_owned()))
        } else {
            Ok(Self::File(PathBuf::from(value)))
        }
    }
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Url(url) => f.write_str(url),
        }
    }
}

/// Whether a fetch is running, and when the last one started (for the cooldown).
#[derive(Debug, Default)]
struct FetchState {
    in_flight: bool,
    last_start: Option<Instant>,
}

/// The keys of the JWKS document, and what it takes to fetch them again.
pub(crate) struct Jwks {
    source: JwksSource,
    /// The keys in force; replaced whole by a successful fetch.
    keys: RwLock<Arc<Vec<Key>>>,
    state: Mutex<FetchState>,
    /// Counts finished fetches; waiters for a fetch watch it change.
    done: watch::Sender<u64>,
    refresh: Duration,
    cooldown: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("keys", &self.keys())
            .field("refresh", &self.refresh)
            .field("cooldown", &self.cooldown)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Fetches the document once; an error (for the startup message) if that fails.
    pub async fn load(
        source: JwksSource,
        refresh: Duration,
        cooldown: Duration,
    ) -> Result<Arc<Self>, String> {
        let tls = match &source {
            JwksSource::Url(url) if url.to_ascii_lowercase().starts_with("https://") => {
                Some(tls_connector()?)
            }
            _ => None,
        };
        let jwks = Arc::new(Self {
            source,
            keys: RwLock::new(Arc::new(Vec::new())),
            state: Mutex::new(FetchState {
                in_flight: false,
                last_start: Some(Instant::now()),
            }),
            done: watch::Sender::new(0),
            // At least a second each: zero would make the refresh loop spin.
            refresh: refresh.max(Duration::from_secs(1)),
            cooldown: cooldown.max(Duration::from_secs(1)),
            tls,
        });
        let keys = jwks.fetch().await?;
        jwks.store(keys);
        Ok(jwks)
    }

    /// The keys in force.
    pub fn keys(&self) -> Arc<Vec<Key>> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A token named an unknown `kid`: fetches again unless the cooldown forbids it, and waits
    /// (within the fetch deadline) for the fetch in flight, if any.
    pub async fn refresh_for_unknown_kid(self: &Arc<Self>) {
        if let Some(mut finished) = self.start(false) {
            let _ = tokio::time::timeout(FETCH_TIMEOUT * 2, finished.changed()).await;
        }
    }

    /// Like [`Self::refresh_for_unknown_kid`] without waiting: for callers that cannot wait (a
    /// `refresh` command inside a session), so that a retry finds the key.
    pub fn refresh_soon(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = self.start(false);
        }
    }

    /// Fetches again every refresh period, forever (the server runs this until it stops).
    pub async fn refresh_periodically(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.refresh).await;
            if let Some(mut finished) = self.start(true) {
                let _ = tokio::time::timeout(FETCH_TIMEOUT * 2, finished.changed()).await;
            }
        }
    }

    /// Starts a fetch in its own task (so a client that goes away cannot cancel it halfway), or
    /// joins the one in flight. `None` when the cooldown forbids an unforced fetch.
    fn start(self: &Arc<Self>, forced: bool) -> Option<watch::Receiver<u64>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let finished = self.done.subscribe();
        if state.in_flight {
            return Some(finished);
        }
        let now = Instant::now();
        let cooling = state
            .last_start
            .is_some_and(|last| now.duration_since(last) < self.cooldown);
        if cooling && !forced {
            tracing::debug!(source = %self.source, "unknown kid; JWKS fetched too recently to fetch again");
            return None;
        }
        state.in_flight = true;
        state.last_start = Some(now);
        drop(state);
        let jwks = Arc::clone(self);
        tokio::spawn(async move {
            match jwks.fetch().await {
                Ok(keys) => jwks.store(keys),
                Err(reason) => {
                    tracing::warn!(source = %jwks.source, %reason, "JWKS refresh failed; keeping the keys in force");
                }
            }
            jwks.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .in_flight = false;
            jwks.done.send_modify(|n| *n += 1);
        });
        Some(finished)
    }

    fn store(&self, keys: Vec<Key>) {
        let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        tracing::debug!(source = %self.source, ?kids, "JWKS keys loaded");
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }

    /// Reads or downloads the document and parses it, within [`FETCH_TIMEOUT`].
    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, async {
            match &self.source {
                JwksSource::File(path) => read_file(path).await,
                JwksSource::Url(url) => self.download(url).await,
            }
        })
        .await
        .map_err(|_| format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))??;
        let set = parse_jwks(&body)?;
        for why in &set.skipped {
            tracing::warn!(source = %self.source, %why, "JWKS key skipped");
        }
        Ok(set.keys)
    }

    /// One GET over a fresh connection (a refresh is rare: no pool to keep).
    async fn download(&self, url: &str) -> Result<Bytes, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let host = uri.host().unwrap_or_default().to_owned();
        let tls = self.tls.as_ref();
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let authority = uri
            .authority()
            .map_or_else(|| host.clone(), |a| a.as_str().to_owned());
        let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "rusty-socks")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad request: {e}"))?;
        match tls {
            None => send(TokioIo::new(tcp), request).await,
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from(bare_host)
                    .map_err(|e| format!("bad host name {host}: {e}"))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}: {e}"))?;
                send(TokioIo::new(stream), request).await
            }
        }
    }
}

/// Sends `request` on `io` and returns the body of a 200 answer.
async fn send<T>(io: TokioIo<T>, request: hyper::Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // Drives the connection until the response is read; aborted when this future ends,
    // also when the fetch's deadline drops it midway.
    let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    Limited::new(response.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| format!("reading the body: {e}"))
}

async fn read_file(path: &std::path::Path) -> Result<Bytes, String> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() > MAX_DOCUMENT {
        return Err(format!(
            "{} is larger than {MAX_DOCUMENT} bytes",
            path.display()
        ));
    }
    Ok(Bytes::from(bytes))
}

/// A TLS client trusting the system's root certificates.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(format!(
            "https needs root certificates and none were found ({:?})",
            found.errors
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_a_url_or_a_path() {
        assert_eq!(
            JwksSource::parse(" https://idp.example/.well-known/jwks.json "),
            Ok(JwksSource::Url(
                "https://idp.example/.well-known/jwks.json".into()
            ))
        );
        assert_eq!(
            JwksSource::parse("/etc/jwks.json"),
            Ok(JwksSource::File("/etc/jwks.json".into()))
        );
        assert!(JwksSource::parse("http://").is_err());
        assert!(JwksSource::parse("  ").is_err());
    }
}
