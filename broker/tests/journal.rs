//! The journal: every committed event on disk, replay from it merged into
//! the live ring, restarts after a crash, time starts and retention.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use shm_client::{Event, Start, Subscriber, WaitStrategy};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::engine::{Broker, Ingest};
use tickwire_broker::router::Route;
use tickwire_proto::FrameBody;
use tickwire_proto::frame::BODY_WORDS;
use tickwire_proto::journal::{self, JournalRead, JournalReader};

const TOPIC: &str = "test/journal";

/// Set in the environment of a test's own child process: the test then
/// plays the child's part.
const CHILD: &str = "TICKWIRE_JOURNAL_TEST_CHILD";

/// This test binary running only `test` as its child part, on `dir`.
fn child(test: &str, dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().expect("exe"));
    c.args(["--exact", test, "--nocapture"])
        .env(CHILD, "1")
        .env("TICKWIRE_JOURNAL_TEST_DIR", dir);
    c
}

fn config(dir: &Path, partitions: u32, capacity: u64) -> Config {
    let mut c = Config::default();
    c.node.dir = Some(dir.to_path_buf());
    c.synthetic.enabled = false;
    c.edge.enabled = false;
    c.topics = vec![TopicConfig {
        name: TOPIC.into(),
        partitions,
        capacity,
        ..TopicConfig::default()
    }];
    c.journal.segment_frames = 4096;
    c
}

#[path = "support/routes.rs"]
mod support;

fn routes(ingest: &mut Ingest, n: usize) -> Vec<Route> {
    support::routes(ingest, TOPIC, n)
}

/// Sends events `from..=to` (event time = `t0 + i`, source_seq = i),
/// retrying on backpressure.
fn send_range(ingest: &mut Ingest, rs: &[Route], from: u64, to: u64, t0: u64) {
    for i in from..=to {
        let route = &rs[(i % rs.len() as u64) as usize];
        let mut body = FrameBody::trade(0, t0 + i, i as i64, 1);
        body.source_seq = i;
        while ingest.try_send(route, &body, None).is_err() {
            std::thread::yield_now();
        }
    }
}

