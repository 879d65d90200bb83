//! Structured Services and EndpointSlices through validation, conflict resolution and both
//! renderers (kproxy::fuzzing::validation).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kproxy::fuzzing::validation(data));
