//! With the `protobuf` feature: generates the `tickwire.v1` messages from
//! `proto/market_data.proto` (the one place they are generated). With
//! `grpc`, also the services of `proto/market_data_service.proto` (tonic
//! clients and servers), the descriptor set server reflection serves, and
//! the `MarketDataStream` server whose stream carries pre-encoded batches
//! (its codec copies bytes the dispatcher encoded once).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "protobuf")]
    {
        let protos = [
            "proto/market_data.proto",
            #[cfg(feature = "grpc")]
            "proto/market_data_service.proto",
        ];
        for p in &protos {
            println!("cargo:rerun-if-changed={p}");
        }
        let mut config = prost_build::Config::new();
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
        #[cfg(not(feature = "grpc"))]
        config.compile_protos(&protos, &["proto"])?;
        #[cfg(feature = "grpc")]
        {
            let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
            tonic_prost_build::configure()
                .file_descriptor_set_path(out.join("tickwire_descriptor.bin"))
                .compile_with_config(config, &protos, &["proto"])?;
            raw_stream_server();
        }
    }
    Ok(())
}

/// `MarketDataStream` with its streaming method's responses written as
/// bytes: a client decodes an ordinary `StreamResponse`.
#[cfg(feature = "grpc")]
fn raw_stream_server() {
    use tonic_build::manual::{Builder, Method, Service};
    let prost = "tonic_prost::ProstCodec";
    let service = Service::builder()
        .name("MarketDataStream")
        .package("tickwire.v1")
        .method(
            Method::builder()
                .name("stream_market_data")
                .route_name("StreamMarketData")
                .input_type("crate::pb::StreamRequest")
                .output_type("crate::grpc::Encoded")
                .codec_path("crate::grpc::EncodedCodec")
                .server_streaming()
                .build(),
        )
        .method(
            Method::builder()
                .name("stream_historical_data")
                .route_name("StreamHistoricalData")
                .input_type("crate::pb::HistoricalRequest")
                .output_type("crate::grpc::Encoded")
                .codec_path("crate::grpc::EncodedCodec")
                .server_streaming()
                .build(),
        )
        .method(
            Method::builder()
                .name("consume_market_data")
                .route_name("ConsumeMarketData")
                .input_type("crate::pb::ConsumeRequest")
                .output_type("crate::grpc::Encoded")
                .codec_path("crate::grpc::EncodedCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(
            Method::builder()
                .name("manage_subscription")
                .route_name("ManageSubscription")
                .input_type("crate::pb::SubscriptionRequest")
                .output_type("crate::pb::SubscriptionResponse")
                .codec_path(prost)
                .build(),
        )
        .build();
    Builder::new().build_client(false).compile(&[service]);
}
