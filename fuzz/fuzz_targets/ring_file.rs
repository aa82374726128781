//! A patched ring file opened by a reader and by a restarted writer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickwire_proto::fuzzing::ring_file(data));
