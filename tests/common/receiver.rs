//! A real webhook receiver on 127.0.0.1: checks every POST's `X-Rusty-Socks-Signature`,
//! records every attempt, can fail the next N attempts, go away (nothing listens, open
//! connections dropped) and come back on the same port.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The parsed body.
    pub body: Value,
    /// Whether the signature header matched the HMAC-SHA256 of the exact body.
    pub signed: bool,
    /// The status answered.
    pub status: u16,
}

impl Attempt {
    /// The ids of the events in the body.
    pub fn ids(&self) -> Vec<String> {
        self.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[derive(Default)]
struct State {
    secret: Vec<u8>,
    fail_next: AtomicUsize,
    attempts: Mutex<Vec<Attempt>>,
}

/// The receiver; it stops serving when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on a free port, verifying signatures with `secret`.
    pub async fn start(secret: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            secret: secret.as_bytes().to_vec(),
            ..State::default()
        });
        let task = Some(tokio::spawn(serve(listener, Arc::clone(&state))));
        Self { addr, state, task }
    }

    /// The URL to give `RUSTY_SOCKS_WEBHOOK_URL`.
    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Answers the next `n` attempts with 500 (recording them).
    pub fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// Stops listening and drops every open connection.
    pub async fn go_away(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&mut self) {
        self.go_away().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(tokio::spawn(serve(listener, Arc::clone(&self.state))));
    }

    /// Every attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state.attempts.lock().unwrap().clone()
    }

    /// The attempts answered with 2xx.
    pub fn delivered(&self) -> Vec<Attempt> {
        self.attempts()
            .into_iter()
            .filter(|a| a.status < 300)
            .collect()
    }

    /// The events of every delivered batch, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.delivered()
            .iter()
            .flat_map(|a| a.body["events"].as_array().unwrap().clone())
            .collect()
    }

    /// Waits until at least `n` attempts arrived (failing after `within`).
    pub async fn wait_attempts(&self, n: usize, within: Duration) -> Vec<Attempt> {
        let deadline = Instant::now() + within;
        loop {
            let attempts = self.attempts();
            if attempts.len() >= n {
                return attempts;
            }
            assert!(
                Instant::now() < deadline,
                "{} attempts, not {n}, within {within:?}: {attempts:#?}",
                attempts.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` events were delivered (failing after `within`).
    pub async fn wait_events(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{} events delivered, not {n}, within {within:?}: {:#?}",
                events.len(),
                self.attempts()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accepts until aborted; aborting drops the connections too (they live in the `JoinSet`).
async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = Arc::clone(&state);
                async move { Ok::<_, std::convert::Infallible>(answer(req, &state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn answer(req: Request<hyper::body::Incoming>, state: &State) -> Response<Full<Bytes>> {
    let signature = req
        .headers()
        .get("x-rusty-socks-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &state.secret);
    let signed = signature
        .strip_prefix("sha256=")
        .and_then(|hex| {
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
        })
        .is_some_and(|tag| ring::hmac::verify(&key, &body, &tag).is_ok());
    let failing = state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if !signed {
        401
    } else if failing {
        500
    } else {
        200
    };
    state.attempts.lock().unwrap().push(Attempt {
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        signed,
        status,
    });
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
}
