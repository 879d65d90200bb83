//! Rule text through the tracer's reader, read twice (kproxy::fuzzing::iptables_rules).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kproxy::fuzzing::iptables_rules(data));
