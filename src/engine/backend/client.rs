//! A small pooled HTTP/1.1 client for calls to the application's backend (the proxy and the
//! webhooks): POST a JSON body, get the status and a bounded body back.
//!
//! - `http://` only (TLS toward the backend is not supported: put the backend on a private
//!   network or loopback, or terminate TLS in a local sidecar).
//! - One deadline covers the whole call: waiting for a free slot, connecting, sending and
//!   reading the answer.
//! - At most `max_concurrency` calls at once (a semaphore); a call that finds every slot busy
//!   waits for one, but never past its deadline.
//! - Connections are kept alive and reused (an idle pool per host and port, never larger than
//!   the concurrency bound). A pooled connection the backend closed meanwhile is noticed before
//!   the request is written, and the request goes out on a fresh one instead.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

/// The default bound on an answer's body.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// What a backend call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No complete answer within the deadline (connecting, sending or reading).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Every slot stayed busy until the deadline: the call was never made.
    #[error("{0} backend calls already in flight until the deadline")]
    Busy(usize),
    /// The backend could not be reached (connection refused, reset, DNS).
    #[error("cannot reach the backend: {0}")]
    Unreachable(String),
    /// The connection failed while sending or reading.
    #[error("backend request failed: {0}")]
    Request(String),
    /// The backend answered with a status outside 2xx.
    #[error("backend answered HTTP {0}")]
    Status(u16),
    /// The answer's body was larger than the bound.
    #[error("backend answer larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The answer was not the JSON expected.
    #[error("backend answer is not the expected JSON: {0}")]
    BadJson(String),
    /// The URL cannot be called (not `http://`, no host).
    #[error("bad backend URL: {0}")]
    BadUrl(String),
}

impl BackendError {
    /// Whether the backend could not be asked or did not answer in time (as opposed to an
    /// answer that was a refusal or garbage): callers answer these with "try again later".
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Busy(_) | Self::Unreachable(_) | Self::Request(_)
        )
    }

    /// Whether the deadline passed (waiting for a slot or for the answer).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Busy(_))
    }
}

/// A parsed `http://host[:port]/path[?query]` URL a client can call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    /// `host:port` as connected to (and the pool's key).
    address: String,
    /// The `Host` header.
    authority: String,
    /// Path and query.
    path: String,
    /// The URL as given.
    text: String,
}

impl BackendUrl {
    /// Parses `url`; the error says what is wrong with it (the caller names the setting).
    pub fn parse(url: &str) -> Result<Self, String> {
        let text = url.trim();
        let uri: hyper::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{text:?}: https is not supported toward the backend; use http:// \
                     (a private network, loopback or a local TLS sidecar)"
                ));
            }
            _ => return Err(format!("{text:?} must start with http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        if authority.host().is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        if authority.as_str().contains('@') {
            return Err(format!(
                "{text:?}: credentials in the URL are not supported"
            ));
        }
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            address: format!("{host}:{port}"),
            authority: authority.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            text: text.to_owned(),
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl BackendUrl {
    /// The URL for logs: without its query, which may carry a token.
    pub fn for_logs(&self) -> &str {
        self.text
            .split_once('?')
            .map_or(&self.text, |(base, _)| base)
    }
}

impl std::fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// How a [`BackendClient`] calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// The deadline of one whole call.
    pub timeout: Duration,
    /// Calls in flight at once (at least 1).
    pub max_concurrency: usize,
    /// Largest answer body accepted, in bytes.
    pub max_body: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            max_concurrency: 64,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// A backend's answer: its status and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendResponse {
    /// The HTTP status.
    pub status: u16,
    /// The body, at most `max_body` bytes.
    pub body: Bytes,
}

impl BackendResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// The pooled client; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct BackendClient {
    options: ClientOptions,
    slots: Semaphore,
    /// Idle keep-alive connections by `host:port`. Locked only to push or pop, never across
    /// an await.
    idle: Mutex<HashMap<String, Vec<Sender>>>,
}

