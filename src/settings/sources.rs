//! Every source of settings read into one [`Config`]: the defaults, a config file (TOML, YAML or
//! JSON), the `RUSTY_SOCKS_*` variables and the command-line flags, in that order of precedence.
//!
//! Each source is turned into text per variable (a file key is the variable without
//! `RUSTY_SOCKS_`, lowercased; its value, checked against the setting's [`Kind`], is written as
//! the variable would hold it) and the merged text goes through the one validation of
//! [`Config::from_lookup_all`]. So a file, a variable and a flag accept exactly the same values,
//! and an error is reported in the terms of the source it came from.
//!
//! [`load`] is the one entry point: startup, `check-config`, `print-config`, `gen-token` and a
//! reload call it, a reload with the same [`Sources`] again.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::table::{CONFIG_VAR, Kind, SETTINGS, Setting, unknown_variables};
use super::{Config, ConfigError};

/// Where a setting's value came from, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file.
    File,
    /// A `RUSTY_SOCKS_*` environment variable.
    Env,
    /// A command-line flag.
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::File => "file",
            Self::Env => "env",
            Self::Flag => "flag",
        })
    }
}

/// What to read settings from: kept by the caller so a reload reads the same file and flags.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config FILE`; when `None`, `RUSTY_SOCKS_CONFIG` names the file, if set.
    pub config_file: Option<PathBuf>,
    /// Values given as flags, by the setting's variable.
    pub flags: Vec<(&'static str, String)>,
    /// The environment variables.
    pub env: BTreeMap<String, String>,
}

