//! Ring and symbology files: one writer, restart, and structurally bad files
//! that must give a clear error, never a crash.

use std::os::unix::fs::FileExt;
use std::path::Path;

use tickwire_proto::Error;
use tickwire_proto::file::{
    FileModes, PartitionReader, PartitionWriter, RingFile, RingParams, StartAt, readers_path,
    ring_file_name,
};
use tickwire_proto::frame::FrameBody;
use tickwire_proto::ring::{Read, ReaderCore};
use tickwire_proto::symbology::{Symbology, SymbologyWriter};

fn params(partitions: u32, capacity: u64) -> RingParams {
    RingParams {
        topic: "md/eq".into(),
        partition: 0,
        partitions,
        capacity,
        slot_size: 64,
        modes: FileModes::default(),
    }
}

fn ring_path(dir: &Path) -> std::path::PathBuf {
    dir.join(ring_file_name("md/eq", 0))
}

#[test]
fn a_second_writer_on_the_same_ring_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("first writer");
    match PartitionWriter::open(dir.path(), &params(1, 64)) {
        Err(Error::WriterLocked { path, pid }) => {
            assert_eq!(path, ring_path(dir.path()));
            assert_eq!(pid, std::process::id() as u64, "the holder's pid is named");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("second writer accepted"),
    }
}

#[test]
fn restart_bumps_the_epoch_and_continues_the_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("writer");
    assert_eq!(w.epoch(), 1);
    for i in 1..=40u64 {
        assert_eq!(w.publish(&FrameBody::trade(1, i, 1, 1).to_words()), i);
    }
    w.flush();
    let reader_file = RingFile::open_reader(&ring_path(dir.path())).expect("reader");
    let mut reader = ReaderCore::new(reader_file.ring(), 38);
    drop(w);
    // The ring file is re-opened, never recreated: the reader's mapping
    // stays live and sees the new writer's frames.
    let mut w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("restart");
    assert_eq!(w.epoch(), 2);
    assert_eq!(w.core().next_seq(), 41);
    assert_eq!(w.publish(&FrameBody::trade(1, 41, 1, 1).to_words()), 41);
    w.flush();
    let mut buf = [0u64; 7];
    let got: Vec<Read> = (0..5).map(|_| reader.try_read(&mut buf)).collect();
    assert_eq!(
        got,
        vec![
            Read::Frame(38),
            Read::Frame(39),
            Read::Frame(40),
            Read::Frame(41),
            Read::Empty
        ]
    );
    assert_eq!(reader_file.ring().epoch(), 2);
}

#[test]
fn a_ring_created_to_continue_a_stream_starts_after_it_and_readers_below_it_see_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The journal ended at 1000, written under epoch 3.
    let mut w =
        PartitionWriter::open_after(dir.path(), &params(1, 16), Some((1000, 3))).expect("writer");
    assert_eq!((w.epoch(), w.core().next_seq()), (4, 1001));
    let file = RingFile::open_reader(&ring_path(dir.path())).expect("reader file");
    assert_eq!(file.ring().first_seq(), 1001);
    assert_eq!(file.ring().epoch_start_seq(), 1001);
    // Nothing written yet: a reader at 5 is told at once what the ring
    // never held, not left waiting for a sequence it will never get.
    let mut low = ReaderCore::new(file.ring(), 5);
    let mut buf = [0u64; 7];
    assert!(low.ready());
    assert_eq!(low.try_read(&mut buf), Read::Lapped { from: 5, to: 1000 });
    assert_eq!(low.try_read(&mut buf), Read::Empty);
    for i in 0..20u64 {
        assert_eq!(
            w.publish(&FrameBody::trade(1, i, 1, 1).to_words()),
            1001 + i
        );
    }
    w.flush();
    let mut earliest = PartitionReader::open(&ring_path(dir.path()), StartAt::Earliest, None, None)
        .expect("earliest");
    assert_eq!(
        earliest.try_read(&mut buf),
        Read::Frame(1005),
        "the oldest of 16 slots"
    );
    assert_eq!(
        low.try_read(&mut buf),
        Read::Lapped {
            from: 1001,
            to: 1004 + 2
        }
    );
    drop(w);
    // Reopened: the stream goes on, under the next epoch; a ring that
    // exists ignores where a journal ends.
    let w = PartitionWriter::open_after(dir.path(), &params(1, 16), Some((7, 9))).expect("again");
    assert_eq!((w.epoch(), w.core().next_seq()), (5, 1021));
    drop(w);
    // Reopened before it wrote anything: it still starts at 1001.
    let fresh = tempfile::tempdir().expect("tempdir");
    drop(PartitionWriter::open_after(fresh.path(), &params(1, 16), Some((1000, 3))).expect("w"));
    let w = PartitionWriter::open(fresh.path(), &params(1, 16)).expect("reopen");
    assert_eq!((w.epoch(), w.core().next_seq()), (5, 1001));
}