impl BackendClient {
    /// A client calling with `options`.
    pub fn new(options: ClientOptions) -> Self {
        let options = ClientOptions {
            max_concurrency: options.max_concurrency.max(1),
            ..options
        };
        Self {
            slots: Semaphore::new(options.max_concurrency),
            idle: Mutex::new(HashMap::new()),
            options,
        }
    }

    /// The options it was made with.
    pub fn options(&self) -> ClientOptions {
        self.options
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.options.max_concurrency - self.slots.available_permits()
    }

    /// POSTs `body` (JSON) to `url` with `headers` added, within the deadline. Any status is
    /// an answer here (the caller decides what a non-2xx means).
    pub async fn post(
        &self,
        url: &BackendUrl,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<BackendResponse, BackendError> {
        let timeout = self.options.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // The semaphore is never closed: an error is the deadline passing.
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.slots.acquire()).await else {
            return Err(BackendError::Busy(self.options.max_concurrency));
        };
        tokio::time::timeout_at(deadline, self.call(url, body, headers))
            .await
            .unwrap_or(Err(BackendError::Timeout(timeout)))
    }

    /// POSTs `body` and parses a 2xx answer as `T`; a non-2xx is [`BackendError::Status`].
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        url: &BackendUrl,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<T, BackendError> {
        let response = self.post(url, body, headers).await?;
        if !response.is_success() {
            return Err(BackendError::Status(response.status));
        }
        serde_json::from_slice(&response.body).map_err(|e| BackendError::BadJson(e.to_string()))
    }

    async fn call(
        &self,
        url: &BackendUrl,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<BackendResponse, BackendError> {
        let mut request = build(url, body, headers)?;
        // A pooled connection first; one the backend has closed gives the request back
        // unsent, and the next one (or a fresh one) is tried.
        let (mut sender, response) = loop {
            let Some(mut sender) = self.take_idle(&url.address) else {
                let mut sender = connect(url).await?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| BackendError::Request(e.to_string()))?;
                break (sender, response);
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => break (sender, response),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(BackendError::Request(err.into_error().to_string())),
                },
            }
        };
        let status = response.status().as_u16();
        let keep_alive = !response
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let max = self.options.max_body;
        let body = match Limited::new(response.into_body(), max).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                return Err(BackendError::BodyTooLarge(max));
            }
            Err(err) => return Err(BackendError::Request(err.to_string())),
        };
        if keep_alive && sender.ready().await.is_ok() {
            self.put_idle(&url.address, sender);
        }
        Ok(BackendResponse { status, body })
    }

    fn take_idle(&self, address: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(address)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, address: &str, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(address.to_owned()).or_default();
        list.retain(|s| !s.is_closed());
        if list.len() < self.options.max_concurrency {
            list.push(sender);
        }
    }
}

