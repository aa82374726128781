//! Delivery through real ring files: order, continuity, laps, tethering,
//! readers that die.

use std::time::Duration;

use shm_client::testing::TopicWriter;
use shm_client::{Event, Start, Subscriber, WaitStrategy};
use tickwire_proto::FrameBody;

const TOPIC: &str = "test/ticks";

fn body(i: u64) -> FrameBody {
    let mut b = FrameBody::trade(1, i, i as i64, (i % 1000) as u32);
    b.source_seq = i;
    b
}

/// A one-partition ring of `capacity` slots holding events 1..=`n`.
fn filled(dir: &std::path::Path, capacity: u64, n: u64) -> TopicWriter {
    let mut w = TopicWriter::create(dir, TOPIC, 1, capacity).expect("writer");
    for i in 1..=n {
        w.publish(0, &body(i));
    }
    w.flush();
    w
}

#[test]
fn millions_of_events_arrive_in_order_on_every_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let partitions = 4u32;
    let per_partition: u64 = 500_000;
    let mut w = TopicWriter::create(dir.path(), TOPIC, partitions, 1 << 12).expect("writer");
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .tethered(Duration::from_secs(30))
        .wait(WaitStrategy::SpinThenYield { spins: 100 })
        .open()
        .expect("subscriber");
    let writer = std::thread::spawn(move || {
        for i in 1..=per_partition {
            for p in 0..partitions {
                w.publish(p, &body(i * 10 + p as u64));
            }
            if i % 64 == 0 {
                w.flush();
            }
        }
        w.flush();
        w
    });
    let mut next = vec![1u64; partitions as usize];
    let mut total = 0u64;
    while total < per_partition * partitions as u64 {
        let n = sub.poll(4096, |e| match e {
            Event::Tick(t) => {
                let p = t.partition as usize;
                assert_eq!(t.seq, next[p], "partition {p} out of order");
                assert_eq!(
                    t.body.source_seq(),
                    t.seq * 10 + p as u64,
                    "wrong body for seq {}",
                    t.seq
                );
                next[p] += 1;
            }
            other => panic!("unexpected {other:?}"),
        });
        total += n as u64;
        if n == 0 {
            sub.wait_for_data(Duration::from_millis(10));
        }
    }
    writer.join().expect("writer");
    assert!(next.iter().all(|&n| n == per_partition + 1));
    assert_eq!(sub.stats().lost, 0);
    assert_eq!(sub.stats().delivered, per_partition * partitions as u64);
}