/// Every frame of a partition's journal, checked: (seq, source_seq).
fn journal_frames(root: &Path, partition: u32) -> Vec<(u64, u64)> {
    let dir = journal::partition_dir(root, TOPIC, partition);
    let mut r = JournalReader::open(&dir)
        .expect("open")
        .expect("journal dir");
    let mut seq = r.oldest().expect("a segment");
    let mut out = Vec::new();
    let mut body = [0u64; BODY_WORDS];
    loop {
        match r.read(seq, &mut body).expect("read") {
            JournalRead::Frame => {
                out.push((seq, FrameBody::from_words(&body).source_seq));
                seq += 1;
            }
            JournalRead::End => return out,
            JournalRead::Missing { to } => panic!("journal misses {seq}..={to}"),
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Events pass through a ring of 1024 slots, 100 times over. A subscriber
/// from Earliest replays the history from the journal, joins the ring,
/// then sleeps while bursts are written, so the ring laps it again and
/// again: it still gets every sequence of every partition exactly once and
/// in order (from the journal while the ring has moved on, from the ring
/// once it has caught up), with no gap and no duplicate. The same run with
/// journal fill off reports gaps, so the check can fail.
#[test]
fn replay_from_earliest_merges_into_the_live_ring_with_no_gap_or_duplicate() {
    let with_fill = replay_run(true);
    assert_eq!(with_fill.gaps, 0, "{with_fill:?}");
    assert!(
        with_fill.replayed > 20_000,
        "history and laps came from the journal: {with_fill:?}"
    );
    let without = replay_run(false);
    assert!(without.gaps > 0, "the slow reader was lapped: {without:?}");
}

fn replay_run(fill: bool) -> shm_client::Stats {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 2, 1024);
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 16);
    let n: u64 = 120_000;
    let history = 20_000;
    send_range(&mut ingest, &rs, 1, history, 0);
    wait_until("the history journaled", || {
        broker.journal_stats().expect("journal").events >= history
    });
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Earliest)
        .journal_fill(fill)
        .wait(WaitStrategy::SpinThenYield { spins: 100 })
        .open()
        .expect("sub");
    let mut next: HashMap<u32, u64> = HashMap::new();
    let mut source_seqs = Vec::with_capacity(n as usize);
    let mut read = |sub: &mut Subscriber, max: usize, source_seqs: &mut Vec<u64>| {
        sub.poll(max, |e| match e {
            Event::Tick(t) => {
                let expected = next.entry(t.partition).or_insert(1);
                if fill {
                    assert_eq!(t.seq, *expected, "partition {} continuity", t.partition);
                }
                *expected = t.seq + 1;
                source_seqs.push(t.body.source_seq());
            }
            Event::Gap { partition, to, .. } if !fill => {
                next.insert(partition, to + 1);
            }
            other => panic!("a replaying subscriber got {other:?}"),
        })
    };
    // The history, from the journal, then joined to the ring.
    while (source_seqs.len() as u64) < history {
        if read(&mut sub, 4096, &mut source_seqs) == 0 {
            sub.wait_for_data(Duration::from_millis(10));
        }
    }
    assert!(!sub.replaying(0) && !sub.replaying(1), "joined the ring");
    let producer = std::thread::spawn(move || {
        let mut i = history + 1;
        while i <= n {
            let to = (i + 9_999).min(n);
            send_range(&mut ingest, &rs, i, to, 0);
            i = to + 1;
            std::thread::sleep(Duration::from_millis(15));
        }
        ingest
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let k = read(&mut sub, 256, &mut source_seqs);
        if (source_seqs.len() as u64) >= n || (!fill && producer.is_finished() && k == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stalled at {}",
            source_seqs.len()
        );
        // Slow for the first 300 ms: lapped by the bursts.
        if started.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
        } else if k == 0 {
            sub.wait_for_data(Duration::from_millis(10));
        }
    }
    let mut ingest = producer.join().expect("producer");
    if fill {
        source_seqs.sort_unstable();
        source_seqs.dedup();
        assert_eq!(source_seqs.len() as u64, n, "every event exactly once");
        // Live after the merge: the next event arrives from the ring.
        let rs = routes(&mut ingest, 16);
        send_range(&mut ingest, &rs, n + 1, n + 1, 0);
        let mut got = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.is_none() && Instant::now() < deadline {
            sub.poll(16, |e| {
                if let Event::Tick(t) = e {
                    got = Some(t.body.source_seq());
                }
            });
        }
        assert_eq!(got, Some(n + 1));
        assert_eq!(broker.journal_stats().expect("journal").gap_frames, 0);
    }
    broker.shutdown();
    sub.stats()
}

/// The journal holds every committed event once it has written them, and
/// a subscriber can start at an event time: the first event at or after
/// it, from the journal or from the ring.
#[test]
fn every_event_is_journaled_and_a_time_start_lands_on_the_first_at_or_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1, 1024);
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    let t0 = 1_700_000_000_000_000_000;
    send_range(&mut ingest, &rs, 1, 10_000, t0);
    let root = cfg.journal_dir();
    wait_until("the journal to write 10000 events", || {
        broker.journal_stats().expect("journal").events >= 10_000
    });
    let frames = journal_frames(&root, 0);
    assert_eq!(frames.len(), 10_000);
    for (i, &(seq, src)) in frames.iter().enumerate() {
        assert_eq!((seq, src), (i as u64 + 1, i as u64 + 1));
    }
    // The two full segments (4096 frames each) were synced as they closed
    // (in the background with io_uring: waited for here).
    wait_until("the two full segments to be synced", || {
        broker.journal_stats().expect("journal").syncs >= 2
    });
    assert_eq!(broker.journal_stats().expect("journal").sync_errors, 0);
    for (t, first) in [
        (t0 + 1, 1),         // journal, first segment
        (t0 + 5_000, 5_000), // journal, a later segment, mid-index
        (t0 + 9_990, 9_990), // still in the ring too
        (0, 1),
    ] {
        let mut sub = Subscriber::builder(TOPIC)
            .node_dir(dir.path())
            .start(Start::Time(t))
            .open()
            .expect("sub");
        let mut seen = None;
        sub.poll(1, |e| {
            if let Event::Tick(t) = e {
                seen = Some((t.seq, t.body.ts_event()));
            }
        });
        assert_eq!(seen, Some((first, t0 + first)), "start at {t}");
    }
    // After every event: Latest, the next one sent.
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Time(t0 + 20_000))
        .open()
        .expect("sub");
    assert_eq!(sub.positions(), vec![(0, 10_001)]);
    send_range(&mut ingest, &rs, 10_001, 10_001, t0);
    let mut seen = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.is_none() && Instant::now() < deadline {
        sub.poll(1, |e| {
            if let Event::Tick(t) = e {
                seen = Some(t.seq);
            }
        });
    }
    assert_eq!(seen, Some(10_001));
    // The epoch of a replayed event comes from the journal's records.
    assert_eq!(sub.epoch_of(0, 3), Some(1));
    broker.shutdown();
}

