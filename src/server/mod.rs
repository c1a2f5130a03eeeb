//! Accepting connections, serving HTTP on them, and shutting down cleanly.
//!
//! `main` calls [`Prepared::new`] (keys, TLS, broker: everything that can fail) before it binds
//! and announces the address, then [`Prepared::serve`]. The integration tests call [`run`], the
//! two in one: it takes a bound listener, so tests bind `127.0.0.1:0` and read the port first.

pub mod api;
pub mod demo;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod query;
pub mod reload;
pub mod tls;
pub mod token;
pub mod upgrade;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::auth::{KeyError, Verifier};
use crate::broker::BrokerError;
use crate::engine::admission::{
    AddressPermit, AddressRefused, Admission, HandshakePermit, Overload, PerAddress,
};
use crate::engine::hub::Hub;
use crate::engine::namespace::NamespaceOptions;
use crate::engine::node::{Dispatcher, Node, NodeOptions};
use crate::engine::sessions::Sessions;
use crate::engine::stats::Stats;
use crate::settings::Config;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The broker is unreachable.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A JWT key could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::server::tls::TlsError),
    /// The webhook pipeline could not start (its directory could not be opened).
    #[error("{0}")]
    Webhook(String),
    /// The separate metrics address could not be bound.
    #[error("RUSTY_SOCKS_METRICS_ADDR: cannot listen on {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// Shared by every connection.
#[derive(Debug)]
pub struct AppState {
    /// Settings in force.
    pub config: Config,
    /// Connection and handshake bounds.
    pub admission: Arc<Admission>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Local channel membership.
    pub hub: Arc<Hub>,
    /// Channels, history and presence through the broker.
    pub node: Arc<Node>,
    /// Every live WebSocket session.
    pub sessions: Arc<Sessions>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The settings in force: `config` with what reloads changed (`reload.rs`). Read where
    /// a live setting is decided (an upgrade's origin check); the rest read `config`.
    pub live: arc_swap::ArcSwap<Config>,
    /// Reloads done and refused, for `/metrics`.
    pub reload_counts: reload::ReloadCounts,
    /// Asks for a reload (`POST /api/reload`); unset when the server cannot reload.
    pub reloads: std::sync::OnceLock<reload::Reloads>,
    /// Per-IP connection rate limit.
    pub connect_limiter: crate::server::limits::ConnectLimiter,
    /// What every `/ws` session shares.
    pub chat: Arc<crate::engine::chat::ChatShared>,
    /// The webhook queue (`RUSTY_SOCKS_WEBHOOK_URL`), for the metrics.
    pub webhooks: Option<Arc<crate::engine::webhook::WebhookQueue>>,
    /// The webhook pipeline, taken at shutdown to deliver what is queued.
    webhook_pipeline: std::sync::Mutex<Option<crate::engine::webhook::Webhooks>>,
    /// The JWKS refresh task, when keys come from a JWKS document; replaced when a reload
    /// loads new keys (the lock is held only to swap the handle).
    jwks_refresh: std::sync::Mutex<Option<AbortOnDropHandle<()>>>,
}

