//! The `rusty_socks` binary: the command line (`cli`), settings, logging, runtime, startup
//! checks, bind, serve.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use rusty_socks::server::Prepared;
use rusty_socks::server::reload::LogLevel;
use rusty_socks::settings::{BrokerUrl, Config, LogFormat, Sources};

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

#[cfg(feature = "mimalloc")]
mod allocator;
mod cli;

/// With the `mimalloc` feature, the binary allocates through mimalloc (thread-local free
/// lists) instead of the system allocator, with tokio's task blocks at their exact size (see
/// the `allocator` module).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;

fn main() -> ExitCode {
    let sources = match cli::parse(std::env::args_os()) {
        cli::Action::Serve(sources) => sources,
        cli::Action::Done(code) => return code,
    };
    let loaded = match rusty_socks::settings::load(&sources) {
        Ok(loaded) => loaded,
        Err(errors) => {
            cli::report(&errors);
            return ExitCode::from(2);
        }
    };
    let config = loaded.config;
    let log = init_logging(&config);
    for (name, closest) in loaded.unknown_variables {
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(config.worker_threads)
        .thread_name("rusty-socks-worker")
        .enable_all();
    // A worker about to sleep hands memory freed since back to the system (at most once a
    // second): a quiet server keeps only what its connections hold.
    #[cfg(feature = "mimalloc")]
    builder
        .on_thread_park(|| {
            allocator::worker_parks();
        })
        .on_thread_unpark(allocator::worker_unparks);
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            complain!(
                "rusty_socks: cannot start {} worker threads: {err}",
                config.worker_threads
            );
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, sources, log))
}

/// Connects and loads everything first, then binds and announces the address: a server that
/// cannot work never says it is listening. Each failure is printed once.
async fn serve(config: Config, sources: Sources, log: LogLevel) -> ExitCode {
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
    // SIGHUP and `POST /api/reload` read every source again (the same file, variables and
    // flags) and apply what can change live.
    prepared.reload_with(
        Box::new(move || {
            rusty_socks::settings::load(&sources)
                .map(|loaded| loaded.config)
                .map_err(|errors| errors.iter().map(ToString::to_string).collect())
        }),
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

/// Logs to standard output, as text or one JSON object a line (`RUSTY_SOCKS_LOG_FORMAT`) with
/// the event's fields (connection, client, ...) at the top level, where log shippers look for
/// them. The filter is `RUST_LOG` when set, else `RUSTY_SOCKS_LOG_LEVEL`, which a reload can
/// change: the returned [`LogLevel`] is how.
fn init_logging(config: &Config) -> LogLevel {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match &from_env {
        Some(wanted) => tracing_subscriber::EnvFilter::try_new(wanted).unwrap_or_else(|err| {
            complain!("rusty_socks: RUST_LOG={wanted:?} is not a log filter ({err}); using info");
            tracing_subscriber::EnvFilter::new("info")
        }),
        // Validated when the settings were read.
        None => tracing_subscriber::EnvFilter::try_new(&config.log_level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let current = from_env.clone().unwrap_or_else(|| config.log_level.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Logs piped into `tee` outlive it on Ctrl-C; a failed write must not become a panic
        // (the default reports it with `eprintln!`, which panics on a closed stderr).
        .log_internal_errors(false);
    match config.log_format {
        LogFormat::Text => {
            let builder = builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            log_level(handle, current, from_env.is_some())
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            log_level(handle, current, from_env.is_some())
        }
    }
}

/// How a reload changes the log filter: to `RUSTY_SOCKS_LOG_LEVEL` as read again, unless
/// `RUST_LOG` is set (it wins, and a running process's environment does not change).
fn log_level<S: tracing::Subscriber + 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
    current: String,
    rust_log_set: bool,
) -> LogLevel {
    LogLevel {
        name: "RUSTY_SOCKS_LOG_LEVEL",
        wanted: Box::new(move |config| (!rust_log_set).then(|| config.log_level.clone())),
        set: Box::new(move |filter| {
            let filter =
                tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }),
        current,
    }
}
