//! The shape of `src/`, checked from the code's own `crate::` paths: the top-level modules form
//! layers, each may use only the layers below it, nothing but the settings reads the process
//! environment, and no file grows past 800 lines. docs/ARCHITECTURE.md draws the same layers;
//! change both together.
//!
//! Code in `#[cfg(test)]` modules (and files declared only for tests) is exempt: a test may
//! reach across layers to set a scene.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module of `src/`, lowest layer first. A module may use modules of lower
/// layers only; modules on the same layer do not know each other.
const LAYERS: &[(&str, u8, &str)] = &[
    (
        "types",
        0,
        "plain shared types: ids, positions, channel names, client errors",
    ),
    ("ws", 1, "RFC 6455: handshake, frames, reader, close codes"),
    ("protocol", 1, "the JSON dialects: legacy and v1 frames"),
    ("auth", 1, "connection tokens (JWT) and identities"),
    (
        "broker",
        2,
        "channels and publications across nodes: memory, Redis, NATS",
    ),
    (
        "engine",
        3,
        "hub, node, sessions, outboxes: ties the layers below together",
    ),
    (
        "settings",
        4,
        "reads and validates every setting; builds typed options",
    ),
    (
        "server",
        5,
        "accept loop, HTTP, upgrade, admission, TLS, API, metrics, demo",
    ),
    (
        "cli",
        6,
        "the binary's command line: subcommands, a flag per setting (a module of main.rs)",
    ),
    (
        "allocator",
        6,
        "the binary's global allocator: mimalloc, exact task blocks (a module of main.rs)",
    ),
];

/// The one file that may allow `unsafe_code` (denied crate-wide in Cargo.toml): a global
/// allocator cannot be written without it.
const ALLOWS_UNSAFE: &str = "allocator.rs";

/// Longest file allowed in `src/`, in lines.
const MAX_LINES: usize = 800;

/// Modules that may read the process environment.
const READS_ENV: &[&str] = &["settings"];

fn src_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            src_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for the crate root and the binary).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_owned()),
    }
}

/// Source text with comments, string and char literals blanked out (so braces and paths in
/// them do not count), keeping line breaks.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[u8]| {
        for &b in s {
            out.push(if b == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(rest.len(), |p| p + 4);
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'r' && (rest.starts_with(b"r\"") || rest.starts_with(b"r#")) {
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            let end = text[i + body..]
                .find(&close)
                .map_or(rest.len(), |p| body + p + close.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('{', '\n', '\'') or a lifetime ('a): only the former is blanked.
            let end = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&b| b == b'\'').map(|p| p + 3)
            } else if rest.get(2) == Some(&b'\'') {
                Some(3)
            } else {
                None
            };
            match end {
                Some(end) => {
                    blank(&mut out, &rest[..end]);
                    i += end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(rest[0] as char);
            i += 1;
        }
    }
    out
}

/// Words an item can start with (after its attributes).
const ITEM_KEYWORDS: &[&str] = &[
    "mod",
    "fn",
    "impl",
    "use",
    "const",
    "static",
    "struct",
    "enum",
    "trait",
    "type",
    "pub",
    "async",
    "unsafe",
    "macro_rules",
];

/// `text` after any leading attributes (`#[...]`) and whitespace.
fn skip_attributes(mut text: &str) -> &str {
    while let Some(attr) = text.strip_prefix("#[") {
        let mut depth = 1usize;
        let mut end = attr.len();
        for (k, ch) in attr.char_indices() {
            match ch {
                '[' => depth += 1,
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        text = attr[end..].trim_start();
    }
    text
}

/// Removes every `#[cfg(test)]` item (a `mod x { ... }`, a `fn`, an `impl`...) and returns
/// the rest, with the names of `#[cfg(test)] mod x;` files it declares.
fn without_test_code(code: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut test_files = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        // Only a whole item is exempt; on a field, variant or match arm the attribute is
        // dropped and the code around it still counts.
        let first_word: String = skip_attributes(trimmed)
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !ITEM_KEYWORDS.contains(&first_word.as_str()) {
            rest = after;
            continue;
        }
        // `mod name;`: a file of its own, used only by tests.
        if let Some(decl) = trimmed.strip_prefix("mod ")
            && let Some(semi) = decl.find(';')
            && !decl[..semi].contains('{')
        {
            test_files.push(decl[..semi].trim().to_owned());
            let skip = after.len() - trimmed.len() + 4 + semi + 1;
            rest = &after[skip..];
            continue;
        }
        // An item with a body: skip to its matching closing brace (or `;` before any brace).
        let open = after.find('{');
        let semi = after.find(';');
        let end = match (open, semi) {
            (Some(o), Some(s)) if s < o => s + 1,
            (Some(o), _) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, ch) in after[o..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = o + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => s + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    (out, test_files)
}

/// The top-level modules named by `crate::` (or `$crate::`) paths in `code`, grouped
/// `use crate::{a, b::c}` included, and by `super::` chains that climb to the crate root from a
/// file `depth` modules deep (`src/a.rs` and `src/a/mod.rs` are 1 deep, `src/a/b.rs` 2).
/// `crate as` (an alias the checker could not follow) is reported as the dependency `crate`.
fn crate_deps(code: &str, depth: usize) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    if code.contains("crate as") {
        deps.insert("crate".to_owned());
    }
    let mut at = 0;
    while let Some(found) = code[at..].find("super::") {
        let start = at + found;
        at = start + "super::".len();
        if start > 0 {
            let before = code.as_bytes()[start - 1];
            if before.is_ascii_alphanumeric() || before == b'_' || before == b':' {
                continue;
            }
        }
        let mut climbs = 1;
        while code[at..].starts_with("super::") {
            climbs += 1;
            at += "super::".len();
        }
        if climbs >= depth {
            // Past the crate root: read what follows as if it came after `crate::`.
            let rest = format!("crate::{}", first_path(&code[at..]));
            deps.extend(crate_deps(&rest, 0));
        }
    }
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        if at > 0 {
            let before = code.as_bytes()[at - 1];
            if before.is_ascii_alphanumeric() || before == b'_' {
                continue;
            }
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group's top level on commas; each part starts with a module name.
            let mut depth = 0usize;
            let mut start = 0;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        deps.insert(ident(&group[start..k]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        deps.insert(ident(&group[start..k]));
                        start = k + 1;
                    }
                    _ => {}
                }
            }
        } else {
            deps.insert(ident(rest));
        }
    }
    deps.retain(|d| !d.is_empty());
    deps
}

/// The path (or `{...}` group) at the start of `text`.
fn first_path(text: &str) -> &str {
    if text.starts_with('{') {
        let mut depth = 0usize;
        for (k, ch) in text.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return &text[..=k];
                    }
                }
                _ => {}
            }
        }
        text
    } else {
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(text.len());
        &text[..end]
    }
}

