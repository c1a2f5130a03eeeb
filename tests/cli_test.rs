//! The command line as an operator uses it, running the real binary: the config file in every
//! format, precedence (defaults < file < variables < flags) seen by `print-config` and by the
//! port the server binds, every error path (exit code 2, naming the file, key and line, the
//! variable or the flag, all errors at once), the helper commands, and JSON logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::process::*;
use common::*;

/// A file with `contents` in a directory of this test process, named `name`.
fn file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rusty_socks_cli_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// `n` ports free right now (bound, read, released).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The `print-config` line of `key`.
fn line_of<'a>(printed: &'a str, key: &str) -> &'a str {
    printed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} in {printed}"))
}

#[test]
fn help_lists_the_subcommands_and_a_flag_per_setting() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for sub in [
        "serve",
        "check-config",
        "print-config",
        "gen-config",
        "gen-token",
    ] {
        assert!(out.contains(sub), "{sub} missing from --help");
    }
    for setting in rusty_socks::settings::SETTINGS {
        assert!(
            out.contains(&format!("--{} ", setting.flag())),
            "--{}",
            setting.flag()
        );
        assert!(out.contains(setting.var), "{}", setting.var);
    }
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("rusty_socks ", env!("CARGO_PKG_VERSION")))
    );
}

#[test]
fn gen_config_writes_every_setting_and_check_config_accepts_it_as_is() {
    for (format, ext) in [("toml", "toml"), ("yaml", "yml"), ("json", "json")] {
        let (code, text, err) = run(&["gen-config", "--format", format], &[]);
        assert_eq!(code, 0, "{err}");
        for setting in rusty_socks::settings::SETTINGS {
            assert!(
                text.contains(&setting.file_key()),
                "{format}: {} missing",
                setting.file_key()
            );
        }
        if format != "json" {
            assert!(text.contains("# listen port"), "{format} has no comments");
        }
        let path = file(&format!("generated.{ext}"), &text);
        let (code, out, err) = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{format}: {err}");
        assert!(out.contains("configuration OK"), "{out}");
        // Everything in it is a default.
        let (code, out, err) = run(&["print-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            line_of(&out, "port").split_whitespace().nth(1),
            Some("3030")
        );
    }
    let (code, _, err) = run(&["gen-config", "--format", "ini"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("ini"), "{err}");
}

#[test]
fn print_config_shows_file_env_and_flag_precedence_with_secrets_redacted() {
    let path = file(
        "precedence.toml",
        "port = 4001\nmax_conn = 7\nbuffer = 9\njwt_secret = \"a-very-secret-file-value\"\n\
         broker_prefix = \"from-file\"\n",
    );
    let (code, out, err) = run(
        &[
            "print-config",
            "--config",
            path.to_str().unwrap(),
            "--port",
            "4003",
        ],
        &[
            ("RUSTY_SOCKS_PORT", "4002"),
            ("RUSTY_SOCKS_MAX_CONN", "8"),
            ("RUSTY_SOCKS_API_KEY", "an-api-key-from-the-env"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let check = |key: &str, value: &str, source: &str| {
        let line = line_of(&out, key);
        assert_eq!(line.split_whitespace().nth(1), Some(value), "{line}");
        assert!(line.contains(source), "{line}");
    };
    check("port", "4003", "flag (--port)");
    check("max_conn", "8", "env (RUSTY_SOCKS_MAX_CONN)");
    check("buffer", "9", "file (");
    check("broker_prefix", "from-file", "file (");
    check("timeout", "60", "default");
    check("jwt_secret", "***", "file");
    check("api_key", "***", "env");
    assert!(!out.contains("a-very-secret-file-value"), "{out}");
    assert!(!out.contains("an-api-key-from-the-env"), "{out}");
    // The file can be named by the variable too.
    let (code, out, _) = run(
        &["print-config"],
        &[("RUSTY_SOCKS_CONFIG", path.to_str().unwrap())],
    );
    assert_eq!(code, 0);
    check_line(&out, "port", "4001", "file (");
}

fn check_line(out: &str, key: &str, value: &str, source: &str) {
    let line = line_of(out, key);
    assert_eq!(line.split_whitespace().nth(1), Some(value), "{line}");
    assert!(line.contains(source), "{line}");
}

#[test]
fn the_port_bound_follows_file_then_env_then_flag() {
    let ports = free_ports(3);
    let (a, b, c) = (ports[0], ports[1], ports[2]);
    // Namespaces as a real nested table, not a JSON string.
    let path = file(
        "serve.toml",
        &format!("port = {a}\n\n[namespaces.chat]\nhistory_size = 5\n\n[namespaces.\"\"]\n"),
    );
    let config = path.to_str().unwrap();
    let b_text = b.to_string();
    let c_text = c.to_string();
    let mut server = Logged::spawn(&["--config", config], &[]);
    assert_eq!(server.address().port(), a);
    assert!(server.wait_for("namespaces:").contains("chat:"));
    server.stop();
    // Named by the variable: which is not warned about as an unknown setting.
    let mut server = Logged::spawn(&[], &[("RUSTY_SOCKS_CONFIG", config)]);
    assert_eq!(server.address().port(), a);
    assert!(
        !server.seen.iter().any(|l| l.contains("not a setting")),
        "{:#?}",
        server.seen
    );
    server.stop();
    let mut server = Logged::spawn(
        &["serve", "--config", config],
        &[("RUSTY_SOCKS_PORT", &b_text)],
    );
    assert_eq!(server.address().port(), b);
    server.stop();
    let mut server = Logged::spawn(
        &["--config", config, "--port", &c_text],
        &[("RUSTY_SOCKS_PORT", &b_text)],
    );
    assert_eq!(server.address().port(), c);
    server.stop();
}

#[test]
fn every_error_in_a_toml_file_is_reported_with_its_key_and_line() {
    let path = file(
        "bad.toml",
        "# settings\nport = 70000\nmax_con = 5\ndemo = \"yes\"\nnamespaces = \"{}\"\n",
    );
    let p = path.display().to_string();
    for args in [
        vec!["check-config", "--config", &p],
        vec!["--config", &p],
        vec!["print-config", "--config", &p],
    ] {
        let (code, out, err) = run(&args, &[("RUSTY_SOCKS_PING", "abc")]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!out.contains("listening"), "{out}");
        for needle in [
            format!(
                "{p}, line 2: invalid `port` = \"70000\": expected a whole number from 0 to 65535"
            ),
            format!("{p}, line 3: unknown key `max_con`; did you mean `max_conn`?"),
            format!("{p}, line 4: `demo` must be true or false, not a string"),
            format!("{p}, line 5: `namespaces` must be a table, not a string"),
            "invalid RUSTY_SOCKS_PING=\"abc\"".to_owned(),
        ] {
            assert!(err.contains(&needle), "{args:?}: {needle} not in {err}");
        }
    }
}

#[test]
fn yaml_and_json_errors_name_the_file_and_key() {
    let yaml = file("bad.yaml", "port: 8080\nmax_conn: many\nbogus: 1\n");
    let (code, _, err) = run(&["check-config", "--config", yaml.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.yaml, line 2: `max_conn` must be a whole number, not a string"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml, line 3: unknown key `bogus`"),
        "{err}"
    );
    let json = file("bad.json", "{\n  \"max_conn\": 0,\n  \"host\": 5\n}\n");
    let (code, _, err) = run(&["check-config", "--config", json.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.json, line 2: invalid `max_conn` = \"0\""),
        "{err}"
    );
    assert!(
        err.contains("bad.json, line 3: `host` must be a string, not a number"),
        "{err}"
    );
    // YAML namespaces are a nested map too.
    let good = file(
        "good.yaml",
        "namespaces:\n  chat:\n    history_size: 5\n  '': {}\n",
    );
    let (code, out, err) = run(&["print-config", "--config", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(line_of(&out, "namespaces").contains("chat"), "{out}");
}

#[test]
fn unreadable_or_malformed_sources_and_bad_arguments_exit_2_with_a_clear_message() {
    let syntax = file("syntax.toml", "port = 1\nhost = \n");
    let ini = file("settings.ini", "port = 1\n");
    /// Arguments, variables, and what standard error must say.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["check-config", "--config", "/no/such/rusty.toml"],
            vec![],
            "config file /no/such/rusty.toml: cannot read it",
        ),
        (
            vec!["check-config"],
            vec![("RUSTY_SOCKS_CONFIG", "/no/such/env.yaml")],
            "config file /no/such/env.yaml: cannot read it",
        ),
        (
            vec!["check-config", "--config", ini.to_str().unwrap()],
            vec![],
            "unknown extension; use .toml, .yaml, .yml or .json",
        ),
        (
            vec!["check-config", "--config", syntax.to_str().unwrap()],
            vec![],
            "not valid TOML: TOML parse error at line 2",
        ),
        (
            vec!["--max-conn", "0"],
            vec![],
            "invalid --max-conn \"0\": expected",
        ),
        (
            vec!["check-config", "--demo", "maybe"],
            vec![],
            "invalid --demo \"maybe\"",
        ),
        (
            vec!["--no-such-flag"],
            vec![],
            "unexpected argument '--no-such-flag'",
        ),
        (
            vec!["frobnicate"],
            vec![],
            "unrecognized subcommand 'frobnicate'",
        ),
        (
            vec!["--port"],
            vec![],
            "a value is required for '--port <N>'",
        ),
    ];
    for (args, envs, needle) in cases {
        let (code, out, err) = run(&args, &envs);
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        assert!(!out.contains("listening"), "{out}");
    }
    // A flag error and a variable error are reported together.
    let (code, _, err) = run(
        &["check-config", "--timeout", "x"],
        &[("RUSTY_SOCKS_MAX_CONN", "-1")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("invalid --timeout \"x\""), "{err}");
    assert!(err.contains("invalid RUSTY_SOCKS_MAX_CONN=\"-1\""), "{err}");
}

#[test]
fn check_config_checks_the_files_settings_name() {
    let (code, _, err) = run(
        &["check-config", "--jwt-public-key", "/no/such/key.pem"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/no/such/key.pem"), "{err}");
    // A broker that is not there is not contacted; an unknown variable is a warning.
    let (code, out, err) = run(
        &["check-config", "--broker", "redis://127.0.0.1:1"],
        &[("RUSTY_SOCKS_MAX_CONNS", "5")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"));
    assert!(
        err.contains("RUSTY_SOCKS_MAX_CONNS is not a setting and is ignored; did you mean RUSTY_SOCKS_MAX_CONN?"),
        "{err}"
    );
}

#[test]
fn gen_token_refuses_without_a_secret_and_names_the_setting() {
    let (code, out, err) = run(&["gen-token", "--sub", "alice"], &[]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert!(err.contains("RUSTY_SOCKS_JWT_SECRET"), "{err}");
    let secret = [("RUSTY_SOCKS_JWT_SECRET", "0123456789abcdef0123")];
    for bad in [
        vec!["gen-token", "--sub", "a", "--ttl", "1w"],
        vec!["gen-token", "--sub", "a", "--info", "{nope"],
        vec!["gen-token"],
    ] {
        let (code, _, err) = run(&bad, &secret);
        assert_eq!(code, 2, "{bad:?}: {err}");
    }
}

#[test]
fn a_token_from_gen_token_is_accepted_by_the_server() {
    let secret = "0123456789abcdef0123456789";
    let path = file("auth.yaml", &format!("jwt_secret: {secret}\n"));
    let (code, token, err) = run(
        &[
            "gen-token",
            "--config",
            path.to_str().unwrap(),
            "--sub",
            "alice",
            "--ttl",
            "10m",
            "--channels",
            "chat,news",
            "--info",
            r#"{"name":"Alice"}"#,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let token = token.trim();
    let mut server = Logged::spawn(&["--port", "0"], &[("RUSTY_SOCKS_JWT_SECRET", secret)]);
    let port = server.address().port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut ws, _) = v1_client_url(&format!("ws://127.0.0.1:{port}/ws?token={token}")).await;
        let reply = subscribe(&mut ws, "chat").await;
        assert!(reply.to_string().contains("chat"), "{reply}");
        // Without the token the server refuses: the token is what let alice in.
        let refused =
            tokio_tungstenite::connect_async(v1_request(&format!("ws://127.0.0.1:{port}/ws")))
                .await;
        assert!(refused.is_err(), "connected without a token");
    });
    server.stop();
}

#[test]
fn json_logs_are_one_object_a_line_with_level_target_message_and_fields() {
    let mut server = Logged::spawn(
        &["--port", "0", "--log-format", "json"],
        &[("RUST_LOG", "rusty_socks=debug")],
    );
    let port = server.address().port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = v1_client_url(&format!("ws://127.0.0.1:{port}/ws")).await;
    });
    let connected = server.wait_for("\"connected\"");
    let listening = server.wait_for("listening on");
    let mut seen = server.seen.clone();
    server.stop();
    for line in [&connected, &listening] {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(event["level"].is_string(), "{line}");
        assert!(
            event["target"].as_str().unwrap().starts_with("rusty_socks"),
            "{line}"
        );
        assert!(event["message"].is_string(), "{line}");
    }
    let connected: serde_json::Value = serde_json::from_str(&connected).unwrap();
    assert!(connected["client_id"].is_string(), "{connected}");
    let listening: serde_json::Value = serde_json::from_str(&listening).unwrap();
    assert_eq!(listening["address"], format!("127.0.0.1:{port}"));
    seen.retain(|l| !l.trim().is_empty());
    for line in seen {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "not JSON: {line}"
        );
    }
}

/// A syntax error names the file and line but never echoes the line itself: it may hold a
/// secret, and the message reaches logs and `POST /api/reload` answers.
#[test]
fn a_syntax_error_never_quotes_a_secret() {
    let secret = "s3cret-do-not-print-0123456789";
    for (name, contents) in [
        ("open.toml", format!("port = 1\njwt_secret = \"{secret}\n")),
        ("open.yaml", format!("port: 1\njwt_secret: \"{secret}\n")),
        (
            "open.json",
            format!("{{\"port\": 1, \"jwt_secret\": \"{secret}\n"),
        ),
    ] {
        let path = file(name, &contents);
        let (code, out, err) = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains("not valid"), "{name}: {err}");
        assert!(err.contains("line 2"), "{name}: {err}");
        assert!(
            !err.contains(secret) && !out.contains(secret),
            "{name}: {err}"
        );
    }
}
