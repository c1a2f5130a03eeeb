//! Prometheus metrics at `/metrics` (on the main port, or on `RUSTY_SOCKS_METRICS_ADDR`).
//!
//! Counters live where the work happens ([`crate::engine::stats::Stats`], the node's per-namespace
//! subscription counts); this module renders them, with the gauges read at scrape time, in
//! the Prometheus text format. Every name starts with `rusty_socks_`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::engine::stats::{family, gauge};
use crate::server::AppState;

/// The text exposition of every metric.
pub fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(4096);
    gauge(
        &mut out,
        "rusty_socks_connections",
        "Open WebSocket connections",
        i64::try_from(state.admission.connections()).unwrap_or(i64::MAX),
    );
    gauge(
        &mut out,
        "rusty_socks_channels",
        "Channels with at least one local subscriber",
        i64::try_from(state.hub.channel_count()).unwrap_or(i64::MAX),
    );
    let broker = state.node.broker().status();
    family(
        &mut out,
        "rusty_socks_broker_connected",
        "gauge",
        "1 while the broker delivers, 0 while it is unreachable",
    );
    out.push_str(&format!(
        "rusty_socks_broker_connected{{kind=\"{}\"}} {}\n",
        broker.kind,
        u8::from(broker.connected)
    ));
    family(
        &mut out,
        "rusty_socks_subscriptions",
        "gauge",
        "Local channel subscriptions by namespace (\"default\" is the legacy channel)",
    );
    for (namespace, count) in state.node.subscription_counts() {
        out.push_str(&format!(
            "rusty_socks_subscriptions{{namespace=\"{namespace}\"}} {count}\n"
        ));
    }
    state.stats.render(&mut out);
    state.reload_counts.render(&mut out);
    state.chat.proxy.stats().render(&mut out);
    if let Some(webhooks) = &state.webhooks {
        webhooks.render(&mut out);
    }
    out
}

/// The `/metrics` response.
pub fn response(state: &AppState) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(render(state))));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Serves only `/metrics` on its own listener (`RUSTY_SOCKS_METRICS_ADDR`), until shutdown.
pub async fn serve(listener: TcpListener, state: Arc<AppState>) {
    loop {
        let stream = tokio::select! {
            () = state.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    Ok::<_, Infallible>(if req.uri().path() == "/metrics" {
                        response(&state)
                    } else {
                        let mut not_found =
                            Response::new(Full::new(Bytes::from_static(b"not found\n")));
                        *not_found.status_mut() = StatusCode::NOT_FOUND;
                        not_found
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}
