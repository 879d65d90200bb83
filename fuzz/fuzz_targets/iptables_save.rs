//! iptables-save output through the --live reader, checked to read back (kproxy::fuzzing::iptables_save).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kproxy::fuzzing::iptables_save(data));
