//! nft -j listings through the --live reader, checked to read back (kproxy::fuzzing::nft_json).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kproxy::fuzzing::nft_json(data));
