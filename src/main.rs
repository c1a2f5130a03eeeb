//! The `rusty_socks` binary: configuration, logging, runtime, startup checks, bind, serve.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use rusty_socks::server::Prepared;
use rusty_socks::server::reload::LogLevel;
use rusty_socks::settings::{BrokerUrl, Config, SETTINGS};

/// Writes to standard output, ignoring a closed pipe (`rusty_socks --help | head -1`):
/// `println!` would panic there and exit with 101.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`say!`] for standard error.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    if let Some(arg) = std::env::args_os().nth(1) {
        let arg = arg.to_string_lossy();
        return match &*arg {
            "-h" | "--help" => {
                print_help();
                ExitCode::SUCCESS
            }
            "-V" | "--version" => {
                say!("rusty_socks {}", env!("CARGO_PKG_VERSION"));
                ExitCode::SUCCESS
            }
            other => {
                complain!(
                    "rusty_socks: unknown argument {other:?}; settings come from RUSTY_SOCKS_* variables (see --help)"
                );
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            complain!("rusty_socks: {err}");
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // A reload may change the filter (see `log_level`).
        .with_filter_reloading();
    let log_filter = logs.reload_handle();
    // Logs piped into `tee` outlive it on Ctrl-C; a failed write must not become a panic
    // (the default reports it with `eprintln!`, which panics on a closed stderr).
    logs.log_internal_errors(false).init();
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for (name, closest) in rusty_socks::settings::unknown_variables(names) {
        match closest {
            Some(meant) => tracing::warn!(
                "{name} is not a setting and is ignored; did you mean {meant}? (rusty_socks --help lists them)"
            ),
            None => tracing::warn!(
                "{name} is not a setting and is ignored (rusty_socks --help lists them)"
            ),
        }
    }
    // Every connection is a file descriptor: take the soft limit up to the hard one, so the
    // connection limit is not silently capped by a low default (often 1024).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(
            open_files = limit,
            "open-file limit raised to the hard limit"
        ),
        Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("rusty-socks-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            complain!(
                "rusty_socks: cannot start {} worker threads: {err}",
                config.worker_threads
            );
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, log_level(log_filter)))
}

/// How a reload changes the log filter: to what `RUST_LOG` says (read again at each reload).
fn log_level<S: tracing::Subscriber + 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> LogLevel {
    LogLevel {
        name: "RUST_LOG",
        wanted: Box::new(|_config| std::env::var("RUST_LOG").ok()),
        set: Box::new(move |filter| {
            let filter =
                tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
        current: std::env::var("RUST_LOG").unwrap_or_default(),
    }
}

/// Connects and loads everything first, then binds and announces the address: a server that
/// cannot work never says it is listening. Each failure is printed once.
async fn serve(config: Config, log: LogLevel) -> ExitCode {
    let addr = SocketAddr::new(config.host, config.port);
    // Installed before the broker is contacted: connecting can take a while (a broker that
    // accepts and never answers), and a SIGTERM meanwhile must stop the process cleanly, not
    // kill it with the default action.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut prepared = tokio::select! {
        prepared = Prepared::new(config) => match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                complain!("rusty_socks: cannot start: {err}");
                return ExitCode::FAILURE;
            }
        },
        () = &mut stop => {
            tracing::info!("stopped before startup finished");
            return ExitCode::SUCCESS;
        }
    };
    // SIGHUP and `POST /api/reload` read the settings again, as above.
    prepared.reload_with(
        Box::new(|| Config::from_env().map_err(|err| vec![err.to_string()])),
        Some(log),
    );
    let listener = match listen(addr) {
        Ok(listener) => listener,
        Err(err) => {
            complain!(
                "rusty_socks: cannot listen on {addr} (RUSTY_SOCKS_HOST/RUSTY_SOCKS_PORT): {err}"
            );
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    announce(&prepared, local);
    prepared.serve(listener, stop).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// What an operator needs to see at startup: the broker, the namespaces, where to connect.
fn announce(prepared: &Prepared, local: SocketAddr) {
    let config = prepared.config();
    let broker = match &config.broker {
        BrokerUrl::Memory => "memory (one node, nothing shared)".to_owned(),
        BrokerUrl::Redis(url) | BrokerUrl::Nats(url) => rusty_socks::broker::redact(url),
    };
    let mut namespaces: Vec<String> = config
        .namespaces
        .names()
        .map(|name| {
            if name.is_empty() {
                "\"\" (channels without ':')".to_owned()
            } else {
                format!("{name}:")
            }
        })
        .collect();
    namespaces.sort();
    tracing::info!("broker: {broker}");
    tracing::info!(
        "namespaces: {} (RUSTY_SOCKS_NAMESPACES)",
        namespaces.join(", ")
    );
    let scheme = if config.tls_cert.is_some() { "s" } else { "" };
    // A wildcard address is not something a browser can open.
    let shown = if local.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), local.port())
    } else {
        local
    };
    if config.demo {
        tracing::info!("demo page: http{scheme}://{shown}/");
    }
    if let Some(metrics) = prepared.metrics_addr() {
        tracing::info!("metrics: http://{metrics}/metrics");
    }
    tracing::info!(
        address = %local,
        worker_threads = config.worker_threads,
        max_connections = config.max_connections,
        "rusty_socks listening on {local} (ws{scheme}://{shown}/ws)"
    );
}

