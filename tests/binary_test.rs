//! The `rusty_socks` binary itself: settings, signals, worker threads.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::*;
use common::*;

/// Starts the binary on a free loopback port and returns it with the address it logged.
fn spawn(extra: &[(&str, &str)]) -> (Reap, std::net::SocketAddr) {
    let mut server = Logged::start(extra);
    let addr = server.address();
    (server.child, addr)
}

#[test]
fn bad_settings_stop_startup_with_exit_code_2_naming_the_variable() {
    let cases = [
        ("RUSTY_SOCKS_THREAD_POOL_SIZE", "0"),
        ("RUSTY_SOCKS_PORT", "70000"),
        ("RUSTY_SOCKS_MAX_CONN", "-1"),
        ("RUSTY_SOCKS_BUFFER", "garbage"),
        ("RUSTY_SOCKS_TIMEOUT", "1e3"),
        ("RUSTY_SOCKS_PING", "abc"),
        ("RUSTY_SOCKS_MAX_QUEUED_TASKS", "0"),
        ("RUSTY_SOCKS_HOST", "somewhere"),
        ("RUSTY_SOCKS_MAX_MESSAGE_SIZE", "12"),
    ];
    for (var, value) in cases {
        let out = clean_env(&mut Command::new(BIN))
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(stderr.contains(&format!("{value:?}")), "{var}: {stderr}");
        assert!(stderr.contains("expected"), "{var}: {stderr}");
    }
}

#[test]
fn help_lists_every_setting() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for var in [
        "RUSTY_SOCKS_HOST",
        "RUSTY_SOCKS_PORT",
        "RUSTY_SOCKS_MAX_CONN",
        "RUSTY_SOCKS_BUFFER",
        "RUSTY_SOCKS_TIMEOUT",
        "RUSTY_SOCKS_PING",
        "RUSTY_SOCKS_THREAD_POOL_SIZE",
        "RUSTY_SOCKS_MAX_QUEUED_TASKS",
        "RUSTY_SOCKS_MAX_MESSAGE_SIZE",
    ] {
        assert!(text.contains(var), "{var} missing from --help");
    }
}

#[test]
fn thread_pool_size_is_the_number_of_worker_threads() {
    let (mut child, addr) = spawn(&[("RUSTY_SOCKS_THREAD_POOL_SIZE", "3")]);
    // A new thread names itself once it runs, so give the workers a moment to appear.
    let count_workers = || {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.starts_with("rusty-socks-wor"))
            .count()
    };
    let deadline = Instant::now() + WAIT;
    let mut workers = count_workers();
    while workers < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        workers = count_workers();
    }
    assert_eq!(workers, 3);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, _, body) = runtime.block_on(http(addr, "GET", "/stats", &[]));
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["worker_threads"], 3);
    signal(&child, "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(5)).success());
}

#[test]
fn sigterm_and_sigint_close_clients_with_1001_and_exit_0_within_5_seconds() {
    for sig in ["TERM", "INT"] {
        let (mut child, addr) = spawn(&[]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut ws = runtime.block_on(async {
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                .await
                .unwrap();
            ws
        });
        let started = Instant::now();
        signal(&child, sig);
        let code = runtime.block_on(recv_close_code(&mut ws));
        assert_eq!(code, 1001, "SIG{sig}");
        let status = wait_exit(&mut child, Duration::from_secs(5));
        assert_eq!(status.code(), Some(0), "SIG{sig}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