/// A broker that dies (its process aborted: no shutdown, no last write,
/// no fsync) and is started again: the journal cuts a torn tail, then
/// writes what the ring still holds and the journal had not, so it has
/// every committed sequence once, and sequences continue under a new epoch.
#[test]
fn after_a_crash_and_a_torn_tail_the_journal_has_every_committed_event_once() {
    if std::env::var_os(CHILD).is_some() {
        return crash_child();
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 1, 1 << 14);
    let root = cfg.journal_dir();
    let status = child(
        "after_a_crash_and_a_torn_tail_the_journal_has_every_committed_event_once",
        dir.path(),
    )
    .stderr(std::process::Stdio::null())
    .status()
    .expect("child");
    assert!(!status.success(), "the child aborts");
    // What a crash mid-write leaves: half a frame, then a page of zeros.
    let pdir = journal::partition_dir(&root, TOPIC, 0);
    let newest = *journal::list_segments(&pdir)
        .expect("segments")
        .last()
        .expect("a segment");
    let path = pdir.join(journal::segment_name(newest));
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("segment");
        f.write_all(&[0x5A; 40]).expect("tail");
        f.write_all(&[0u8; 4096]).expect("tail");
    }
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    send_range(&mut ingest, &rs, 9_001, 12_000, 0);
    wait_until("12000 journaled", || {
        journal_frames(&root, 0).len() >= 12_000
    });
    broker.shutdown();
    let frames = journal_frames(&root, 0);
    assert_eq!(frames.len(), 12_000, "no loss, no duplicate");
    for (i, &(seq, src)) in frames.iter().enumerate() {
        assert_eq!((seq, src), (i as u64 + 1, i as u64 + 1), "at index {i}");
    }
    let epochs = journal::read_epochs(&pdir);
    assert_eq!(epochs, vec![(1, 1), (9_001, 2)], "epochs by first sequence");
}

/// The test above, in its own process: commits 9000 events, then dies at
/// once, whatever the journal has written by then.
fn crash_child() {
    let Some(dir) = std::env::var_os("TICKWIRE_JOURNAL_TEST_DIR") else {
        return;
    };
    let cfg = config(Path::new(&dir), 1, 1 << 14);
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    send_range(&mut ingest, &rs, 1, 9_000, 0);
    wait_until("9000 committed", || broker.stats().events >= 9_000);
    std::process::abort();
}

/// Retention deletes whole segments, oldest first, never the one being
/// written: past a size cap at once, and by age. A subscriber starting
/// before what is kept is told the exact range it cannot have, then gets
/// the oldest kept event, the first of a segment.
#[test]
fn retention_deletes_whole_old_segments_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A ring of 4096: sequence 1 has left it.
    let mut cfg = config(dir.path(), 1, 4096);
    cfg.journal.segment_frames = 1024;
    cfg.journal.max_bytes_per_partition = 4 * 1024 * 64;
    cfg.journal.retention = "1500ms".into();
    let root = cfg.journal_dir();
    let pdir = journal::partition_dir(&root, TOPIC, 0);
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    // Ten and a half segments: the size cap keeps four in all.
    send_range(&mut ingest, &rs, 1, 10_752, 0);
    wait_until("the size cap to apply", || {
        journal::list_segments(&pdir).expect("list").len() <= 4
            && broker.journal_stats().expect("journal").events >= 10_752
    });
    let segs = journal::list_segments(&pdir).expect("list");
    assert_eq!(
        segs,
        vec![7_169, 8_193, 9_217, 10_241],
        "whole segments, the newest kept"
    );
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .open()
        .expect("sub");
    let mut first = Vec::new();
    sub.poll(2, |e| first.push(format!("{e:?}")));
    assert!(
        first[0].contains("Gap { partition: 0, from: 1, to: 7168 }"),
        "{first:?}"
    );
    assert!(first[1].contains("seq: 7169"), "{first:?}");
    // By age: everything but the segment being written goes.
    // The counter moves after the files go (the journal counts a sweep's
    // deletions once it has made them): wait for both.
    wait_until("retention by age, counted", || {
        journal::list_segments(&pdir).expect("list") == vec![10_241]
            && broker.journal_stats().expect("journal").segments_deleted >= 9
    });
    broker.shutdown();
}

