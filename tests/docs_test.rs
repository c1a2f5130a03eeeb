//! The documentation lists every code the server can send.
#![allow(clippy::unwrap_used)]

use rusty_socks::types::ChannelError;
use rusty_socks::types::error::ClientError;
use rusty_socks::ws::close::CloseCode;

fn docs() -> [(&'static str, String); 2] {
    let root = env!("CARGO_MANIFEST_DIR");
    [
        (
            "README.md",
            std::fs::read_to_string(format!("{root}/README.md")).unwrap(),
        ),
        (
            "docs/protocol.md",
            std::fs::read_to_string(format!("{root}/docs/protocol.md")).unwrap(),
        ),
    ]
}

#[test]
fn every_error_code_is_documented() {
    let errors = [
        ClientError::InvalidJson(String::new()),
        ClientError::NotAnObject(""),
        ClientError::MissingField(""),
        ClientError::InvalidField {
            field: "",
            expected: "",
        },
        ClientError::UnknownType(String::new()),
        ClientError::BinaryNotSupported,
        ClientError::InvalidChannel(ChannelError::InvalidName),
        ClientError::UnknownNamespace(ChannelError::UnknownNamespace(String::new())),
        ClientError::AlreadySubscribed(String::new()),
        ClientError::NotSubscribed(String::new()),
        ClientError::TooManyChannels(0),
        ClientError::PermissionDenied(""),
        ClientError::PresenceDisabled,
        ClientError::DataTooBig(0),
        ClientError::InvalidData(rusty_socks::types::DataError::TooDeep(64)),
        ClientError::Unavailable(String::new()),
        ClientError::InvalidToken(rusty_socks::auth::AuthError::Expired),
        ClientError::AuthDisabled,
        ClientError::RateLimited(1),
        ClientError::ShuttingDown,
    ];
    for (name, text) in docs() {
        for err in &errors {
            assert!(
                text.contains(&format!("| `{}` |", err.code())),
                "{name} lacks {}",
                err.code()
            );
        }
    }
}

#[test]
fn every_close_code_is_documented() {
    let codes = CloseCode::ALL;
    for (name, text) in docs() {
        for code in codes {
            let row = format!("| {} | `{}` |", code.code(), code.reason());
            let row = if code.reason().is_empty() {
                format!("| {} | |", code.code())
            } else {
                row
            };
            assert!(text.contains(&row), "{name} lacks {row}");
        }
    }
}

#[test]
fn every_setting_is_in_the_readme() {
    let readme = &docs()[0].1;
    for setting in rusty_socks::settings::SETTINGS {
        let row = format!("| `{}` | `{}` |", setting.var, setting.default);
        assert!(readme.contains(&row), "README lacks {row}");
    }
}

#[test]
fn readme_states_how_flags_and_file_keys_follow_from_the_variables() {
    // Line breaks do not matter.
    let readme = docs()[0].1.split_whitespace().collect::<Vec<_>>().join(" ");
    let rule = "Each variable `RUSTY_SOCKS_FOO_BAR` is also the flag `--foo-bar` and the config file key `foo_bar`";
    assert!(readme.contains(rule), "README lacks the rule {rule:?}");
    for setting in rusty_socks::settings::SETTINGS {
        let key = setting
            .var
            .strip_prefix("RUSTY_SOCKS_")
            .unwrap()
            .to_lowercase();
        assert_eq!(setting.file_key(), key, "{}", setting.var);
        assert_eq!(setting.flag(), key.replace('_', "-"), "{}", setting.var);
    }
}
