//! The command line of the `rusty_socks` binary: the subcommands, and a flag for every setting
//! generated from the settings table (`RUSTY_SOCKS_MAX_CONN` is `--max-conn`), so a flag cannot
//! drift from its variable or its config file key. Settings themselves are read by
//! `settings::load`; this module only gathers what the user typed and runs the helper commands.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Arg, ArgMatches, Command};
use rusty_socks::settings::{self, FileFormat, Kind, LoadError, Loaded, SETTINGS, Sources};

/// What `main` does next.
pub enum Action {
    /// Run the server with settings from these sources.
    Serve(Sources),
    /// A helper command ran (or the command line was refused): exit with this code.
    Done(ExitCode),
}

/// The heading the settings' flags are listed under in `--help`.
const SETTINGS_HEADING: &str =
    "Settings (each flag is also a RUSTY_SOCKS_* variable and a config file key)";

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

/// The command line: subcommands, `--config`, and one global flag per setting.
fn command() -> Command {
    let mut endpoints = String::from("Endpoints:\n");
    for (path, what) in ENDPOINTS {
        endpoints.push_str(&format!("  {path:<24} {what}\n"));
    }
    endpoints.push_str(
        "\nPrecedence: defaults < config file < RUSTY_SOCKS_* variables < flags. A variable\n\
         RUSTY_SOCKS_FOO_BAR is the flag --foo-bar and the config file key foo_bar.\n\
         Logging: RUST_LOG (e.g. RUST_LOG=debug), RUSTY_SOCKS_LOG_FORMAT=text|json.\n\
         Invalid settings exit with code 2 (all of them reported); an unknown RUSTY_SOCKS_*\n\
         variable is warned about at startup, an unknown config file key is an error.",
    );
    let mut cmd = Command::new("rusty_socks")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A real-time WebSocket messaging server")
        .after_help(endpoints)
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .global(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("config file: .toml, .yaml/.yml or .json [RUSTY_SOCKS_CONFIG]"),
        )
        .subcommand(Command::new("serve").about("run the server (what no subcommand does)"))
        .subcommand(
            Command::new("check-config")
                .about("validate every setting and the files they name; bind nothing, contact no broker"),
        )
        .subcommand(
            Command::new("print-config")
                .about("print the settings in force and where each came from (secrets shown as ***)"),
        )
        .subcommand(
            Command::new("gen-config")
                .about("print a config file with every setting at its default")
                .arg(
                    Arg::new("format")
                        .long("format")
                        .value_parser(["toml", "yaml", "json"])
                        .default_value("toml"),
                ),
        )
        .subcommand(
            Command::new("gen-token")
                .about("sign a connection token with the HS256 secret (RUSTY_SOCKS_JWT_SECRET), for development and tests")
                .arg(Arg::new("sub").long("sub").required(true).help("the user id (sub claim)"))
                .arg(
                    Arg::new("ttl")
                        .long("ttl")
                        .default_value("1h")
                        .help("lifetime: seconds, or a number with s, m, h or d"),
                )
                .arg(
                    Arg::new("channels")
                        .long("channels")
                        .help("comma-separated channel patterns (channels claim)"),
                )
                .arg(Arg::new("info").long("info").help("JSON shown in presence (info claim)")),
        );
    for setting in SETTINGS {
        let value_name = match setting.kind {
            Kind::Int => "N",
            Kind::Bool => "BOOL",
            Kind::Text | Kind::Secret => "VALUE",
            Kind::List => "LIST",
            Kind::Map => "JSON",
        };
        cmd = cmd.arg(
            Arg::new(setting.var)
                .long(setting.flag())
                .value_name(value_name)
                .global(true)
                .help_heading(SETTINGS_HEADING)
                .help(format!(
                    "{} [{}, key {}, default {}]",
                    setting.meaning,
                    setting.var,
                    setting.file_key(),
                    setting.default
                )),
        );
    }
    cmd
}

/// The sources named on the command line (`--config` and the settings' flags).
fn sources(matches: &ArgMatches) -> Sources {
    let flags = SETTINGS
        .iter()
        .filter_map(|s| Some((s.var, matches.get_one::<String>(s.var)?.clone())))
        .collect();
    Sources::with_process_env(matches.get_one::<PathBuf>("config").cloned(), flags)
}