/// A disk that refuses writes (here: a file-size limit, as a full disk
/// would): the journal says so and keeps every byte it had; ingest slows
/// (the ring waits for the journal, the queue fills, sources are refused)
/// instead of the journal skipping; and the broker still stops promptly.
#[test]
fn a_disk_that_refuses_writes_slows_ingest_and_never_blocks_shutdown() {
    if std::env::var_os(CHILD).is_some() {
        return full_disk_child();
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = child(
        "a_disk_that_refuses_writes_slows_ingest_and_never_blocks_shutdown",
        dir.path(),
    )
    .output()
    .expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .expect("the child's result");
    let v: Vec<u64> = line[7..]
        .split(' ')
        .map(|x| x.parse().expect("number"))
        .collect();
    let (accepted, write_errors, shutdown_ms) = (v[0], v[1], v[2]);
    assert!(write_errors > 0, "the journal saw the refusal");
    assert!(
        accepted < 200_000,
        "ingest was slowed down: {accepted} accepted"
    );
    assert!(shutdown_ms < 15_000, "shutdown took {shutdown_ms} ms");
    // Every byte the journal wrote is an intact frame, from the first on.
    let cfg = config(dir.path(), 1, 4096);
    let frames = journal_frames(&cfg.journal_dir(), 0);
    assert_eq!(
        frames.len() as u64,
        (1 << 20) / 64,
        "the journal filled what it was allowed"
    );
    for (i, &(seq, src)) in frames.iter().enumerate() {
        assert_eq!((seq, src), (i as u64 + 1, i as u64 + 1));
    }
}

/// The test above, in its own process (the limit is per process).
fn full_disk_child() {
    let Some(dir) = std::env::var_os("TICKWIRE_JOURNAL_TEST_DIR") else {
        return;
    };
    let mut cfg = config(Path::new(&dir), 1, 4096);
    cfg.journal.io = tickwire_broker::config::JournalIo::Plain;
    // One segment file that would grow past the limit.
    cfg.journal.segment_frames = 1 << 20;
    let broker = Broker::start(&cfg).expect("broker");
    // From now on no file of this process may grow past 1 MiB: writes past
    // it fail with EFBIG, as they would with ENOSPC on a full disk.
    // SAFETY: plain libc calls with valid arguments.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    let mut accepted = 0u64;
    let mut refused_since: Option<Instant> = None;
    while accepted < 200_000 {
        let mut body = FrameBody::trade(0, accepted + 1, 1, 1);
        body.source_seq = accepted + 1;
        match ingest.try_send(&rs[(accepted % 4) as usize], &body, None) {
            Ok(()) => {
                accepted += 1;
                refused_since = None;
            }
            Err(_) => {
                if refused_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1)
                {
                    break;
                }
                std::thread::yield_now();
            }
        }
    }
    let errors = broker.journal_stats().expect("journal").write_errors;
    let t = Instant::now();
    broker.shutdown();
    println!("RESULT {accepted} {errors} {}", t.elapsed().as_millis());
}

/// Two nodes (different node directories) given the same journal
/// directory: the second is refused with a reason, and nothing of the
/// first is touched.
#[test]
fn a_journal_directory_serves_one_broker_at_a_time() {
    let (a, b, j) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut ca = config(a.path(), 1, 1024);
    ca.journal.dir = Some(j.path().to_path_buf());
    let mut cb = config(b.path(), 1, 1024);
    cb.journal.dir = Some(j.path().to_path_buf());
    let first = Broker::start(&ca).expect("first broker");
    let err = Broker::start(&cb)
        .err()
        .expect("second refused")
        .to_string();
    assert!(err.contains("in use by another tickwire serve"), "{err}");
    first.shutdown();
    Broker::start(&cb)
        .expect("free once the first stopped")
        .shutdown();
}

