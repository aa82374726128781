// A ring view taken from a writer cannot outlive it: the mapping it points
// into is unmapped when the writer drops.
use tickwire_proto::file::{PartitionWriter, RingParams};

fn main() {
    let params = RingParams {
        topic: "t".into(),
        partition: 0,
        partitions: 1,
        capacity: 64,
        slot_size: 64,
        modes: Default::default(),
    };
    let ring = {
        let w = PartitionWriter::open(std::path::Path::new("/tmp/x"), &params).expect("open");
        w.core().ring()
    };
    let _ = ring.published();
}