#[test]
fn a_writer_that_died_mid_frame_is_recovered_without_a_duplicate() {
    // Simulate a crash while filling seq 21: its slot carries the WRITING mark.
    let w = recover_after(20, |f| {
        f.write_all_at(&(21u64 | 1 << 63).to_le_bytes(), 4096 + (21 % 16) * 64)
            .expect("write")
    })
    .expect("restart");
    assert_eq!(
        w.core().next_seq(),
        21,
        "21 was never committed and is written again"
    );
}

#[test]
fn a_shrunk_partition_count_or_changed_capacity_is_refused_and_growth_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(PartitionWriter::open(dir.path(), &params(4, 64)).expect("writer"));
    match PartitionWriter::open(dir.path(), &params(2, 64)) {
        Err(Error::Mismatch {
            what,
            on_disk,
            requested,
            ..
        }) => {
            assert_eq!((what, on_disk, requested), ("partition count", 4, 2));
        }
        other => panic!("expected a mismatch, got {:?}", other.err()),
    }
    // The topic grew to 8: partition 0 keeps the count it was created with.
    let w = PartitionWriter::open(dir.path(), &params(8, 64)).expect("grown");
    assert_eq!(w.file().statics().partitions, 4);
    drop(w);
    assert!(matches!(
        PartitionWriter::open(dir.path(), &params(4, 128)),
        Err(Error::Mismatch {
            what: "capacity",
            ..
        })
    ));
}

/// Writes a valid ring, then corrupts it with `patch`, and returns the
/// reader's error message.
fn corrupt(patch: impl FnOnce(&std::fs::File)) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(PartitionWriter::open(dir.path(), &params(1, 64)).expect("writer"));
    let path = ring_path(dir.path());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    patch(&f);
    match RingFile::open_reader(&path) {
        Ok(_) => panic!("corrupt file accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn structurally_bad_ring_files_give_clear_errors() {
    let msg = corrupt(|f| f.write_all_at(b"NOTARING", 0).expect("w"));
    assert!(msg.contains("not a tickwire ring file"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&9u16.to_le_bytes(), 8).expect("w"));
    assert!(
        msg.contains("layout version 9.1 is not supported (this build knows 2.1)"),
        "{msg}"
    );
    let msg = corrupt(|f| {
        f.write_all_at(&0x0403_0201u32.to_le_bytes(), 20)
            .expect("w")
    });
    assert!(msg.contains("endian"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&100u32.to_le_bytes(), 16).expect("w"));
    assert!(msg.contains("slot_size = 100"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&100u64.to_le_bytes(), 24).expect("w"));
    assert!(
        msg.contains("capacity = 100") && msg.contains("power of two"),
        "{msg}"
    );
    let msg = corrupt(|f| f.write_all_at(&12288u32.to_le_bytes(), 12).expect("w"));
    assert!(msg.contains("header_size = 12288"), "{msg}");
    let msg = corrupt(|f| f.set_len(4096 + 10 * 64).expect("truncate"));
    assert!(
        msg.contains("file is 4736 bytes, but its 64 slots of 64 bytes after the header need 8192"),
        "{msg}"
    );
    let msg = corrupt(|f| f.set_len(100).expect("truncate"));
    assert!(msg.contains("file is 100 bytes"), "{msg}");
    let msg = corrupt(|f| f.write_all_at(&7u32.to_le_bytes(), 32).expect("w"));
    assert!(msg.contains("partition = 7"), "{msg}");
}

/// Writes frames 1..=`n` into a 16-slot ring, patches the data file, and
/// returns what a restarted writer says.
fn recover_after(n: u64, patch: impl FnOnce(&std::fs::File)) -> Result<PartitionWriter, Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut w = PartitionWriter::open(dir.path(), &params(1, 16)).expect("writer");
        for i in 1..=n {
            w.publish(&FrameBody::trade(1, i, 1, 1).to_words());
        }
        w.flush();
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ring_path(dir.path()))
        .expect("open");
    patch(&f);
    PartitionWriter::open(dir.path(), &params(1, 16))
}