impl Sources {
    /// The given file and flags, with the process environment as it is now.
    pub fn with_process_env(
        config_file: Option<PathBuf>,
        flags: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            config_file,
            flags,
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    /// The config file to read: `--config`, else a non-empty `RUSTY_SOCKS_CONFIG`.
    pub fn file(&self) -> Option<PathBuf> {
        self.config_file.clone().or_else(|| {
            self.env
                .get(CONFIG_VAR)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

/// One setting as it ended up: its text and where that came from.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The setting's row.
    pub setting: &'static Setting,
    /// The text in force (`None`: the default).
    pub value: Option<String>,
    /// Where it came from.
    pub origin: Origin,
}

/// The result of [`load`]: the validated settings and how they were arrived at.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings.
    pub config: Config,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    /// Every setting of the table, in its order, with its source.
    pub effective: Vec<Effective>,
    /// `RUSTY_SOCKS_*` variables that are not settings, each with the setting probably meant:
    /// warned about, not refused (as before the config file existed).
    pub unknown_variables: Vec<(String, Option<&'static str>)>,
}

/// Where in a config file: the path and, when found, the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAt {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the key, when it could be found.
    pub line: Option<usize>,
}

impl fmt::Display for FileAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        Ok(())
    }
}

/// A source that could not be read, or a setting that could not be honoured, named in the
/// terms of its source: the file and key (and line), the variable, or the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The config file could not be read.
    #[error("config file {}: cannot read it: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The config file's extension names no format.
    #[error(
        "config file {}: unknown extension; use .toml, .yaml, .yml or .json",
        path.display()
    )]
    Extension {
        /// The file.
        path: PathBuf,
    },
    /// The config file is not valid in its format.
    #[error("config file {}: not valid {format}: {reason}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// TOML, YAML or JSON.
        format: &'static str,
        /// The parser's message (with the line where it gives one).
        reason: String,
    },
    /// The config file is not a table of settings.
    #[error("config file {}: expected a table of settings at the top level", path.display())]
    NotATable {
        /// The file.
        path: PathBuf,
    },
    /// A key of the config file that is no setting.
    #[error("{at}: unknown key `{key}`{}", hint.as_ref().map(|h| format!("; did you mean `{h}`?")).unwrap_or_default())]
    UnknownKey {
        /// Where.
        at: FileAt,
        /// The key.
        key: String,
        /// The setting's key probably meant.
        hint: Option<String>,
    },
    /// A key of the config file holding the wrong type.
    #[error("{at}: `{key}` must be {expected}, not {found}")]
    WrongType {
        /// Where.
        at: FileAt,
        /// The key.
        key: String,
        /// The type it takes.
        expected: &'static str,
        /// The type it held.
        found: &'static str,
    },
    /// A value in the config file that is invalid.
    #[error("{at}: invalid `{key}` = {value:?}: expected {expected}")]
    FileValue {
        /// Where.
        at: FileAt,
        /// The key.
        key: String,
        /// The value, as text (`***` for secrets).
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// An environment variable that is invalid.
    #[error("{0}")]
    Env(ConfigError),
    /// A flag that is invalid.
    #[error("invalid --{flag} {value:?}: expected {expected}")]
    Flag {
        /// The flag, without dashes.
        flag: String,
        /// The value given.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
}

/// Reads every source into one validated [`Config`], reporting every error at once.
pub fn load(sources: &Sources) -> Result<Loaded, Vec<LoadError>> {
    let mut errors = Vec::new();
    let file = sources.file();
    let mut merged: BTreeMap<&'static str, (String, Origin)> = BTreeMap::new();
    let mut lines: BTreeMap<&'static str, (String, Option<usize>)> = BTreeMap::new();
    if let Some(path) = &file {
        match read_file(path) {
            Ok(found) => {
                for (setting, value, key, line) in found.values {
                    merged.insert(setting.var, (value, Origin::File));
                    lines.insert(setting.var, (key, line));
                }
                errors.extend(found.errors);
            }
            Err(err) => errors.push(err),
        }
    }
    for setting in SETTINGS {
        if let Some(value) = sources.env.get(setting.var) {
            merged.insert(setting.var, (value.clone(), Origin::Env));
        }
    }
    for (var, value) in &sources.flags {
        merged.insert(var, (value.clone(), Origin::Flag));
    }
    let config = Config::from_lookup_all(|var| merged.get(var).map(|(v, _)| v.clone()));
    let config = match config {
        Ok(config) if errors.is_empty() => config,
        Ok(_) => return Err(in_order(errors)),
        Err(invalid) => {
            errors.extend(invalid.into_iter().map(|err| {
                match (merged.get(err.var), &file) {
                    (Some((_, Origin::File)), Some(path)) => {
                        let (key, line) = lines.get(err.var).cloned().unwrap_or_default();
                        LoadError::FileValue {
                            at: FileAt {
                                path: path.clone(),
                                line,
                            },
                            key,
                            value: err.value,
                            expected: err.expected,
                        }
                    }
                    (Some((_, Origin::Flag)), _) => LoadError::Flag {
                        flag: Setting::find(err.var)
                            .map(Setting::flag)
                            .unwrap_or_default(),
                        value: err.value,
                        expected: err.expected,
                    },
                    _ => LoadError::Env(err),
                }
            }));
            return Err(in_order(errors));
        }
    };
    let effective = SETTINGS
        .iter()
        .map(|setting| match merged.get(setting.var) {
            Some((value, origin)) => Effective {
                setting,
                value: Some(value.clone()),
                origin: *origin,
            },
            None => Effective {
                setting,
                value: None,
                origin: Origin::Default,
            },
        })
        .collect();
    Ok(Loaded {
        config,
        file,
        effective,
        unknown_variables: unknown_variables(sources.env.keys().cloned()),
    })
}

/// Errors as a reader goes through them: the file's from top to bottom, then the variables'
/// and the flags'.
fn in_order(mut errors: Vec<LoadError>) -> Vec<LoadError> {
    errors.sort_by_key(|e| match e {
        LoadError::UnknownKey { at, .. }
        | LoadError::WrongType { at, .. }
        | LoadError::FileValue { at, .. } => (0, at.line.unwrap_or(0)),
        LoadError::Env(_) | LoadError::Flag { .. } => (1, 0),
        _ => (0, 0),
    });
    errors
}

/// A config file's settings as variable text, with the key and line of each, and the errors of
/// keys that are no setting or hold the wrong type.
struct FileValues {
    values: Vec<(&'static Setting, String, String, Option<usize>)>,
    errors: Vec<LoadError>,
}

/// The format a config file is written in, by its extension.
pub(super) fn format_of(path: &Path) -> Option<super::FileFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "toml" => Some(super::FileFormat::Toml),
        "yaml" | "yml" => Some(super::FileFormat::Yaml),
        "json" => Some(super::FileFormat::Json),
        _ => None,
    }
}

