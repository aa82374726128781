//! A patched symbology file opened by a reader and by the writer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickwire_proto::fuzzing::symbology_file(data));