#[test]
fn a_lapped_reader_gets_the_exact_missing_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cap = 64u64;
    let mut w = TopicWriter::create(dir.path(), TOPIC, 1, cap).expect("writer");
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .lap_slack(8)
        .open()
        .expect("sub");
    for i in 1..=10 {
        w.publish(0, &body(i));
    }
    w.flush();
    let mut seen = Vec::new();
    sub.poll(5, |e| {
        if let Event::Tick(t) = e {
            seen.push(t.seq)
        }
    });
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    // The writer runs 200 further: head = 210, oldest held = 147, resume = 155.
    for i in 11..=210 {
        w.publish(0, &body(i));
    }
    w.flush();
    let mut events = Vec::new();
    sub.poll(1000, |e| match e {
        Event::Tick(t) => {
            assert_eq!(t.body.source_seq(), t.seq);
            events.push(format!("t{}", t.seq))
        }
        Event::Gap { from, to, .. } => events.push(format!("gap{from}-{to}")),
        Event::Untethered { .. } => events.push("untethered".into()),
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(events[0], "gap6-154");
    assert_eq!(events[1], "t155");
    assert_eq!(events.last().map(String::as_str), Some("t210"));
    assert_eq!(events.len(), 1 + (210 - 155 + 1));
    assert_eq!(sub.stats().lost, 154 - 6 + 1);
}

/// The runs of 10 a member of a group of 3 owns: `[30k + 10, 30k + 20)`.
fn middle_stripe(_: u32, seq: u64) -> (u64, u64) {
    let start = if seq % 30 < 10 {
        seq - seq % 30 + 10
    } else if seq % 30 < 20 {
        seq
    } else {
        seq - seq % 30 + 40
    };
    (start, start - start % 30 + 20)
}

#[test]
fn a_selective_poll_reads_only_the_wanted_runs_and_still_reports_a_lap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = filled(dir.path(), 256, 200);
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .lap_slack(8)
        .open()
        .expect("sub");
    fn record(events: &mut Vec<String>, e: Event<'_>) {
        match e {
            Event::Tick(t) => {
                assert_eq!(
                    t.body.source_seq(),
                    t.seq,
                    "the frame read is the one wanted"
                );
                events.push(format!("t{}", t.seq))
            }
            Event::Gap { from, to, .. } => events.push(format!("gap{from}-{to}")),
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut events = Vec::new();
    while sub.poll_selected(7, middle_stripe, |e| record(&mut events, e)) > 0 {}
    // What `middle_stripe` wants of `from..=to`, as recorded.
    let wanted = |from: u64, to: u64| -> Vec<String> {
        (from..=to)
            .filter(|s| (10..20).contains(&(s % 30)))
            .map(|s| format!("t{s}"))
            .collect()
    };
    let want = wanted(1, 200);
    assert_eq!(events, want, "exactly the wanted runs, in order");
    assert_eq!(sub.stats().passed_over, 200 - want.len() as u64);
    assert_eq!(sub.position(0), Some(201), "passed over to the head");
    // The writer laps the reader: the gap is reported from the first
    // sequence it wanted (220; 201..=219 are passed over).
    events.clear();
    for i in 201..=600 {
        w.publish(0, &body(i));
    }
    w.flush();
    while sub.poll_selected(1000, middle_stripe, |e| record(&mut events, e)) > 0 {}
    // Head 600, oldest held 345, resume at 353 (slack 8).
    assert_eq!(events[0], "gap220-352");
    assert_eq!(events[1..], wanted(353, 600)[..]);
    assert_eq!(sub.stats().lost, 352 - 220 + 1);
}

#[test]
fn a_start_sequence_that_left_the_ring_yields_a_gap_then_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _w = filled(dir.path(), 16, 100);
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(3))
        .lap_slack(0)
        .open()
        .expect("sub");
    let mut first = None;
    let mut ticks = Vec::new();
    sub.poll(100, |e| match e {
        Event::Gap { from, to, .. } => first = Some((from, to)),
        Event::Tick(t) => ticks.push(t.seq),
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(first, Some((3, 84)));
    assert_eq!(ticks, (85..=100).collect::<Vec<_>>());
}

#[test]
fn latest_starts_after_the_published_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = filled(dir.path(), 16, 5);
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .open()
        .expect("sub");
    assert!(sub.try_recv().is_none());
    w.publish(0, &body(6));
    w.flush();
    match sub.recv_timeout(Duration::from_secs(5)) {
        Some(Event::Tick(t)) => assert_eq!(t.seq, 6),
        other => panic!("expected seq 6, got {other:?}"),
    }
}

#[test]
fn a_tethered_reader_holds_the_writer_up_to_its_budget_then_is_untethered_and_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cap = 16u64;
    let mut w = TopicWriter::create(dir.path(), TOPIC, 1, cap).expect("writer");
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .tethered(Duration::from_millis(20))
        .open()
        .expect("sub");
    w.flush(); // the writer notices the new tethered reader
    // The reader reads nothing: the writer may fill the ring, then must wait.
    for i in 1..=cap {
        w.publish(0, &body(i));
    }
    assert_eq!(
        w.partition(0).core().stats().gate_waits,
        0,
        "no wait while the ring has room"
    );
    w.publish(0, &body(cap + 1)); // blocks ~20 ms, then untethers the reader
    let stats = w.partition(0).core().stats();
    assert_eq!(stats.untethered, 1);
    assert_eq!(stats.gate_waits, 1);
    assert!(
        stats.gate_wait_ns >= 20_000_000,
        "the writer waited the budget first ({} ns)",
        stats.gate_wait_ns
    );
    w.flush();
    let mut events = Vec::new();
    sub.poll(100, |e| match e {
        Event::Untethered { partition } => events.push(format!("untethered{partition}")),
        Event::Gap { from, to, .. } => events.push(format!("gap{from}-{to}")),
        Event::Tick(t) => events.push(format!("t{}", t.seq)),
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(events.first().map(String::as_str), Some("untethered0"));
    assert!(
        events.iter().any(|e| e.starts_with("gap1-")),
        "the lapped slot shows as a gap: {events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("t17"));
    // Untethered now: the writer never waits for it again.
    for i in cap + 2..=cap * 10 {
        w.publish(0, &body(i));
    }
    assert_eq!(w.partition(0).core().stats().gate_waits, 1);
}

/// An 8-slot ring and a reader tethered to it with `budget`, waiting on the
/// futex after `spins`; the writer has noticed the reader.
fn tiny_ring_tethered(
    dir: &std::path::Path,
    budget: Duration,
    spins: u32,
) -> (TopicWriter, Subscriber) {
    let mut w = TopicWriter::create(dir, TOPIC, 1, 8).expect("writer");
    let sub = Subscriber::builder(TOPIC)
        .node_dir(dir)
        .start(Start::Sequence(1))
        .tethered(budget)
        .wait(WaitStrategy::Futex { spins })
        .open()
        .expect("sub");
    w.flush();
    (w, sub)
}

#[test]
fn a_tethered_reader_that_keeps_up_loses_nothing_with_a_tiny_ring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, mut sub) = tiny_ring_tethered(dir.path(), Duration::from_secs(60), 10);
    let n = 200_000u64;
    let writer = std::thread::spawn(move || {
        for i in 1..=n {
            w.publish(0, &body(i));
            w.flush();
        }
        w
    });
    let mut expect = 1;
    while expect <= n {
        match sub.recv() {
            Event::Tick(t) => {
                assert_eq!(t.seq, expect);
                assert_eq!(t.body.source_seq(), expect);
                expect += 1;
            }
            other => panic!("lossless reader got {other:?}"),
        }
    }
    let w = writer.join().expect("writer");
    assert_eq!(w.partition_untethered(), 0);
}

/// A writer that reaches a tethered reader in the middle of a batch makes
/// what it wrote visible and wakes the reader before it waits, or a reader
/// asleep on the futex and the writer would wait on each other until the
/// budget ran out.
#[test]
fn a_sleeping_tethered_reader_is_woken_when_the_writer_reaches_it_mid_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut w, mut sub) = tiny_ring_tethered(dir.path(), Duration::from_secs(5), 0);
    let n = 200u64;
    let writer = std::thread::spawn(move || {
        // Let the reader fall asleep first.
        std::thread::sleep(Duration::from_millis(50));
        // One batch of 25 ring lengths: flushed only at the end.
        for i in 1..=n {
            w.publish(0, &body(i));
        }
        w.flush();
        w
    });
    let mut expect = 1;
    while expect <= n {
        let got = sub.poll(64, |e| match e {
            Event::Tick(t) => {
                assert_eq!(t.seq, expect);
                expect += 1;
            }
            other => panic!("lossless reader got {other:?}"),
        });
        if got == 0 {
            // Sleeps until woken: only the writer's wake ends this early.
            sub.wait_for_data(Duration::from_secs(3600));
        }
    }
    let w = writer.join().expect("writer");
    assert_eq!(
        w.partition_untethered(),
        0,
        "the writer had to untether the reader: it never woke"
    );
}