impl AppState {
    /// State for one node, connected to the configured broker.
    pub async fn new(config: Config) -> Result<Arc<Self>, StartupError> {
        let verifier = Verifier::load(&config.key_options()).await?.map(Arc::new);
        let shutdown = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let sessions: Arc<Sessions> = Arc::default();
        let hub = Arc::new(Hub::new());
        let dispatcher = Arc::new(Dispatcher::new(
            Arc::clone(&hub),
            config.echo_to_sender,
            Arc::clone(&stats),
            Arc::clone(&sessions),
        ));
        let control = dispatcher.control();
        let broker = crate::broker::connect(config.broker_choice()?, dispatcher).await?;
        let options = NodeOptions {
            namespaces: config.namespaces.clone(),
            // Permissions from the unnamed namespace `""`; the rest is the legacy contract's.
            legacy: NamespaceOptions::legacy_channel(
                &config.namespaces.unnamed(),
                config.history_size,
            ),
            history_bytes: config.history_bytes,
            recovery_buffer: config.buffer,
            verifier: verifier.clone(),
            refresh_window: config.refresh_window,
            idempotency_window: config.idempotency_window,
        };
        let node = Arc::new(Node::new(
            Arc::clone(&hub),
            broker,
            options,
            Arc::clone(&stats),
        ));
        node.start(control).await?;
        // After the broker: with RUSTY_SOCKS_DATA_DIR, the history's lock guards the directory
        // (with Redis or NATS there is no history on disk: the webhook queue takes the lock).
        let webhook_pipeline = crate::engine::webhook::Webhooks::start(
            &config.webhook,
            config.data_dir.as_deref(),
            config.broker != crate::settings::BrokerUrl::Memory,
        )
        .map_err(StartupError::Webhook)?;
        let webhooks = webhook_pipeline.as_ref().map(|w| Arc::clone(&w.queue));
        if let Some(queue) = &webhooks {
            sessions.set_events(Arc::clone(queue) as _);
            if queue.reports_transitions() {
                // Before anyone is served, so every subscription is counted.
                node.set_transition_sink(Arc::clone(queue) as _)
                    .map_err(|why| StartupError::Webhook(why.to_owned()))?;
            }
        }
        // All bounded by configuration validation well below u32::MAX.
        let limits = crate::engine::chat::ChatLimits {
            replay: u32::try_from(config.replay_count).unwrap_or(u32::MAX),
            max_channels: u32::try_from(config.max_channels).unwrap_or(u32::MAX),
            max_data: u32::try_from(config.max_data_size).unwrap_or(u32::MAX),
            rate: config.client_rate,
            burst: config.client_burst,
        };
        let chat = Arc::new(crate::engine::chat::ChatShared {
            node: Arc::clone(&node),
            limits: arc_swap::ArcSwap::from_pointee(limits),
            proxy: Arc::new(crate::engine::backend::Proxy::new(config.proxy.clone())),
        });
        // JWKS keys rotate without a restart: refreshed until the server shuts down, and
        // started only once startup can no longer fail (the handle stops it when the state
        // goes, also when `serve` never runs).
        let jwks_refresh = jwks_refresh(verifier.as_deref(), &shutdown);
        Ok(Arc::new(Self {
            webhooks,
            webhook_pipeline: std::sync::Mutex::new(webhook_pipeline),
            jwks_refresh: std::sync::Mutex::new(jwks_refresh),
            live: arc_swap::ArcSwap::from_pointee(config.clone()),
            reload_counts: reload::ReloadCounts::default(),
            reloads: std::sync::OnceLock::new(),
            chat,
            admission: Admission::with_per_address(
                config.max_connections,
                config.max_queued_tasks,
                PerAddress::new(config.max_conn_per_ip, config.ipv6_prefix),
            ),
            stats,
            connect_limiter: crate::server::limits::ConnectLimiter::new(
                config.connect_rate,
                config.connect_burst,
            ),
            hub,
            node,
            sessions,
            shutdown,
            tracker: TaskTracker::new(),
            config,
        }))
    }
}

impl AppState {
    /// Replaces the JWKS refresh task with `verifier`'s (none: no task), after a reload
    /// loaded new keys.
    pub(crate) fn restart_jwks_refresh(&self, verifier: Option<&Verifier>) {
        let next = jwks_refresh(verifier, &self.shutdown);
        let old = std::mem::replace(
            &mut *self
                .jwks_refresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            next,
        );
        // Dropped outside the lock: dropping aborts the old task.
        drop(old);
    }
}

/// Starts `verifier`'s JWKS refresh task, if its keys come from a JWKS document; it stops at
/// `shutdown` or when the handle is dropped.
fn jwks_refresh(
    verifier: Option<&Verifier>,
    shutdown: &CancellationToken,
) -> Option<AbortOnDropHandle<()>> {
    let refresh = verifier?.refresh_task()?;
    let stop = shutdown.clone();
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = refresh => {}
        }
    })))
}

/// A server with everything it needs loaded and connected (keys, TLS, the broker, the metrics
/// listener), not yet accepting. Preparing first lets `main` report a startup failure before
/// it announces an address that would never answer.
pub struct Prepared {
    state: Arc<AppState>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Option<TcpListener>,
    reloader: Option<reload::Reloader>,
}

