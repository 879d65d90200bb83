//! Rule text through the tracer's reader, read twice (kproxy::fuzzing::nft_rules).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kproxy::fuzzing::nft_rules(data));
