//! Every committed fuzz input (`fuzz/corpus/TARGET/`: seeds and what fuzzing found worth
//! keeping; `fuzz/regressions/TARGET/`: inputs that once failed) run through its fuzz target
//! on every `cargo test`, so a parser change that breaks one fails here, without libFuzzer.
//! The targets are the same code `fuzz/run.sh` fuzzes (`fuzz/src/targets.rs`).
#![allow(clippy::unwrap_used)]

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn inputs(kind: &str, target: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn replay(kind: &str) -> usize {
    let mut replayed = 0;
    for (name, target) in targets::TARGETS {
        for path in inputs(kind, name) {
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("{name} fails on {}", path.display());
            }
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn every_target_has_a_seed_corpus_and_passes_it() {
    for (name, _) in targets::TARGETS {
        assert!(
            !inputs("corpus", name).is_empty(),
            "fuzz/corpus/{name}/ is empty"
        );
    }
    assert!(replay("corpus") > 0);
}

#[test]
fn inputs_fuzzing_once_failed_on_pass_now() {
    assert!(replay("regressions") > 0, "fuzz/regressions/ is empty");
}
