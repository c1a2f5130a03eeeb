//! A real HTTP backend for the proxy and webhook tests: listens on 127.0.0.1:0, records every
//! request and answers each as a closure says (status, JSON body, optional delay).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request the backend received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Path and query.
    pub path: String,
    /// Headers, names lowercased.
    pub headers: HashMap<String, String>,
    /// The raw body.
    pub raw: Bytes,
    /// The body as JSON (`Null` if it was not JSON).
    pub body: Value,
}

/// How the backend answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    /// 200 with `body`.
    pub fn json(body: Value) -> Self {
        Self {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    /// `status` with `body` as is.
    pub fn raw(status: u16, body: &str) -> Self {
        Self {
            status,
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    /// The same answer, sent after `delay`.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Answer = dyn Fn(&Recorded) -> Reply + Send + Sync;

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The running backend; stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend answering every request with `answer`.
    pub async fn start(answer: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let counts: Arc<Counts> = Arc::default();
        let answer: Arc<Answer> = Arc::new(answer);
        let task = {
            let requests = Arc::clone(&requests);
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    counts.connections.fetch_add(1, Ordering::SeqCst);
                    let requests = Arc::clone(&requests);
                    let counts = Arc::clone(&counts);
                    let answer = Arc::clone(&answer);
                    connections.spawn(async move {
                        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                            let requests = Arc::clone(&requests);
                            let counts = Arc::clone(&counts);
                            let answer = Arc::clone(&answer);
                            async move {
                                let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                counts.max_in_flight.fetch_max(now, Ordering::SeqCst);
                                let path = req
                                    .uri()
                                    .path_and_query()
                                    .map_or("/".to_owned(), |p| p.as_str().to_owned());
                                let headers = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_owned(),
                                            v.to_str().unwrap_or_default().to_owned(),
                                        )
                                    })
                                    .collect();
                                let raw = req.into_body().collect().await.unwrap().to_bytes();
                                let recorded = Recorded {
                                    path,
                                    headers,
                                    body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                                    raw,
                                };
                                requests.lock().unwrap().push(recorded.clone());
                                let reply = answer(&recorded);
                                tokio::time::sleep(reply.delay).await;
                                counts.in_flight.fetch_sub(1, Ordering::SeqCst);
                                let mut response =
                                    Response::new(Full::new(Bytes::from(reply.body)));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(reply.status).unwrap();
                                response.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    "application/json".parse().unwrap(),
                                );
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Self {
            addr,
            requests,
            counts,
            task,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.counts.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
