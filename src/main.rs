//! The `rusty_socks` binary: configuration, logging, runtime, bind, serve.

use std::net::SocketAddr;
use std::process::ExitCode;

use rusty_socks::config::{Config, SETTINGS};

fn main() -> ExitCode {
    if let Some(arg) = std::env::args().nth(1) {
        return match arg.as_str() {
            "-h" | "--help" => {
                print_help();
                ExitCode::SUCCESS
            }
            "-V" | "--version" => {
                println!("rusty_socks {}", env!("CARGO_PKG_VERSION"));
                ExitCode::SUCCESS
            }
            other => {
                eprintln!(
                    "rusty_socks: unknown argument {other:?}; settings come from RUSTY_SOCKS_* variables (see --help)"
                );
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("rusty_socks: {err}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Every connection is a file descriptor: take the soft limit up to the hard one, so the
    // connection limit is not silently capped by a low default (often 1024).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(
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
            eprintln!(
                "rusty_socks: cannot start {} worker threads: {err}",
                config.worker_threads
            );
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = match listen(addr) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "rusty_socks: cannot listen on {addr} (RUSTY_SOCKS_HOST/RUSTY_SOCKS_PORT): {err}"
            );
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        address = %local,
        worker_threads = config.worker_threads,
        max_connections = config.max_connections,
        "rusty_socks listening on {local} (ws://{local}/ws)"
    );
    match rusty_socks::server::run(listener, config, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(%err, "server failed");
            eprintln!("rusty_socks: {err}");
            ExitCode::FAILURE
        }
    }
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

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

fn print_help() {
    println!(
        "rusty_socks {} - a real-time WebSocket messaging server\n",
        env!("CARGO_PKG_VERSION")
    );
    println!("Usage: rusty_socks   (settings come from environment variables)\n");
    println!("Endpoints: GET /ws (WebSocket), GET /health, GET /stats, GET /echo (if enabled)\n");
    for s in SETTINGS {
        println!("  {:<36} default {:<10} {}", s.var, s.default, s.meaning);
    }
    println!("\nLogging: RUST_LOG (e.g. RUST_LOG=debug). Invalid settings exit with code 2.");
}