trait Untethered {
    fn partition_untethered(self) -> u64;
}
impl Untethered for TopicWriter {
    fn partition_untethered(mut self) -> u64 {
        self.partition(0).core().stats().untethered
    }
}

/// Run as a child process by `a_reader_killed_mid_read_changes_nothing`: a
/// tethered reader that reads a little, then stops forever.
#[test]
fn helper_stalled_reader() {
    let Ok(dir) = std::env::var("TICKWIRE_HELPER_DIR") else {
        return;
    };
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(&dir)
        .start(Start::Sequence(1))
        .tethered(Duration::from_secs(3600))
        .open()
        .expect("helper sub");
    let mut got = 0;
    while got < 3 {
        got += sub.poll(1, |_| {});
    }
    println!("HELPER_READY");
    std::thread::sleep(Duration::from_secs(3600));
}

#[test]
fn a_reader_killed_mid_read_changes_nothing_and_its_slot_is_reclaimed() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let cap = 32u64;
    let mut w = TopicWriter::create(dir.path(), TOPIC, 1, cap).expect("writer");
    let mut other = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .open()
        .expect("other");
    for i in 1..=5 {
        w.publish(0, &body(i));
    }
    w.flush();
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "helper_stalled_reader",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TICKWIRE_HELPER_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn helper");
    let stdout = child.stdout.take().expect("stdout");
    let ready = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("HELPER_READY"));
    assert!(ready, "helper reader did not start");
    w.flush(); // notice the tethered helper
    let live_before = w
        .partition(0)
        .file()
        .ring()
        .readers()
        .iter()
        .filter(|r| r.state_gen.load(std::sync::atomic::Ordering::Acquire) as u32 != 0)
        .count();
    assert_eq!(live_before, 2, "the helper and `other` hold reader slots");
    // SIGKILL, mid-read: it is parked inside a poll loop with a tethered cursor at 4.
    child.kill().expect("kill");
    child.wait().expect("wait");
    // The writer wraps the ring many times: the dead tethered reader must not
    // hold it (its budget is an hour) — its slot is reclaimed instead.
    for i in 6..=cap * 20 {
        w.publish(0, &body(i));
        if i % 8 == 0 {
            w.flush();
        }
    }
    w.flush();
    let stats = w.partition(0).core().stats();
    assert_eq!(stats.reclaimed, 1);
    assert_eq!(stats.untethered, 0);
    let live_after = w
        .partition(0)
        .file()
        .ring()
        .readers()
        .iter()
        .filter(|r| r.state_gen.load(std::sync::atomic::Ordering::Acquire) as u32 != 0)
        .count();
    assert_eq!(live_after, 1, "only `other` still holds a slot");
    // The other reader saw its own stream undisturbed (it was lapped only
    // because it did not read: an exact gap, then contiguous ticks).
    let mut last = 0;
    let mut gaps = 0;
    other.poll(10_000, |e| match e {
        Event::Tick(t) => {
            assert!(last == 0 || t.seq == last + 1);
            last = t.seq;
        }
        Event::Gap { to, .. } => {
            gaps += 1;
            last = to;
        }
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(last, cap * 20);
    assert!(gaps <= 1);
}

/// What `recv_timeout` returns next, as a short string.
fn next(sub: &mut Subscriber) -> String {
    match sub.recv_timeout(Duration::from_secs(10)) {
        Some(Event::Tick(t)) => format!("t{}", t.seq),
        Some(Event::Closed { reason, .. }) => format!("closed {reason:?}"),
        Some(Event::Reopened { epoch, .. }) => format!("reopened {epoch}"),
        Some(Event::Replaced { removed, .. }) => format!("replaced removed={removed}"),
        Some(other) => format!("{other:?}"),
        None => "nothing for 10 s".into(),
    }
}

#[test]
fn recv_returns_when_the_writer_closes_comes_back_or_the_ring_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = filled(dir.path(), 64, 3);
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Earliest)
        .open()
        .expect("sub");
    assert_eq!(next(&mut sub), "t1");
    drop(w); // a graceful shutdown marks the end of the stream
    // Everything committed comes first, then the end, once.
    assert_eq!(next(&mut sub), "t2");
    assert_eq!(next(&mut sub), "t3");
    assert_eq!(next(&mut sub), "closed EndOfStream");
    // A broker restarted on the same rings: the stream goes on.
    let mut w = TopicWriter::create(dir.path(), TOPIC, 1, 64).expect("restart");
    assert_eq!(next(&mut sub), "reopened 2");
    w.publish(0, &body(4));
    w.flush();
    assert_eq!(next(&mut sub), "t4");
    // The node directory removed and a new broker started: the mapped ring
    // is a deleted file that will never change again.
    drop(w);
    assert_eq!(next(&mut sub), "closed EndOfStream");
    std::fs::remove_dir_all(dir.path()).expect("rm");
    let _w = TopicWriter::create(dir.path(), TOPIC, 1, 64).expect("new node");
    assert_eq!(next(&mut sub), "replaced removed=false");
    // Told once; then quiet.
    assert!(sub.recv_timeout(Duration::from_millis(300)).is_none());
}

