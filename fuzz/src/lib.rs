//! Fuzz targets for the Rusty Socks parsers.
//!
//! The targets live in [`targets`], a file the server's own test suite also compiles
//! (`tests/fuzz_corpus_test.rs`) to replay every committed corpus and regression input on
//! each `cargo test`; the binaries in `fuzz_targets/` only hand libFuzzer's input to them.

pub mod targets;
