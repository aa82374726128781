// A ring view taken from a reader cannot outlive it.
use tickwire_proto::file::{PartitionReader, StartAt};

fn main() {
    let ring = {
        let r = PartitionReader::open(std::path::Path::new("/tmp/x.0.ring"), StartAt::Latest, None, None)
            .expect("open");
        r.ring()
    };
    let _ = ring.published();
}