/// Pending connections the kernel may queue before `accept`: the usual default of 128
/// overflows during a connection burst, and every dropped SYN costs its client a one-second
/// retransmit. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket with a large accept backlog and `SO_REUSEADDR` (a restart must
/// not fail on connections of the previous process still in TIME_WAIT).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: a signal that arrives during startup or right after "listening
/// on" is logged must stop the server gracefully, not kill it with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(sig) => Some(sig),
            Err(err) => {
                tracing::warn!(%err, "cannot handle {name}: it will stop the server abruptly");
                None
            }
        };
        let term = install(SignalKind::terminate(), "SIGTERM");
        let int = install(SignalKind::interrupt(), "SIGINT");
        async move {
            tokio::select! {
                () = arrival(int) => tracing::info!("SIGINT received"),
                () = arrival(term) => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C received");
            } else {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves when `signal` arrives; never, for a signal that could not be handled.
#[cfg(unix)]
async fn arrival(signal: Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(mut signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn print_help() {
    say!(
        "rusty_socks {} - a real-time WebSocket messaging server\n",
        env!("CARGO_PKG_VERSION")
    );
    say!("Usage: rusty_socks [--help | --version]   (settings come from environment variables)\n");
    say!("Endpoints:");
    for (path, what) in ENDPOINTS {
        say!("  {path:<24} {what}");
    }
    say!("\nSettings (environment variables):");
    for s in SETTINGS {
        say!("  {:<36} default {:<10} {}", s.var, s.default, s.meaning);
    }
    say!(
        "\nLogging: RUST_LOG (e.g. RUST_LOG=debug). Invalid settings exit with code 2; an unknown\n\
         RUSTY_SOCKS_* variable is warned about at startup."
    );
}

/// Every endpoint, as `--help` lists them.
const ENDPOINTS: &[(&str, &str)] = &[
    (
        "GET /ws",
        "WebSocket: legacy chat and protocol v1 (rusty-socks.v1)",
    ),
    (
        "GET /health",
        "200 while serving, 503 while the broker is down",
    ),
    ("GET /stats", "counters as JSON"),
    (
        "GET /metrics",
        "Prometheus metrics (or on RUSTY_SOCKS_METRICS_ADDR)",
    ),
    (
        "GET /",
        "demo page, and /rusty-socks.js the browser client (RUSTY_SOCKS_DEMO)",
    ),
    (
        "GET /echo",
        "echo endpoint (RUSTY_SOCKS_ECHO_ENDPOINT=true)",
    ),
    (
        "POST /api/publish",
        "server API (RUSTY_SOCKS_API_KEY): publish to a channel",
    ),
    ("POST /api/broadcast", "publish to several channels"),
    (
        "POST /api/disconnect",
        "close a user's connections on every node",
    ),
    ("GET /api/presence/{ch}", "who is subscribed to a channel"),
    ("GET /api/history/{ch}", "a channel's history"),
    ("GET /api/channels", "this node's channels"),
    (
        "POST /api/reload",
        "read the settings again and apply what can change live (also SIGHUP)",
    ),
];
