//! Manifest bytes through the reader, validation and both renderers (kproxy::fuzzing::manifest).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kproxy::fuzzing::manifest(data));
