//! Live streams: gRPC and WebSocket writers over the dispatcher's queues.

pub mod grpc;
pub mod ws;
