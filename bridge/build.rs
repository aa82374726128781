//! Generates the protobuf payload types from proto/proto/market_data.proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/proto/market_data.proto";
    println!("cargo:rerun-if-changed={proto}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.compile_protos(&[proto], &["../proto/proto"])?;
    Ok(())
}