fn build(
    url: &BackendUrl,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Result<hyper::Request<Full<Bytes>>, BackendError> {
    let mut request = hyper::Request::post(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "rusty-socks");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(Full::new(body))
        .map_err(|e| BackendError::BadUrl(format!("{}: {e}", url.text)))
}

/// A fresh connection to `url`'s host, its driver spawned (it ends when the last sender for
/// it is dropped or the backend closes it).
async fn connect(url: &BackendUrl) -> Result<Sender, BackendError> {
    let tcp = tokio::net::TcpStream::connect(url.address.as_str())
        .await
        .map_err(|e| BackendError::Unreachable(format!("{}: {e}", url.address)))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| BackendError::Unreachable(format!("{}: {e}", url.address)))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "backend connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_with_a_host_are_accepted() {
        let url = BackendUrl::parse(" http://127.0.0.1:8080/rs/connect?x=1 ").expect("valid");
        assert_eq!(url.address, "127.0.0.1:8080");
        assert_eq!(url.authority, "127.0.0.1:8080");
        assert_eq!(url.path, "/rs/connect?x=1");
        let url = BackendUrl::parse("http://backend").expect("valid");
        assert_eq!(url.address, "backend:80");
        assert_eq!(url.path, "/");
        let url = BackendUrl::parse("http://[::1]:9000/x").expect("valid");
        assert_eq!(url.address, "[::1]:9000");
        for bad in [
            "",
            "backend:80/x",
            "https://backend/x",
            "ftp://backend/x",
            "http:///x",
            "http://user:pw@backend/x",
        ] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn an_unreachable_backend_and_a_silent_one_fail_within_the_deadline() {
        // A port nobody listens on: bind, note it, close.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = free.local_addr().expect("addr").port();
        drop(free);
        let client = BackendClient::new(ClientOptions {
            timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        });
        let url = BackendUrl::parse(&format!("http://127.0.0.1:{port}/")).expect("url");
        let err = client.post(&url, Bytes::from_static(b"{}"), &[]).await;
        assert!(matches!(err, Err(BackendError::Unreachable(_))), "{err:?}");
        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = BackendUrl::parse(&format!("http://{}/", silent.local_addr().expect("addr")))
            .expect("url");
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket);
            }
        });
        let err = client.post(&url, Bytes::from_static(b"{}"), &[]).await;
        assert_eq!(err, Err(BackendError::Timeout(Duration::from_millis(300))));
        assert!(err.expect_err("timeout").is_unavailable());
        held.abort();
    }

    /// A one-request-per-connection HTTP server on loopback: hands each request's head and
    /// body to `seen` and answers `status` with `body`.
    async fn answering(
        status: u16,
        body: Vec<u8>,
    ) -> (BackendUrl, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = BackendUrl::parse(&format!(
            "http://{}/hook?x=1",
            listener.local_addr().expect("addr")
        ))
        .expect("url");
        let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut raw = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head and the small body arrive together on loopback.
                while !String::from_utf8_lossy(&raw).contains("\r\n\r\n{") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => raw.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = seen.send(String::from_utf8_lossy(&raw).into_owned());
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            }
        });
        (url, requests)
    }

    #[tokio::test]
    async fn a_post_carries_its_headers_and_returns_status_and_a_bounded_body() {
        let client = BackendClient::new(ClientOptions {
            max_body: 1024,
            ..ClientOptions::default()
        });
        let (url, mut requests) = answering(503, b"{\"busy\":true}".to_vec()).await;
        let answer = client
            .post(
                &url,
                Bytes::from_static(b"{\"a\":1}"),
                &[("x-rusty-socks-signature", "sha256=ab12")],
            )
            .await
            .expect("an answer");
        assert_eq!(answer.status, 503);
        assert!(!answer.is_success());
        assert_eq!(&answer.body[..], b"{\"busy\":true}");
        let request = requests.recv().await.expect("request");
        assert!(
            request.starts_with("POST /hook?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains("x-rusty-socks-signature: sha256=ab12\r\n"),
            "{request}"
        );
        assert!(
            lower.contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.ends_with("\r\n\r\n{\"a\":1}"), "{request}");
        let status = client
            .post_json::<serde_json::Value>(&url, Bytes::from_static(b"{}"), &[])
            .await;
        assert_eq!(status, Err(BackendError::Status(503)));

        let (url, _requests) = answering(200, vec![b' '; 2048]).await;
        let err = client.post(&url, Bytes::from_static(b"{}"), &[]).await;
        assert_eq!(err, Err(BackendError::BodyTooLarge(1024)));
        let (url, _requests) = answering(200, b"not json".to_vec()).await;
        let err = client
            .post_json::<serde_json::Value>(&url, Bytes::from_static(b"{}"), &[])
            .await;
        assert!(matches!(err, Err(BackendError::BadJson(_))), "{err:?}");
    }
}