impl Prepared {
    /// Loads the TLS files and JWT keys, binds the metrics address and connects the broker.
    pub async fn new(config: Config) -> Result<Self, StartupError> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(crate::server::tls::acceptor(cert, key)?),
            _ => None,
        };
        let metrics = match config.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let state = AppState::new(config).await?;
        Ok(Self {
            state,
            tls,
            metrics,
            reloader: None,
        })
    }

    /// Lets the settings be reloaded through `source` (on SIGHUP, whose handler is installed
    /// now, and `POST /api/reload`); `log` changes the log filter. See `reload.rs`.
    pub fn reload_with(&mut self, source: reload::ReloadSource, log: Option<reload::LogLevel>) {
        let (reloader, reloads) = reload::Reloader::new(source, log);
        if self.state.reloads.set(reloads).is_ok() {
            self.reloader = Some(reloader);
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// The node, e.g. to [`Node::set_transition_sink`] before serving.
    pub fn node(&self) -> &Arc<Node> {
        &self.state.node
    }

    /// Where `/metrics` is served when it has its own address.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves `listener` until `shutdown` resolves, then closes every client with 1001, lets
    /// queued messages drain for up to `RUSTY_SOCKS_SHUTDOWN_GRACE`, and returns.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let Self {
            state,
            tls,
            metrics,
            reloader,
        } = self;
        state.tracker.spawn(heartbeat(Arc::clone(&state)));
        state.tracker.spawn(load_probe(Arc::clone(&state)));
        if let Some(reloader) = reloader {
            state
                .tracker
                .spawn(reload::run(Arc::clone(&state), reloader));
        }
        if let Some(listener) = metrics {
            state
                .tracker
                .spawn(crate::server::metrics::serve(listener, Arc::clone(&state)));
        }
        accept_until(&listener, &state, tls.as_ref(), shutdown).await;
        drop(listener);
        let started = std::time::Instant::now();
        let open = state.sessions.len();
        tracing::info!(
            connections = open,
            "shutting down: closing connections with 1001"
        );
        // Publishes are refused first, and those in flight finish, so every acknowledged
        // publication is in its subscribers' outboxes before they are closed. A publish stuck
        // in an unresponsive broker is not waited for beyond a second: the whole shutdown
        // must end within the grace period (plus half a second).
        let wait = (state.config.shutdown_grace / 2).min(Duration::from_secs(1));
        state.node.begin_shutdown(wait).await;
        state.shutdown.cancel();
        state.sessions.close_all();
        state.tracker.close();
        let limit = (state.config.shutdown_grace + Duration::from_millis(500))
            .saturating_sub(started.elapsed());
        let finished = tokio::time::timeout(limit, state.tracker.wait())
            .await
            .is_ok();
        // The transitions the closed sessions caused, told to the broker in what time is left.
        let left_over = (state.config.shutdown_grace + Duration::from_millis(500))
            .saturating_sub(started.elapsed());
        state.node.settle_transitions(left_over).await;
        // Webhook events queued until now (the closed sessions' and the transitions they
        // caused included) get the rest of the shutdown's time to be delivered; what is left stays on disk with a data dir.
        let pipeline = state
            .webhook_pipeline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(pipeline) = pipeline {
            let left = (state.config.shutdown_grace + Duration::from_millis(500))
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(200));
            let undelivered = pipeline.shutdown(tokio::time::Instant::now() + left).await;
            if undelivered > 0 {
                tracing::warn!(
                    undelivered,
                    durable = state.config.data_dir.is_some(),
                    "webhook events not delivered before shutdown (kept on disk only with RUSTY_SOCKS_DATA_DIR)"
                );
            }
        }
        // One line for the whole shutdown, not one per connection.
        let left = state.sessions.len();
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if finished {
            tracing::info!(
                closed = open,
                elapsed_ms,
                "closed {open} connections in {elapsed_ms} ms"
            );
        } else {
            tracing::warn!(
                closed = open.saturating_sub(left),
                unfinished = left,
                elapsed_ms,
                "closed {} connections in {elapsed_ms} ms; {left} did not finish closing in time",
                open.saturating_sub(left)
            );
        }
    }
}

/// Serves `listener` until `shutdown` resolves (see [`Prepared::serve`]).
///
/// Fails at once, before accepting anything, if the configured broker cannot be reached or a
/// key, certificate or the metrics address cannot be loaded or bound.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let prepared = Prepared::new(config)
        .await
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    prepared.serve(listener, shutdown).await;
    Ok(())
}