/// Whether `code` reads the process environment: `std::env`, or `env` imported from a
/// `use std::{...}` group.
fn reads_env(code: &str) -> bool {
    if code.contains("std::env") || code.contains("env::var") {
        return true;
    }
    code.match_indices("std::{").any(|(at, _)| {
        let group = first_path(&code[at + "std::".len()..]);
        group
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|word| word == "env")
    })
}

/// How many modules deep a file is: `src/a.rs` and `src/a/mod.rs` are 1, `src/a/b.rs` 2.
fn depth(src: &Path, file: &Path) -> usize {
    let rel = file.strip_prefix(src).unwrap();
    let parts = rel.components().count();
    if file.file_name().is_some_and(|n| n == "mod.rs") {
        parts - 1
    } else {
        parts
    }
}

struct Module {
    deps: BTreeMap<String, BTreeSet<String>>,
    reads_env: BTreeSet<String>,
}

/// Every top-level module's dependencies, by the file that has them.
fn scan() -> (BTreeMap<String, Module>, Vec<(String, usize)>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    src_files(&src, &mut files);
    files.sort();
    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    let mut cleaned = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let (code, test_mods) = without_test_code(&code_only(&text));
        let dir = if file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
        {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for name in test_mods {
            test_only.insert(dir.join(format!("{name}.rs")));
            test_only.insert(dir.join(&name).join("mod.rs"));
        }
        cleaned.push((file.clone(), text.lines().count(), code));
    }
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut long = Vec::new();
    for (file, lines, code) in cleaned {
        let rel = file.strip_prefix(&src).unwrap().display().to_string();
        if lines > MAX_LINES {
            long.push((rel.clone(), lines));
        }
        if test_only.contains(&file) {
            continue;
        }
        let Some(top) = top_module(&src, &file) else {
            continue;
        };
        let module = modules.entry(top.clone()).or_insert_with(|| Module {
            deps: BTreeMap::new(),
            reads_env: BTreeSet::new(),
        });
        for dep in crate_deps(&code, depth(&src, &file)) {
            if dep != top {
                module.deps.entry(dep).or_default().insert(rel.clone());
            }
        }
        if reads_env(&code) {
            module.reads_env.insert(rel);
        }
    }
    (modules, long)
}

fn layer_of(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(name, _, _)| *name == module)
        .map(|(_, layer, _)| *layer)
}