/// Parses the command line; runs a helper command, or hands serving back to `main`.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Action {
    let matches = match command().try_get_matches_from(args) {
        Ok(matches) => matches,
        Err(err) => {
            // Help and version are "errors" that go to standard output with code 0; a write
            // into a closed pipe is ignored, never a panic.
            let _ = err.print();
            return Action::Done(if err.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    let (name, sub) = match matches.subcommand() {
        Some((name, sub)) => (name, sub),
        None => ("serve", &matches),
    };
    let sources = sources(sub);
    Action::Done(match name {
        "serve" => return Action::Serve(sources),
        "check-config" => check_config(&sources),
        "print-config" => match load(&sources) {
            Ok(loaded) => {
                say!("{}", loaded.describe().trim_end());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        "gen-config" => {
            let format = sub
                .get_one::<String>("format")
                .and_then(|f| FileFormat::parse(f))
                .unwrap_or(FileFormat::Toml);
            say!("{}", settings::gen_config(format).trim_end());
            ExitCode::SUCCESS
        }
        "gen-token" => gen_token(sub, &sources),
        _ => ExitCode::from(2),
    })
}

/// Prints every error, one a line, to standard error.
pub fn report(errors: &[LoadError]) {
    for err in errors {
        complain!("rusty_socks: {err}");
    }
    if errors.len() > 1 {
        complain!("rusty_socks: {} errors in the settings", errors.len());
    }
}

/// [`settings::load`], with errors reported and turned into exit code 2.
fn load(sources: &Sources) -> Result<Loaded, ExitCode> {
    settings::load(sources).map_err(|errors| {
        report(&errors);
        ExitCode::from(2)
    })
}

/// Everything serving would check before binding, without binding or contacting a broker:
/// the settings, the TLS certificate and key, the token keys (a JWKS URL is not fetched).
fn check_config(sources: &Sources) -> ExitCode {
    let loaded = match load(sources) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    for (name, closest) in &loaded.unknown_variables {
        let meant = closest
            .map(|m| format!("; did you mean {m}?"))
            .unwrap_or_default();
        complain!("rusty_socks: warning: {name} is not a setting and is ignored{meant}");
    }
    let config = &loaded.config;
    let mut failed = false;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key)
        && let Err(err) = rusty_socks::server::tls::acceptor(cert, key)
    {
        complain!("rusty_socks: RUSTY_SOCKS_TLS_CERT/RUSTY_SOCKS_TLS_KEY: {err}");
        failed = true;
    }
    let mut keys = config.key_options();
    let mut notes = String::new();
    if let Some(settings::JwksSource::Url(url)) = &keys.jwks {
        notes = format!("; the JWKS URL {url} was not fetched");
        keys.jwks = None;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => {
            let loaded_keys = runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    rusty_socks::auth::Verifier::load(&keys),
                )
                .await
            });
            match loaded_keys {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    complain!("rusty_socks: {err}");
                    failed = true;
                }
                Err(_) => {
                    complain!("rusty_socks: reading the token keys took over 10 s");
                    failed = true;
                }
            }
        }
        Err(err) => {
            complain!("rusty_socks: cannot check the token keys: {err}");
            failed = true;
        }
    }
    if failed {
        return ExitCode::from(2);
    }
    let file = loaded
        .file
        .as_ref()
        .map(|p| format!(" (config file {})", p.display()))
        .unwrap_or_default();
    say!("configuration OK{file}{notes}");
    ExitCode::SUCCESS
}

/// A lifetime like `90`, `45s`, `30m`, `1h` or `7d`, from one second to a year.
fn parse_ttl(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    let secs = number.parse::<u64>().ok()?.checked_mul(scale)?;
    (1..=365 * 86_400)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

/// Signs a token the server accepts: HS256 with the configured secret, `exp` after `--ttl`,
/// and the configured issuer and first audience when the server demands them.
fn gen_token(args: &ArgMatches, sources: &Sources) -> ExitCode {
    let loaded = match load(sources) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let config = &loaded.config;
    let Some(secret) = &config.jwt_secret else {
        complain!(
            "rusty_socks: gen-token needs the HS256 secret: set RUSTY_SOCKS_JWT_SECRET \
             (flag --jwt-secret, config file key jwt_secret)"
        );
        return ExitCode::from(2);
    };
    let ttl_text = args.get_one::<String>("ttl").map_or("1h", String::as_str);
    let Some(ttl) = parse_ttl(ttl_text) else {
        complain!(
            "rusty_socks: invalid --ttl {ttl_text:?}: expected seconds or a number with s, m, h or d (at most 365d)"
        );
        return ExitCode::from(2);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = serde_json::json!({
        "sub": args.get_one::<String>("sub").cloned().unwrap_or_default(),
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    if let Some(channels) = args.get_one::<String>("channels") {
        let list: Vec<&str> = channels
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        claims["channels"] = serde_json::json!(list);
    }
    if let Some(info) = args.get_one::<String>("info") {
        match serde_json::from_str::<serde_json::Value>(info) {
            Ok(info) => claims["info"] = info,
            Err(err) => {
                complain!("rusty_socks: invalid --info: expected JSON ({err})");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(issuer) = &config.jwt_issuer {
        claims["iss"] = serde_json::json!(issuer);
    }
    if let Some(audience) = config.jwt_audience.first() {
        claims["aud"] = serde_json::json!(audience);
    }
    let key = jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes());
    match jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) {
        Ok(token) => {
            say!("{token}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            complain!("rusty_socks: cannot sign the token: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_take_units_and_stay_in_range() {
        assert_eq!(parse_ttl("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_ttl("0"), None);
        assert_eq!(parse_ttl("1w"), None);
        assert_eq!(parse_ttl("h"), None);
        assert_eq!(parse_ttl("400d"), None);
    }

    #[test]
    fn the_command_line_is_well_formed() {
        command().debug_assert();
    }
}