/// Accepts connections and starts their HTTP tasks until `shutdown` resolves.
async fn accept_until(
    listener: &TcpListener,
    state: &Arc<AppState>,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The whole request head (and the TLS handshake before it) must be in by then: one
        // deadline, not one per read, so a client sending a byte at a time is closed on time.
        let deadline = tokio::time::Instant::now() + state.config.handshake_timeout;
        let Some((stream, address)) = count_address(stream, peer, state, tls) else {
            continue;
        };
        match state.admission.try_handshake() {
            Ok(permit) => {
                let state2 = Arc::clone(state);
                let hold = Held {
                    permit,
                    address,
                    deadline,
                };
                match tls {
                    None => {
                        state
                            .tracker
                            .spawn(serve_http(TokioIo::new(stream), peer, state2, hold));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        state
                            .tracker
                            .spawn(serve_tls(stream, acceptor, peer, state2, hold));
                    }
                }
            }
            Err(overload) => {
                tracing::debug!(?overload, "refusing connection before its handshake");
                state.stats.refused(crate::engine::stats::Refusal::Overload);
                // Still one of its address's sockets until the refusal is answered.
                state
                    .tracker
                    .spawn(refuse(stream, tls.cloned(), overload, address));
            }
        }
    }
}

/// What a socket holds from its accept until its HTTP phase ends.
struct Held {
    /// Its slot under `RUSTY_SOCKS_MAX_QUEUED_TASKS` until its request head is in.
    permit: HandshakePermit,
    /// Its count under its client address (`RUSTY_SOCKS_MAX_CONN_PER_IP`), handed to the
    /// WebSocket session if it upgrades; `None` when not counted at accept (no bound, or a
    /// trusted proxy, whose clients are counted on upgrade under their forwarded address).
    address: Option<AddressPermit>,
    /// When its TLS handshake and request head must be complete.
    deadline: tokio::time::Instant,
}

/// Counts `stream` under its peer's address, or refuses it (429, or a bare close when its
/// address already has refusals being answered) and returns `None`.
///
/// The peer is all there is at accept time. A trusted proxy's sockets are not counted here: the
/// proxy's one address carries all its clients, and counting it would cap the whole deployment
/// at the per-address bound; their `/ws` upgrades are counted under the forwarded client
/// address once the request head is in (see `upgrade::upgrade`).
fn count_address(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    state: &Arc<AppState>,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Option<(TcpStream, Option<AddressPermit>)> {
    if crate::server::limits::is_trusted(peer.ip(), &state.config.trusted_proxies) {
        return Some((stream, None));
    }
    match state.admission.per_address().try_acquire(peer.ip()) {
        Ok(address) => Some((stream, address)),
        Err(refused) => {
            state.stats.refused(crate::engine::stats::Refusal::Address);
            match refused {
                AddressRefused::Answer(slot) => {
                    tracing::debug!(%peer, "refusing connection: address at its limit");
                    state.tracker.spawn(refuse(
                        stream,
                        tls.cloned(),
                        Overload::Address,
                        Some(slot),
                    ));
                }
                AddressRefused::Close => {
                    tracing::debug!(%peer, "closing connection: address at its limit");
                    drop(stream);
                }
            }
            None
        }
    }
}

/// Wakes every session once a second to check its ping and timeout deadlines: one timer for
/// the server instead of one per connection.
async fn heartbeat(state: Arc<AppState>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => state.sessions.tick(),
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Measures how busy the server is, for the busy write delay, until shutdown.
async fn load_probe(state: Arc<AppState>) {
    let workers = state.config.worker_threads;
    tokio::select! {
        () = crate::engine::load::probe(state.stats.load(), workers) => {}
        () = state.shutdown.cancelled() => {}
    }
}

/// Completes the TLS handshake, then serves HTTP, both within `RUSTY_SOCKS_HANDSHAKE_TIMEOUT`
/// of the accept.
async fn serve_tls(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    hold: Held,
) {
    match tokio::time::timeout_at(hold.deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Box::pin(serve_http(TokioIo::new(tls), peer, state, hold)).await,
        Ok(Err(err)) => tracing::debug!(%err, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake not finished in time"),
    }
}

/// Time beyond `RUSTY_SOCKS_API_TIMEOUT` for an API answer (a 504 at worst) to be written.
const API_ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Largest request head (request line and headers) read, in bytes; a longer one is answered
/// with 431 and the connection closed. Real heads are well under it (a JWT, at most 8 KiB, is
/// the largest thing a client sends in one), and hyper's own default (about 400 KB per
/// connection) would let every pending socket make the server buffer that much.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves HTTP/1.1 on one connection until it closes or upgrades.
async fn serve_http<IO>(
    io: TokioIo<IO>,
    peer: std::net::SocketAddr,
    state: Arc<AppState>,
    hold: Held,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Held {
        permit,
        address,
        deadline,
    } = hold;
    let slot = crate::server::upgrade::UpgradeSlot::default();
    {
        let _task = state.stats.task();
        let permit = Arc::new(permit);
        // Set when an `/api` request's headers are in: from then on it is bounded by
        // `RUSTY_SOCKS_API_TIMEOUT` (the API answers 504 itself), not by the handshake deadline.
        let api_request = Arc::new(AtomicBool::new(false));
        let service = {
            let state = Arc::clone(&state);
            let slot = Arc::clone(&slot);
            let api_request = Arc::clone(&api_request);
            service_fn(move |req| {
                // The request is in: this socket no longer counts as a pending handshake.
                permit.release();
                if crate::server::http::is_api(req.uri().path()) {
                    api_request.store(true, Ordering::Release);
                }
                crate::server::http::handle(req, Arc::clone(&state), peer, Arc::clone(&slot))
            })
        };
        // Boxed, and dropped before the session starts: hyper's state is only needed here.
        let mut conn = Box::pin(
            hyper::server::conn::http1::Builder::new()
                // hyper answers a longer head with 431 and closes.
                .max_header_size(MAX_HEAD_BYTES)
                .serve_connection(io, service)
                .with_upgrades(),
        );
        // Plain HTTP answers one request and closes, and an upgrade ends this phase, so one
        // timer over the whole HTTP phase bounds how long a socket can sit without finishing
        // its handshake (and hold a `MAX_QUEUED_TASKS` slot), at the cost of a single timer.
        // It counts from the accept, so however slowly the head arrives, a byte at a time
        // included, the socket is closed at `RUSTY_SOCKS_HANDSHAKE_TIMEOUT`.
        let deadline = tokio::time::sleep_until(deadline);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%err, "http connection ended with an error");
                    }
                }
                () = &mut deadline => {
                    // An API request under way has its own, longer bound: the API answers
                    // when it passes, and this deadline, moved once, still closes a socket
                    // that does not take the answer.
                    if api_request.swap(false, Ordering::AcqRel) {
                        let more = state.config.api_timeout + API_ANSWER_GRACE;
                        deadline.as_mut().reset(tokio::time::Instant::now() + more);
                        continue;
                    }
                    tracing::debug!("handshake not finished in time; closing");
                }
                () = state.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(state.config.shutdown_grace, conn).await;
                }
            }
            break;
        }
    }
    let pending = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    drop(slot);
    if let Some(pending) = pending {
        crate::server::upgrade::start(pending, &state, address).await;
    }
}