/// A broker on node directory `node` with its journal in `journal` that
/// wrote sources 1..=500 (sequences 1..=500) and stopped: its config.
fn journal_500(node: &Path, journal: &Path) -> Config {
    let mut cfg = config(node, 1, 1024);
    cfg.journal.dir = Some(journal.to_path_buf());
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    send_range(&mut ingest, &rs, 1, 500, 0);
    wait_until("500 journaled", || {
        broker.journal_stats().expect("journal").events >= 500
    });
    drop(ingest);
    broker.shutdown();
    cfg
}

/// Rings deleted and created anew (a fresh node directory: what a reboot
/// does to /dev/shm) while the journal stays: the new rings continue the
/// journal's sequences under the next epoch, so Earliest replays every
/// event, old and new, with no gap and no sequence given twice.
#[test]
fn new_rings_beside_a_journal_continue_its_sequences() {
    let (first, second, j) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut cfg = journal_500(first.path(), j.path());
    // The reboot: new rings, the same journal directory.
    cfg.node.dir = Some(second.path().to_path_buf());
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    send_range(&mut ingest, &rs, 10_001, 10_100, 0);
    wait_until("100 journaled", || {
        broker.journal_stats().expect("journal").events >= 100
    });
    let frames = journal_frames(j.path(), 0);
    let want: Vec<(u64, u64)> = (1..=500)
        .chain(10_001..=10_100)
        .zip(1..)
        .map(|(source, seq)| (seq, source))
        .collect();
    assert_eq!(frames, want, "sequences 1..=600, the new ring's from 501");
    let pdir = journal::partition_dir(j.path(), TOPIC, 0);
    assert_eq!(journal::read_epochs(&pdir), vec![(1, 1), (501, 2)]);
    let aside = std::fs::read_dir(j.path())
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".replaced-"))
        .count();
    assert_eq!(aside, 0, "nothing moved aside");
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(second.path())
        .journal_dir(j.path())
        .start(Start::Earliest)
        .open()
        .expect("sub");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 600 && Instant::now() < deadline {
        sub.poll(64, |e| match e {
            Event::Tick(t) => seen.push((t.seq, t.body.source_seq())),
            other => panic!("only ticks: {other:?}"),
        });
    }
    assert_eq!(seen, want, "every event once, in order, across the reboot");
    assert_eq!(sub.epoch_of(0, 500), Some(1));
    assert_eq!(sub.epoch_of(0, 501), Some(2));
    drop((sub, ingest));
    broker.shutdown();
}

/// A journal ahead of a ring that exists (not the ring it was written
/// from) is moved aside, never mixed; past the retention it is deleted at
/// the next start.
#[test]
fn a_journal_ahead_of_an_existing_ring_is_moved_aside_not_mixed() {
    let (first, second, j) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut cfg = journal_500(first.path(), j.path());
    // Another node directory's rings, written with the journal off.
    cfg.node.dir = Some(second.path().to_path_buf());
    cfg.journal.enabled = false;
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(1);
    let rs = routes(&mut ingest, 4);
    send_range(&mut ingest, &rs, 10_001, 10_100, 0);
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(second.path())
        .start(Start::Earliest)
        .open()
        .expect("sub");
    let mut n = 0;
    wait_until("100 in the ring", || {
        sub.poll(64, |_| n += 1);
        n >= 100
    });
    drop((sub, ingest));
    broker.shutdown();
    // The journal on again: it is ahead of this ring (600 > 100).
    cfg.journal.enabled = true;
    let broker = Broker::start(&cfg).expect("broker");
    wait_until("the ring's 100 journaled", || {
        broker.journal_stats().expect("journal").events >= 100
    });
    let frames = journal_frames(j.path(), 0);
    assert_eq!(frames.len(), 100);
    assert_eq!(frames[0], (1, 10_001), "the ring's first event, sequence 1");
    let aside: Vec<String> = std::fs::read_dir(j.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old journal, moved aside: {aside:?}");
    broker.shutdown();
    // Past its retention, the moved-aside journal goes at the next start.
    cfg.journal.retention = "1s".into();
    std::thread::sleep(Duration::from_millis(2_100));
    Broker::start(&cfg).expect("broker").shutdown();
    let left = std::fs::read_dir(j.path())
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".replaced-"))
        .count();
    assert_eq!(left, 0);
}