fn read_file(path: &Path) -> Result<FileValues, LoadError> {
    use super::FileFormat;
    let format = format_of(path).ok_or_else(|| LoadError::Extension {
        path: path.to_owned(),
    })?;
    let text = std::fs::read_to_string(path).map_err(|err| LoadError::Read {
        path: path.to_owned(),
        reason: err.to_string(),
    })?;
    let syntax = |format: &'static str, reason: String| LoadError::Syntax {
        path: path.to_owned(),
        format,
        reason: reason.trim().to_owned(),
    };
    let document: Value = match format {
        FileFormat::Toml => toml::from_str::<toml::Table>(&text)
            .map_err(|e| {
                // The error's own text quotes the offending line, and that line may hold a
                // secret (`jwt_secret = "abc` left open): say where, and what, but not that.
                let line = e.span().map(|span| {
                    let end = span.start.min(text.len());
                    text.as_bytes()[..end]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1
                });
                let message = e.message().trim();
                syntax(
                    "TOML",
                    match line {
                        Some(line) => format!("TOML parse error at line {line}: {message}"),
                        None => message.to_owned(),
                    },
                )
            })
            .and_then(|t| serde_json::to_value(t).map_err(|e| syntax("TOML", e.to_string())))?,
        FileFormat::Yaml => {
            serde_norway::from_str(&text).map_err(|e| syntax("YAML", e.to_string()))?
        }
        FileFormat::Json => {
            serde_json::from_str(&text).map_err(|e| syntax("JSON", e.to_string()))?
        }
    };
    let table = match document {
        Value::Object(table) => table,
        // An empty YAML file is `null`: no settings.
        Value::Null => serde_json::Map::new(),
        _ => {
            return Err(LoadError::NotATable {
                path: path.to_owned(),
            });
        }
    };
    let mut found = FileValues {
        values: Vec::new(),
        errors: Vec::new(),
    };
    for (key, value) in table {
        let at = FileAt {
            path: path.to_owned(),
            line: line_of(&text, &key),
        };
        let Some(setting) = SETTINGS.iter().find(|s| s.file_key() == key) else {
            let hint =
                unknown_variables([format!("{}{}", super::PREFIX, key.to_ascii_uppercase())])
                    .into_iter()
                    .find_map(|(_, closest)| closest)
                    .and_then(Setting::find)
                    .map(Setting::file_key);
            found.errors.push(LoadError::UnknownKey { at, key, hint });
            continue;
        };
        match as_text(setting.kind, &value) {
            Ok(None) => {}
            Ok(Some(text)) => found.values.push((setting, text, key, at.line)),
            Err(expected) => found.errors.push(LoadError::WrongType {
                at,
                key,
                expected,
                found: type_name(&value),
            }),
        }
    }
    Ok(found)
}

