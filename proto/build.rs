//! With the `protobuf` feature: generates the `tickwire.v1` messages from
//! `proto/market_data.proto` (the one place they are generated).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "protobuf")]
    {
        let proto = "proto/market_data.proto";
        println!("cargo:rerun-if-changed={proto}");
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
        config.compile_protos(&[proto], &["proto"])?;
    }
    Ok(())
}
