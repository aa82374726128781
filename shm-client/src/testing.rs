//! A small writer for a topic's rings, for tests, examples and tools that
//! need data without a broker (feature `testing`). It runs the real writer protocol over real
//! ring files; the broker's shards use the same [`PartitionWriter`].

use std::path::Path;

use tickwire_proto::file::{PartitionWriter, RingParams};
use tickwire_proto::frame::{FrameBody, SLOT_SIZE, price_from_f64};
use tickwire_proto::symbology::{Instrument, SymbologyWriter};

/// Writes a topic's partitions and the node's symbology.
pub struct TopicWriter {
    partitions: Vec<PartitionWriter>,
    symbology: SymbologyWriter,
    source_seq: u64,
}

impl TopicWriter {
    /// Creates (or re-opens) `partitions` rings of `capacity` slots in `dir`.
    ///
    /// # Errors
    /// As [`PartitionWriter::open`] and [`SymbologyWriter::open`].
    pub fn create(
        dir: &Path,
        topic: &str,
        partitions: u32,
        capacity: u64,
    ) -> tickwire_proto::Result<TopicWriter> {
        let symbology = SymbologyWriter::open(dir, 4096)?;
        let partitions = (0..partitions)
            .map(|partition| {
                PartitionWriter::open(
                    dir,
                    &RingParams {
                        topic: topic.into(),
                        partition,
                        partitions,
                        capacity,
                        slot_size: SLOT_SIZE as u32,
                        modes: Default::default(),
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TopicWriter {
            partitions,
            symbology,
            source_seq: 0,
        })
    }

    /// Resolves an instrument id (adding it to symbology).
    ///
    /// # Errors
    /// Bad names, full table.
    pub fn instrument(
        &mut self,
        symbol: &str,
        exchange: &str,
        currency: &str,
    ) -> tickwire_proto::Result<u32> {
        self.symbology.resolve(&Instrument {
            symbol: symbol.into(),
            exchange: exchange.into(),
            currency: currency.into(),
            size_decimals: 0,
        })
    }

    /// Publishes a frame on a partition; returns its sequence.
    pub fn publish(&mut self, partition: u32, body: &FrameBody) -> u64 {
        self.partitions[partition as usize].publish(&body.to_words())
    }

    /// Publishes a trade with the next source sequence.
    ///
    /// # Errors
    /// Bad names or a non-finite price.
    pub fn publish_trade(
        &mut self,
        partition: u32,
        symbol: &str,
        exchange: &str,
        currency: &str,
        price: f64,
        size: u32,
    ) -> tickwire_proto::Result<u64> {
        let id = self.instrument(symbol, exchange, currency)?;
        let px = price_from_f64(price).ok_or_else(|| tickwire_proto::Error::Invalid {
            what: "price",
            why: format!("{price} is not finite"),
        })?;
        self.source_seq += 1;
        let mut body = FrameBody::trade(id, tickwire_proto::futex::realtime_ns(), px, size);
        body.source_seq = self.source_seq;
        Ok(self.publish(partition, &body))
    }

    /// Ends a batch on every partition.
    pub fn flush(&mut self) {
        for p in &mut self.partitions {
            p.flush();
        }
    }

    /// One partition's writer.
    pub fn partition(&mut self, partition: u32) -> &mut PartitionWriter {
        &mut self.partitions[partition as usize]
    }
}