#[test]
fn every_top_level_module_uses_only_the_layers_below_it() {
    let (modules, _) = scan();
    let mut broken = Vec::new();
    for (module, found) in &modules {
        let Some(layer) = layer_of(module) else {
            broken.push(format!(
                "src/{module} is in no layer: add it to LAYERS here and to docs/ARCHITECTURE.md"
            ));
            continue;
        };
        for (dep, files) in &found.deps {
            match layer_of(dep) {
                Some(below) if below < layer => {}
                _ => broken.push(format!(
                    "{module} (layer {layer}) uses {dep} (layer {:?}) in {files:?}",
                    layer_of(dep)
                )),
            }
        }
    }
    assert!(
        broken.is_empty(),
        "layer rules broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn only_the_settings_read_the_environment() {
    let (modules, _) = scan();
    let readers: Vec<_> = modules
        .iter()
        .filter(|(name, m)| !READS_ENV.contains(&name.as_str()) && !m.reads_env.is_empty())
        .map(|(name, m)| format!("{name}: {:?}", m.reads_env))
        .collect();
    assert!(
        readers.is_empty(),
        "read the environment outside the settings: {readers:?}"
    );
}

/// Whether code has a lint attribute that lets `unsafe_code` through where Cargo.toml denies
/// it: `allow`, `expect` or `warn`, alone or in a list (`#[allow(dead_code, unsafe_code)]`).
fn relaxes_unsafe_code(code: &str) -> bool {
    let mut rest = code;
    while let Some(at) = rest.find("unsafe_code") {
        // The attribute's opening parenthesis and the lint level before it.
        let before = &rest[..at];
        if let Some(open) = before.rfind('(') {
            let inside = &before[open + 1..];
            let level = before[..open].trim_end();
            let relaxing = ["allow", "expect", "warn"]
                .iter()
                .any(|l| level.ends_with(l));
            if relaxing && !inside.contains(')') {
                return true;
            }
        }
        rest = &rest[at + "unsafe_code".len()..];
    }
    false
}

#[test]
fn the_unsafe_code_check_sees_lists_and_every_relaxing_level() {
    assert!(relaxes_unsafe_code("#![allow(unsafe_code)]"));
    assert!(relaxes_unsafe_code("#[allow(dead_code, unsafe_code)]"));
    assert!(relaxes_unsafe_code("#[expect( unsafe_code )]"));
    assert!(relaxes_unsafe_code("#![warn(unsafe_code)]"));
    assert!(!relaxes_unsafe_code("#![deny(unsafe_code)]"));
    assert!(!relaxes_unsafe_code(
        "#[allow(dead_code)] fn f() {} // unsafe_code"
    ));
    assert!(!relaxes_unsafe_code(
        "#[allow(dead_code)] fn unsafe_code() {}"
    ));
}

#[test]
fn only_the_allocator_allows_unsafe_code() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    src_files(&src, &mut files);
    let allowing: Vec<String> = files
        .iter()
        .filter(|f| {
            let code = code_only(&std::fs::read_to_string(f).unwrap());
            relaxes_unsafe_code(&code)
        })
        .map(|f| f.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert_eq!(allowing, [ALLOWS_UNSAFE], "files that allow unsafe code");
}

#[test]
fn no_source_file_passes_800_lines() {
    let (_, long) = scan();
    assert!(long.is_empty(), "split these files: {long:?}");
}

#[test]
fn the_checker_sees_grouped_paths_and_skips_tests_strings_and_comments() {
    let code = code_only(
        r##"
use crate::{alpha::A, beta::{B, C}};
use crate::gamma;
// crate::commented
let s = "crate::quoted {";
let r = r#"crate::raw"#;
let c = '{';
fn f<'a>(x: &'a str) { crate::delta::f(); }
#[cfg(test)]
mod tests {
    use crate::epsilon;
    fn g() { let _ = "}"; }
}
#[cfg(test)]
mod helpers;
"##,
    );
    let (code, test_files) = without_test_code(&code);
    let deps: Vec<_> = crate_deps(&code, 1).into_iter().collect();
    assert_eq!(deps, ["alpha", "beta", "delta", "gamma"]);
    assert_eq!(test_files, ["helpers"]);
}

#[test]
fn the_checker_sees_super_chains_aliases_and_test_attributes_on_fields() {
    // From src/engine/mod.rs (1 deep) `super::` is the crate root; from src/engine/x.rs
    // (2 deep) it takes two.
    let deps = |code: &str, depth| -> Vec<String> {
        let (code, _) = without_test_code(&code_only(code));
        crate_deps(&code, depth).into_iter().collect()
    };
    assert_eq!(deps("use super::server::AppState;", 1), ["server"]);
    assert_eq!(deps("use super::outbox::Outbox;", 2), Vec::<String>::new());
    assert_eq!(
        deps("use super::super::{server, ws::frame};", 2),
        ["server", "ws"]
    );
    assert_eq!(deps("$crate::server::run()", 1), ["server"]);
    assert_eq!(deps("use crate as root;", 1), ["crate"]);
    // A test-only field does not hide the code after it.
    assert_eq!(
        deps(
            "struct S { #[cfg(test)] probe: u8 } impl S { fn f() { crate::engine::x() } }",
            1
        ),
        ["engine"]
    );
    assert!(reads_env("use std::{env as e, io};"));
    assert!(!reads_env("use std::{io, environment_free};"));
}

#[test]
fn the_layers_table_matches_the_architecture_document() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md"))
            .unwrap();
    for (name, layer, _) in LAYERS {
        let row = format!("| {layer} | `{name}` |");
        assert!(doc.contains(&row), "docs/ARCHITECTURE.md lacks {row}");
    }
}
