#![no_main]
//! libFuzzer entry point; the target itself is `rusty_socks_fuzz::targets::data`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rusty_socks_fuzz::targets::data(data));
