#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| netwatch::fuzzing::ring_buffer_item(bytes));