/// How long a refused socket may take, TLS handshake included.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Answers a socket refused before its request was read: 503 (a global bound) or 429 (its
/// address's bound) + `Retry-After`, then reads and
/// discards what it sent (closing with unread input would reset the connection and could
/// destroy the response before the client reads it). Bounded to [`REFUSAL_TIME`].
///
/// On a TLS port the answer goes inside TLS, after the handshake: plaintext there would only
/// break the client's handshake with a confusing error. A client that does not speak TLS is
/// just closed. The handshake costs a little CPU while overloaded, but tells a real client
/// why it was refused and when to retry, where a bare close would look like a network fault.
///
/// `held` (the socket's count under its address) is given back when the refusal is done.
async fn refuse(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    overload: Overload,
    held: Option<AddressPermit>,
) {
    let response = crate::server::http::raw_overload_response(overload);
    let refused = tokio::time::timeout(REFUSAL_TIME, async {
        match tls {
            None => answer_and_drain(stream, &response).await,
            Some(acceptor) => answer_and_drain(acceptor.accept(stream).await?, &response).await,
        }
    })
    .await;
    if let Ok(Err(err)) = refused {
        tracing::debug!(%err, "refused connection ended with an error");
    }
    drop(held);
}

/// Writes `response`, ends the write direction, and discards up to 64 KB of input until EOF.
async fn answer_and_drain<S>(mut stream: S, response: &[u8]) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(response).await?;
    // Flushes TLS records too, and sends TLS's close_notify.
    stream.shutdown().await?;
    let mut sink = [0u8; 1024];
    let mut total = 0usize;
    while total < 64 * 1024 {
        match stream.read(&mut sink).await? {
            0 => break,
            n => total += n,
        }
    }
    Ok(())
}
