//! Settings written out for people: a commented config file with every setting at its default
//! (`gen-config`), and the settings in force with where each came from (`print-config`).

use std::fmt::Write as _;

use serde_json::Value;

use super::sources::{Loaded, Origin};
use super::table::{Kind, SETTINGS, Setting};

/// A config file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// TOML (`.toml`).
    Toml,
    /// YAML (`.yaml`, `.yml`).
    Yaml,
    /// JSON (`.json`): no comments; `null` is an unset setting.
    Json,
}

impl FileFormat {
    /// The format named `name` (`toml`, `yaml`, `yml` or `json`).
    pub fn parse(name: &str) -> Option<Self> {
        super::sources::format_of(std::path::Path::new(&format!("x.{name}")))
    }
}

/// A setting's default as a config file holds it; `None` for a setting unset by default.
fn default_value(setting: &Setting) -> Option<Value> {
    let d = setting.default;
    match setting.kind {
        _ if d.starts_with('(') && setting.kind != Kind::List => None,
        Kind::Int => d.parse::<u64>().ok().map(Value::from),
        Kind::Bool => d.parse::<bool>().ok().map(Value::from),
        Kind::Text | Kind::Secret => Some(Value::from(d)),
        Kind::List if d.starts_with('(') => Some(Value::Array(Vec::new())),
        Kind::List => Some(Value::Array(
            d.split(',').map(|s| Value::from(s.trim())).collect(),
        )),
        Kind::Map => serde_json::from_str(d).ok(),
    }
}

/// A config file with every setting at its default, each under a comment with its meaning,
/// variable and flag (JSON has no comments). Settings unset by default are commented out
/// (`null` in JSON).
/// `check-config` accepts it as it is (tested for every format).
pub fn gen_config(format: FileFormat) -> String {
    let mut out = String::new();
    if format == FileFormat::Json {
        // No comments in JSON: a setting unset by default is there as `null` (read as unset).
        let map: serde_json::Map<String, Value> = SETTINGS
            .iter()
            .map(|s| (s.file_key(), default_value(s).unwrap_or(Value::Null)))
            .collect();
        let mut text = serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default();
        text.push('\n');
        return text;
    }
    let _ = writeln!(
        out,
        "# rusty_socks settings, every one at its default (rusty_socks gen-config).\n\
         # Precedence: defaults < this file < RUSTY_SOCKS_* variables < flags.\n"
    );
    // TOML tables must follow the plain keys.
    let ordered = SETTINGS
        .iter()
        .filter(|s| s.kind != Kind::Map)
        .chain(SETTINGS.iter().filter(|s| s.kind == Kind::Map));
    for setting in ordered {
        let key = setting.file_key();
        let _ = writeln!(
            out,
            "# {} ({}, --{})",
            setting.meaning,
            setting.var,
            setting.flag()
        );
        let (value, commented) = match default_value(setting) {
            Some(value) => (value, false),
            None => (Value::from(""), true),
        };
        let mut one = serde_json::Map::new();
        one.insert(key, value);
        let text = match format {
            FileFormat::Toml => toml::to_string(&one).unwrap_or_default(),
            _ => serde_norway::to_string(&one).unwrap_or_default(),
        };
        for line in text.lines() {
            let _ = writeln!(out, "{}{line}", if commented { "# " } else { "" });
        }
        out.push('\n');
    }
    out
}

impl Loaded {
    /// The settings in force, one a line: file key, value and where it came from, secrets
    /// and broker passwords shown as `***`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let file = self
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none)".into());
        let _ = writeln!(out, "# config file: {file}");
        let _ = writeln!(out, "# {:<28} {:<30} source", "key", "value");
        for e in &self.effective {
            let value = match (&e.value, e.setting.kind) {
                (None, _) => e.setting.default.to_owned(),
                (Some(v), Kind::Secret) if !v.is_empty() => "***".to_owned(),
                (Some(v), _) if e.setting.var == "RUSTY_SOCKS_BROKER" => crate::broker::redact(v),
                (Some(v), _) => v.clone(),
            };
            let source = match e.origin {
                Origin::Default => "default".to_owned(),
                Origin::File => format!("file ({file})"),
                Origin::Env => format!("env ({})", e.setting.var),
                Origin::Flag => format!("flag (--{})", e.setting.flag()),
            };
            let _ = writeln!(out, "{:<30} {value:<30} {source}", e.setting.file_key());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_default_a_file_can_hold() {
        for setting in SETTINGS {
            if !setting.default.starts_with('(') {
                assert!(default_value(setting).is_some(), "{}", setting.var);
            }
        }
    }
}
