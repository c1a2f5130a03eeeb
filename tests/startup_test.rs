//! What the binary tells an operator: help, startup lines, refusals before "listening on",
//! warnings about unknown variables, one shutdown summary, and no panic on a closed pipe.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::*;
use common::*;

#[test]
fn help_lists_every_setting_and_endpoint_and_survives_a_closed_pipe() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for setting in rusty_socks::settings::SETTINGS {
        assert!(
            text.contains(setting.var),
            "{} missing from --help",
            setting.var
        );
    }
    for endpoint in [
        "GET /ws",
        "GET /health",
        "GET /stats",
        "GET /metrics",
        "GET /echo",
        "POST /api/publish",
        "GET /api/channels",
    ] {
        assert!(text.contains(endpoint), "{endpoint} missing from --help");
    }
    // `rusty_socks --help | head -1`: the reader is gone before the help is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(BIN)
        .arg("--help")
        .stdout(writer)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0), "--help into a closed pipe");
}

#[test]
fn logs_into_a_pipe_that_closes_before_ctrl_c_do_not_panic() {
    // `rusty_socks 2>&1 | tee log`, then Ctrl-C: tee is gone before the shutdown is logged.
    let mut cmd = Command::new(BIN);
    let (reader, writer) = std::io::pipe().unwrap();
    clean_env(&mut cmd)
        .env("RUSTY_SOCKS_HOST", "127.0.0.1")
        .env("RUSTY_SOCKS_PORT", "0")
        .stdout(writer.try_clone().unwrap())
        .stderr(writer);
    let mut child = Reap(cmd.spawn().unwrap());
    drop(cmd);
    let mut reader = std::io::BufReader::new(reader);
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0,
            "ended before listening"
        );
    }
    drop(reader);
    signal(&child, "INT");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn startup_names_the_broker_the_namespaces_and_the_demo_url() {
    let mut server = Logged::start(&[("RUSTY_SOCKS_NAMESPACES", r#"{"chat":{}}"#)]);
    let addr = server.address();
    let before: Vec<String> = server.seen.clone();
    let has = |needle: &str| before.iter().any(|l| l.contains(needle));
    assert!(has("broker: memory"), "{before:#?}");
    assert!(has("namespaces: ") && has("chat:"), "{before:#?}");
    assert!(
        has(&format!("demo page: http://127.0.0.1:{}/", addr.port())),
        "{before:#?}"
    );
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

#[test]
fn an_unknown_variable_is_warned_about_with_the_likely_setting() {
    let mut server = Logged::start(&[
        ("RUSTY_SOCKS_MAX_CONNS", "5"),
        ("RUSTY_SOCKS_FROBNICATE", "1"),
    ]);
    let line = server.wait_for("RUSTY_SOCKS_MAX_CONNS");
    assert!(
        line.contains("WARN") && line.contains("did you mean RUSTY_SOCKS_MAX_CONN?"),
        "{line}"
    );
    let line = server.wait_for("RUSTY_SOCKS_FROBNICATE");
    assert!(line.contains("is not a setting"), "{line}");
    server.address();
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

/// Runs the binary to its exit and returns (status, stdout + stderr).
fn run_to_exit(settings: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd)
        .env("RUSTY_SOCKS_HOST", "127.0.0.1")
        .env("RUSTY_SOCKS_PORT", "0")
        .envs(settings.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("startup did not end within 30 s");
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

#[test]
fn a_server_that_cannot_work_fails_before_listening_with_one_error() {
    let missing = "/nonexistent/rusty-socks-cert.pem";
    // (settings, the setting the error must name once, a detail it must give)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("RUSTY_SOCKS_TLS_CERT", missing),
                ("RUSTY_SOCKS_TLS_KEY", missing),
            ],
            "RUSTY_SOCKS_TLS_CERT",
            missing,
        ),
        (
            vec![("RUSTY_SOCKS_BROKER", "redis://127.0.0.1:1")],
            "RUSTY_SOCKS_BROKER",
            "127.0.0.1:1",
        ),
        (
            vec![("RUSTY_SOCKS_BROKER", "nats://127.0.0.1:1")],
            "RUSTY_SOCKS_BROKER",
            "127.0.0.1:1",
        ),
    ];
    for (settings, var, detail) in cases {
        let (status, text) = run_to_exit(&settings);
        assert!(!status.success(), "{var}: {status:?}\n{text}");
        assert!(!text.contains("listening on"), "{var}: announced\n{text}");
        assert_eq!(text.matches(var).count(), 1, "{var} not said once:\n{text}");
        assert!(text.contains(detail), "{var}:\n{text}");
    }
}

#[test]
fn a_bad_namespace_option_names_the_option_and_its_values() {
    let (status, text) = run_to_exit(&[(
        "RUSTY_SOCKS_NAMESPACES",
        r#"{"chat":{"publish":"everyone"}}"#,
    )]);
    assert_eq!(status.code(), Some(2), "{text}");
    for needle in [
        "RUSTY_SOCKS_NAMESPACES",
        "namespace \"chat\"",
        "option \"publish\"",
        "\"anyone\", \"authenticated\", \"listed\" or \"nobody\"",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert!(!text.contains("untagged"), "{text}");
}

#[test]
fn shutdown_is_one_summary_line_not_one_per_connection() {
    let mut server = Logged::start(&[]);
    let addr = server.address();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("ws://{addr}/ws");
    let mut clients = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(join_url(&url).await.0);
        }
        clients
    });
    signal(&server.child, "TERM");
    runtime.block_on(async {
        for ws in &mut clients {
            assert_eq!(recv_close_code(ws).await, 1001);
        }
    });
    assert!(wait_exit(&mut server.child, WAIT).success());
    let log = server.rest();
    let summary: Vec<_> = log
        .iter()
        .filter(|l| l.contains("closed 3 connections in"))
        .collect();
    assert_eq!(summary.len(), 1, "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains("client_id")),
        "per-connection lines: {log:#?}"
    );
}
