//! tickwire's shared formats: what every other crate agrees on.
//!
//! - [`frame`]: the 64-byte slot and the rkyv-defined 56-byte frame body.
//! - [`layout`]: the ring file's header, reader slots and slot array.
//! - [`ring`]: the one-writer, many-reader protocol over a ring (seqlock
//!   reads, tethered readers, gating, waking), model-checked with loom.
//! - [`file`]: creating, validating and mapping ring files; the locks.
//! - [`symbology`]: instrument ids shared by writer and readers.
//! - [`journal`]: the on-disk journal's frames and segments, and reading them.
//!
//! Nothing here allocates or makes a syscall on the per-event path.

pub mod frame;
pub mod futex;
pub mod group;
pub mod layout;
pub mod ring;
pub mod shm;
pub(crate) mod sync;

#[cfg(not(loom))]
pub mod bars;
#[cfg(not(loom))]
pub mod error;
#[cfg(not(loom))]
pub mod file;
#[cfg(all(feature = "fuzzing", not(loom)))]
pub mod fuzzing;
#[cfg(not(loom))]
pub mod journal;
#[cfg(all(feature = "json", not(loom)))]
pub mod json;
#[cfg(not(loom))]
pub mod symbology;

/// The `tickwire.v1` protobuf messages from `proto/market_data.proto`
/// (feature `protobuf`): generated here once, for every crate that speaks
/// protobuf.
#[cfg(feature = "protobuf")]
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tickwire.v1.rs"));

    /// The `MarketDataStream` server whose stream sends pre-encoded batches
    /// ([`crate::grpc::Encoded`]); clients use [`market_data_stream_client`].
    #[cfg(feature = "grpc")]
    pub mod raw {
        include!(concat!(env!("OUT_DIR"), "/tickwire.v1.MarketDataStream.rs"));
    }

    /// The encoded `FileDescriptorSet` of the `tickwire.v1` files, for
    /// server reflection.
    #[cfg(feature = "grpc")]
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tickwire_descriptor.bin"));
}

#[cfg(all(feature = "grpc", not(loom)))]
pub mod grpc;

#[cfg(not(loom))]
pub use error::{Error, Result};
pub use frame::{ArchivedFrameBody, FrameBody, Kind};