#[test]
fn recv_returns_when_the_writer_process_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(filled(dir.path(), 64, 2));
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "writer_child_process", "--nocapture"])
        .env("TW_WRITER_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("child");
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let ready = std::io::BufRead::lines(out)
        .take(20)
        .map_while(Result::ok)
        .any(|l| l.contains("writer ready"));
    assert!(ready, "the child opened the ring");
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(3))
        .open()
        .expect("sub");
    assert_eq!(next(&mut sub), "t3", "the child's one event");
    child.kill().expect("kill");
    child.wait().expect("wait");
    // As if it died while filling sequence 4: the slot keeps the WRITING
    // mark (data file offset 4096 + slot 4 x 64), which is not data.
    let ring = dir.path().join("test~ticks.0.ring");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&ring)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &(4u64 | 1 << 63).to_le_bytes(), 4096 + 4 * 64)
        .expect("mark");
    assert_eq!(next(&mut sub), "closed WriterDied");
}

/// Run by `recv_returns_when_the_writer_process_dies` as its own process.
#[test]
fn writer_child_process() {
    let Some(dir) = std::env::var_os("TW_WRITER_CHILD_DIR") else {
        return;
    };
    let mut w = TopicWriter::create(std::path::Path::new(&dir), TOPIC, 1, 64).expect("writer");
    w.publish(0, &body(3));
    w.flush();
    println!("writer ready");
    std::thread::sleep(Duration::from_secs(60));
}