fn corrupt_message(r: Result<PartitionWriter, Error>) -> String {
    match r {
        Err(e @ Error::Corrupt { .. }) => e.to_string(),
        Err(e) => panic!("wrong error: {e}"),
        Ok(w) => panic!("corrupt ring resumed at {}", w.next_seq()),
    }
}

#[test]
fn a_restarted_writer_refuses_a_ring_it_cannot_trust_naming_the_file_and_field() {
    // `published` (writer block offset 8, file offset 136) beyond every stamp.
    let msg = corrupt_message(recover_after(40, |f| {
        f.write_all_at(&1_000_000u64.to_le_bytes(), 136).expect("w")
    }));
    assert!(
        msg.contains("md~eq.0.ring") && msg.contains("published = 1000000"),
        "{msg}"
    );
    // One stamp far ahead (would make sequences jump to 2^62).
    let msg = corrupt_message(recover_after(40, |f| {
        f.write_all_at(&(1u64 << 62).to_le_bytes(), 4096)
            .expect("w")
    }));
    assert!(msg.contains("stamp of slot"), "{msg}");
    // A stamp in a slot its sequence does not map to.
    let msg = corrupt_message(recover_after(40, |f| {
        f.write_all_at(&39u64.to_le_bytes(), 4096 + 3 * 64)
            .expect("w")
    }));
    assert!(
        msg.contains("stamp of slot 3 = 39") && msg.contains("maps to slot 3"),
        "{msg}"
    );
    // An old stamp left among new ones.
    let msg = corrupt_message(recover_after(40, |f| {
        f.write_all_at(&3u64.to_le_bytes(), 4096 + 3 * 64)
            .expect("w")
    }));
    assert!(
        msg.contains("one of the last 16 sequences (25..=40)"),
        "{msg}"
    );
    // The unpatched ring resumes where it stopped.
    let w = recover_after(40, |_| {}).expect("intact ring");
    assert_eq!(w.next_seq(), 41);
}

#[test]
fn readers_map_the_data_read_only_and_files_get_their_modes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("writer");
    assert!(w.created());
    w.publish(&FrameBody::trade(1, 1, 1, 1).to_words());
    w.flush();
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&ring_path(dir.path())), 0o640);
    assert_eq!(mode(&readers_path(&ring_path(dir.path()))), 0o660);
    let r = PartitionReader::open(&ring_path(dir.path()), StartAt::Earliest, None, None)
        .expect("reader");
    assert!(r.is_registered());
    // The kernel's view of this process's mappings: the data file is
    // mapped shared and read-only by the reader, the reader state writable.
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    // Only this test's files: other tests in this process map rings too.
    let perms = |path: std::path::PathBuf| -> Vec<String> {
        let path = path.display().to_string();
        maps.lines()
            .filter(|l| l.ends_with(&path))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .collect()
    };
    let data = perms(ring_path(dir.path()));
    assert!(
        data.contains(&"r--s".to_string()) && data.contains(&"rw-s".to_string()),
        "the writer's rw and the reader's read-only data mappings: {data:?}"
    );
    assert_eq!(
        perms(readers_path(&ring_path(dir.path()))),
        vec!["rw-s", "rw-s"]
    );
}

#[test]
fn a_reader_sees_a_graceful_end_of_stream_and_a_dead_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("writer");
    let r =
        PartitionReader::open(&ring_path(dir.path()), StartAt::Latest, None, None).expect("reader");
    assert!(r.file().writer_alive());
    assert!(!r.file().writer_closed());
    drop(w);
    assert!(!r.file().writer_alive(), "the writer lock went with it");
    assert!(r.file().writer_closed(), "closed gracefully");
    let w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("writer again");
    assert!(!w.created());
    assert!(r.file().writer_alive() && !r.file().writer_closed());
    drop(w);
    // A writer process killed with SIGKILL: the state stays open, the lock
    // goes. The child is this test binary run as the writer.
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "writer_child", "--nocapture"])
        .env("TICKWIRE_WRITER_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("child");
    // The test harness prints its own lines first.
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let ready = std::io::BufRead::lines(out)
        .take(20)
        .map_while(Result::ok)
        .any(|l| l.contains("writer ready"));
    assert!(ready, "the child opened the ring");
    assert!(r.file().writer_alive(), "the child holds the ring");
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(
        !r.file().writer_alive(),
        "the kernel dropped the dead writer's lock"
    );
    assert!(!r.file().writer_closed(), "it died without closing");
}