/// A file value as the variable would hold it; `None` for null (as if absent); the expected
/// type when it has the wrong one.
fn as_text(kind: Kind, value: &Value) -> Result<Option<String>, &'static str> {
    let expected = match kind {
        Kind::Int => "a whole number",
        Kind::Bool => "true or false",
        Kind::Text | Kind::Secret => "a string",
        Kind::List => "a list of strings",
        Kind::Map => "a table",
    };
    match (kind, value) {
        (_, Value::Null) => Ok(None),
        (Kind::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        (Kind::Bool, Value::Bool(b)) => Ok(Some(b.to_string())),
        (Kind::Text | Kind::Secret, Value::String(s)) => Ok(Some(s.clone())),
        (Kind::List, Value::String(s)) => Ok(Some(s.clone())),
        (Kind::List, Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or(expected))
            .collect::<Result<Vec<_>, _>>()
            .map(|items| Some(items.join(","))),
        (Kind::Map, Value::Object(_)) => Ok(Some(value.to_string())),
        _ => Err(expected),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

/// The 1-based line where top-level `key` is set: `key =` (TOML), `key:` (YAML), `"key":`
/// (JSON), or a `[key]` / `[key.x]` table header. The parsers do not keep positions once a
/// document is turned into values, and a key is a plain word, so finding it is enough.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let t = line.trim_start();
            let rest = [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
                .iter()
                .find_map(|k| t.strip_prefix(k.as_str()).map(str::trim_start));
            if let Some(rest) = rest {
                return rest.starts_with('=') || rest.starts_with(':');
            }
            t.strip_prefix('[')
                .and_then(|t| t.trim_start().strip_prefix(key))
                .is_some_and(|rest| rest.starts_with(']') || rest.starts_with('.'))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(
        file: Option<PathBuf>,
        env: &[(&str, &str)],
        flags: &[(&'static str, &str)],
    ) -> Sources {
        Sources {
            config_file: file,
            flags: flags.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rusty_socks_sources_{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn later_sources_win_and_each_value_keeps_its_origin() {
        let file = temp("precedence.toml", "port = 1\nbuffer = 2\nmax_conn = 3\n");
        let s = sources(
            Some(file.clone()),
            &[("RUSTY_SOCKS_PORT", "11"), ("RUSTY_SOCKS_BUFFER", "12")],
            &[("RUSTY_SOCKS_PORT", "21")],
        );
        let loaded = load(&s).expect("valid");
        assert_eq!(
            (
                loaded.config.port,
                loaded.config.buffer,
                loaded.config.max_connections
            ),
            (21, 12, 3)
        );
        let origin = |var: &str| {
            loaded
                .effective
                .iter()
                .find(|e| e.setting.var == var)
                .map(|e| e.origin)
        };
        assert_eq!(origin("RUSTY_SOCKS_PORT"), Some(Origin::Flag));
        assert_eq!(origin("RUSTY_SOCKS_BUFFER"), Some(Origin::Env));
        assert_eq!(origin("RUSTY_SOCKS_MAX_CONN"), Some(Origin::File));
        assert_eq!(origin("RUSTY_SOCKS_TIMEOUT"), Some(Origin::Default));
        assert_eq!(loaded.file, Some(file));
        // A reload calls load again with the same sources and gets the same settings.
        assert_eq!(load(&s).expect("valid").config, loaded.config);
    }

    #[test]
    fn every_error_of_every_source_is_reported_in_its_terms() {
        let file = temp("errors.yaml", "port: 70000\nbogus: 1\ndemo: 3\n");
        let s = sources(
            Some(file.clone()),
            &[("RUSTY_SOCKS_MAX_CONN", "0"), ("RUSTY_SOCKS_PING", "90")],
            &[("RUSTY_SOCKS_BUFFER", "x")],
        );
        let errors = load(&s).expect_err("invalid");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let at = |line| FileAt {
            path: file.clone(),
            line: Some(line),
        };
        assert!(errors.contains(&LoadError::UnknownKey {
            at: at(2),
            key: "bogus".into(),
            hint: None
        }));
        assert!(
            errors
                .iter()
                .any(|e| matches!(e, LoadError::WrongType { key, .. } if key == "demo"))
        );
        assert!(errors.iter().any(
            |e| matches!(e, LoadError::FileValue { key, at: a, .. } if key == "port" && *a == at(1))
        ));
        assert!(
            errors
                .iter()
                .any(|e| matches!(e, LoadError::Flag { flag, .. } if flag == "buffer"))
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("invalid RUSTY_SOCKS_MAX_CONN=\"0\"")),
            "{text:?}"
        );
        // Checked across settings once each is valid on its own: PING 90 >= TIMEOUT 60.
        assert!(
            text.iter().any(|t| t.contains("RUSTY_SOCKS_PING")),
            "{text:?}"
        );
        assert_eq!(errors.len(), 6, "{text:?}");
    }

    #[test]
    fn the_variable_names_the_file_and_the_flag_overrides_it() {
        let env_file = temp("from_env.json", "{\"port\": 5}");
        let flag_file = temp("from_flag.json", "{\"port\": 6}");
        let env = [(CONFIG_VAR, env_file.to_str().expect("utf-8"))];
        let by_env = load(&sources(None, &env, &[])).expect("valid");
        assert_eq!(by_env.config.port, 5);
        assert!(
            by_env.unknown_variables.is_empty(),
            "{:?}",
            by_env.unknown_variables
        );
        let by_flag = load(&sources(Some(flag_file), &env, &[])).expect("valid");
        assert_eq!(by_flag.config.port, 6);
    }

    #[test]
    fn keys_are_found_on_their_line_in_every_format() {
        assert_eq!(line_of("# c\nport = 1\n", "port"), Some(2));
        assert_eq!(line_of("a: 1\nport: 2\n", "port"), Some(2));
        assert_eq!(line_of("{\n  \"port\": 2\n}", "port"), Some(2));
        assert_eq!(line_of("x = 1\n[namespaces.chat]\n", "namespaces"), Some(2));
        assert_eq!(line_of("ports = 1\n", "port"), None);
    }

    #[test]
    fn file_values_become_the_text_a_variable_holds() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
        assert_eq!(as_text(Kind::Int, &v("8")), Ok(Some("8".into())));
        assert_eq!(as_text(Kind::Int, &v("\"8\"")), Err("a whole number"));
        assert_eq!(as_text(Kind::Int, &v("8.5")), Err("a whole number"));
        assert_eq!(as_text(Kind::Bool, &v("true")), Ok(Some("true".into())));
        assert_eq!(
            as_text(Kind::List, &v("[\"a\",\"b\"]")),
            Ok(Some("a,b".into()))
        );
        assert_eq!(as_text(Kind::List, &v("[1]")), Err("a list of strings"));
        assert_eq!(
            as_text(Kind::Map, &v("{\"chat\":{}}")),
            Ok(Some("{\"chat\":{}}".into()))
        );
        assert_eq!(as_text(Kind::Map, &v("\"{}\"")), Err("a table"));
        assert_eq!(as_text(Kind::Text, &v("null")), Ok(None));
    }
}
