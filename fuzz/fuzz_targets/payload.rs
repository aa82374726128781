//! Any bytes as a JSON and as a protobuf Pulsar payload.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickwire_bridge::payload::parse_both_formats(data));
