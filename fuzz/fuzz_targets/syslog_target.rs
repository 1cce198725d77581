#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| netwatch::fuzzing::syslog_target(bytes));