/// Run by `a_reader_sees_a_graceful_end_of_stream_and_a_dead_writer` as a
/// separate process: opens the ring as its writer and waits to be killed.
#[test]
fn writer_child() {
    let Some(dir) = std::env::var_os("TICKWIRE_WRITER_CHILD_DIR") else {
        return;
    };
    let _w = PartitionWriter::open(Path::new(&dir), &params(1, 64)).expect("child writer");
    println!("writer ready");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_removed_or_replaced_ring_is_noticed() {
    use tickwire_proto::file::FileStatus;
    let dir = tempfile::tempdir().expect("tempdir");
    let w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("writer");
    let r =
        PartitionReader::open(&ring_path(dir.path()), StartAt::Latest, None, None).expect("reader");
    assert_eq!(r.file().status(), FileStatus::Same);
    drop(w);
    std::fs::remove_file(ring_path(dir.path())).expect("rm");
    assert_eq!(r.file().status(), FileStatus::Removed);
    let _w = PartitionWriter::open(dir.path(), &params(1, 64)).expect("new ring");
    assert_eq!(r.file().status(), FileStatus::Replaced);
}

#[test]
fn a_ring_that_does_not_fit_is_refused_with_the_size_not_a_bus_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tickwire-test"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "this test mounts a 1 MiB tmpfs and needs root (as scripts/test.sh runs)"
    );
    let r = PartitionWriter::open(&mnt, &params(1, 1 << 16));
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    match r {
        Err(e @ Error::NoSpace { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("no space left on device: need 4198400 bytes for")
                    && msg.contains("md~eq.0.ring"),
                "{msg}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a 4 MiB ring fit in a 1 MiB tmpfs"),
    }
}

#[test]
fn structurally_bad_symbology_files_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = SymbologyWriter::open(dir.path(), 8).expect("writer");
    w.resolve(&tickwire_proto::symbology::Instrument {
        symbol: "A".into(),
        exchange: "X".into(),
        currency: "USD".into(),
        size_decimals: 0,
    })
    .expect("id");
    drop(w);
    let path = dir.path().join("symbology");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    // A count beyond the capacity (a corrupt or hostile file) is clamped by
    // readers: ids past the table never resolve, nothing reads out of bounds.
    f.write_all_at(&1_000_000u32.to_le_bytes(), 64).expect("w");
    let r = Symbology::open(dir.path()).expect("reader");
    assert_eq!(r.count(), 8);
    assert!(r.get(9).is_none());
    assert!(r.get(u32::MAX).is_none());
    // The writer refuses it outright.
    match SymbologyWriter::open(dir.path(), 8) {
        Err(e) => assert!(e.to_string().contains("count = 1000000"), "{e}"),
        Ok(_) => panic!("corrupt count accepted"),
    }
    f.write_all_at(&0x0403_0201u32.to_le_bytes(), 20)
        .expect("w");
    let e = Symbology::open(dir.path())
        .err()
        .expect("byte order refused");
    assert!(e.to_string().contains("endian"), "{e}");
    f.write_all_at(&2u16.to_le_bytes(), 8).expect("w");
    let e = Symbology::open(dir.path()).err().expect("version refused");
    assert!(
        e.to_string()
            .contains("layout version 2.1 is not supported"),
        "{e}"
    );
    f.write_all_at(b"XXXXXXXX", 0).expect("w");
    let e = Symbology::open(dir.path()).err().expect("magic refused");
    assert!(
        e.to_string().contains("not a tickwire symbology file"),
        "{e}"
    );
    f.set_len(10).expect("truncate");
    let e = Symbology::open(dir.path()).err().expect("short refused");
    assert!(e.to_string().contains("file is 10 bytes"), "{e}");
}
