// A view of a ring file's header cannot outlive the file (its mapping).
use tickwire_proto::file::RingFile;

fn main() {
    let header = {
        let f = RingFile::open_reader(std::path::Path::new("/tmp/x.0.ring")).expect("open");
        f.header()
    };
    let _ = &header.writer;
}
