//! The engine through its ingest API, read back through shm-client.

use std::collections::HashMap;
use std::time::Duration;

use shm_client::{Event, Start, Subscriber, WaitStrategy};
use tickwire_broker::config::{Config, TopicConfig};
use tickwire_broker::engine::{Broker, Completion, Ingest, SendError};
use tickwire_broker::router::Route;
use tickwire_proto::FrameBody;
use tickwire_proto::symbology::Instrument;

const TOPIC: &str = "test/engine";

fn config(dir: &std::path::Path, partitions: u32, shards: usize) -> Config {
    let mut c = Config::default();
    c.node.dir = Some(dir.to_path_buf());
    c.synthetic.enabled = false;
    c.shards.count = shards;
    c.topics = vec![TopicConfig {
        name: TOPIC.into(),
        partitions,
        capacity: 1 << 14,
        ..TopicConfig::default()
    }];
    c
}

#[path = "support/routes.rs"]
mod support;

fn routes(ingest: &mut Ingest, n: usize) -> Vec<Route> {
    support::routes(ingest, TOPIC, n)
}

/// Sends `body` along `route`, retrying on backpressure while draining
/// completions into `done`.
fn send(
    ingest: &mut Ingest,
    route: &Route,
    body: &FrameBody,
    token: u64,
    done: &mut Vec<Completion>,
) {
    loop {
        match ingest.try_send(route, body, Some(token)) {
            Ok(()) => return,
            Err(_) => {
                ingest.drain_completions(|c| done.push(c));
                std::thread::yield_now();
            }
        }
    }
}

#[test]
fn two_million_events_through_two_shards_arrive_in_order_with_a_completion_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), 4, 2);
    cfg.shards.reclaim_interval_ms = 10;
    let broker = Broker::start(&cfg).expect("broker");
    let mut ingest = broker.ingest(4096);
    let rs = routes(&mut ingest, 64);
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .tethered(Duration::from_secs(30))
        .wait(WaitStrategy::SpinThenYield { spins: 100 })
        .open()
        .expect("sub");
    let n: u64 = 2_000_000;
    let producer = std::thread::spawn(move || {
        let mut done = Vec::with_capacity(n as usize);
        for i in 1..=n {
            let route = &rs[(i % rs.len() as u64) as usize];
            let mut body = FrameBody::trade(0, i, i as i64, 1);
            body.source_seq = i;
            send(&mut ingest, route, &body, i, &mut done);
        }
        while done.len() < n as usize {
            ingest.drain_completions(|c| done.push(c));
            std::thread::yield_now();
        }
        done
    });
    let mut next: HashMap<u32, u64> = HashMap::new();
    let mut last_source_seq_per_instrument: HashMap<u32, u64> = HashMap::new();
    let mut got = 0u64;
    while got < n {
        let k = sub.poll(4096, |e| match e {
            Event::Tick(t) => {
                let expected = next.entry(t.partition).or_insert(1);
                assert_eq!(t.seq, *expected, "partition {} continuity", t.partition);
                *expected += 1;
                // Per-key order: one instrument's events keep their order.
                let last = last_source_seq_per_instrument
                    .entry(t.body.instrument_id())
                    .or_insert(0);
                assert!(
                    t.body.source_seq() > *last,
                    "instrument {} reordered",
                    t.body.instrument_id()
                );
                *last = t.body.source_seq();
            }
            other => panic!("lossless subscriber got {other:?}"),
        });
        got += k as u64;
        if k == 0 {
            sub.wait_for_data(Duration::from_millis(10));
        }
    }
    let done = producer.join().expect("producer");
    assert_eq!(done.len() as u64, n);
    let mut tokens: Vec<u64> = done.iter().map(|c| c.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len() as u64, n, "one completion per token");
    assert!(done.iter().all(|c| c.epoch == 1 && c.seq >= 1));
    let stats = broker.stats();
    assert_eq!(stats.events, n);
    // Every committed event is in the ingest -> commit histogram once the
    // shards' housekeeping has merged it (each reclaim interval, 10 ms here).
    let mut recorded = 0;
    for _ in 0..1000 {
        recorded = broker.stats().ingest_to_commit.map_or(0, |h| h.len());
        if recorded == n {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(recorded, n, "histogram samples");
    assert_eq!(sub.stats().lost, 0);
    broker.shutdown();
}

#[test]
fn an_event_carries_the_ingest_time_it_was_sent_with_or_the_clock_at_its_send() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&config(dir.path(), 1, 1)).expect("broker");
    let mut ingest = broker.ingest(16);
    let r = routes(&mut ingest, 1)[0];
    let mut sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .start(Start::Sequence(1))
        .open()
        .expect("sub");
    let ts_event = 1_700_000_000_000_000_000u64;
    let given = ts_event + 1_234_567;
    ingest
        .try_send_at(&r, &FrameBody::trade(0, ts_event, 1, 1), None, given)
        .expect("given time");
    let before = tickwire_proto::futex::realtime_ns();
    let now_event = FrameBody::trade(0, before, 1, 1);
    ingest.try_send(&r, &now_event, None).expect("clock");
    let after = tickwire_proto::futex::realtime_ns();
    let mut ingested = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ingested.len() < 2 && std::time::Instant::now() < deadline {
        if let Some(Event::Tick(t)) = sub.recv_timeout(Duration::from_millis(50)) {
            ingested.push((t.seq, t.body.ts_ingest()));
        }
    }
    assert_eq!(ingested.len(), 2, "both events arrived: {ingested:?}");
    assert_eq!(ingested[0], (1, given));
    assert_eq!(ingested[1].0, 2);
    assert!(
        (before..=after).contains(&ingested[1].1),
        "{before} <= {} <= {after}",
        ingested[1].1
    );
    broker.shutdown();
}

#[test]
fn acks_in_flight_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&config(dir.path(), 1, 1)).expect("broker");
    let mut ingest = broker.ingest(2);
    let r = routes(&mut ingest, 1)[0];
    let b = FrameBody::trade(0, 1, 1, 1);
    ingest.try_send(&r, &b, Some(1)).expect("1");
    ingest.try_send(&r, &b, Some(2)).expect("2");
    assert_eq!(
        ingest.try_send(&r, &b, Some(3)),
        Err(SendError::InFlight(2))
    );
    // Events without a token are not counted against the bound.
    ingest.try_send(&r, &b, None).expect("no token");
    let mut done = Vec::new();
    while done.len() < 2 {
        ingest.drain_completions(|c| done.push(c));
        std::thread::yield_now();
    }
    assert_eq!(
        done.iter().map(|c| (c.token, c.seq)).collect::<Vec<_>>(),
        vec![(1, 1), (2, 2)]
    );
    ingest.try_send(&r, &b, Some(3)).expect("room again");
    // A route this broker never made is refused, not queued.
    let foreign = Route { topic: 7, ..r };
    assert_eq!(
        ingest.try_send(&foreign, &b, None),
        Err(SendError::UnknownRoute {
            topic: 7,
            partition: r.partitions[0]
        })
    );
    assert!(
        !SendError::UnknownRoute {
            topic: 7,
            partition: 0
        }
        .is_backpressure()
    );
    broker.shutdown();
}

#[test]
fn a_restart_bumps_the_epoch_and_readers_resume_without_duplicates_or_silent_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), 2, 1);
    let mut live = Subscriber::builder(TOPIC);
    let mut sent_total = 0u64;
    let mut seen: HashMap<u32, u64> = HashMap::new();
    let mut saved_positions = Vec::new();
    let mut persistent: Option<Subscriber> = None;
    let mut persistent_seen: HashMap<u32, u64> = HashMap::new();
    for round in 1..=3u64 {
        let broker = Broker::start(&cfg).expect("broker");
        let mut ingest = broker.ingest(1024);
        let rs = routes(&mut ingest, 16);
        if round == 1 {
            live = live
                .node_dir(dir.path())
                .start(Start::Sequence(1))
                .tethered(Duration::from_secs(30));
        }
        let mut sub = live.clone().open().expect("sub");
        // A second reader that resumes from positions saved last round.
        let mut resumed = saved_positions
            .iter()
            .fold(
                Subscriber::builder(TOPIC).node_dir(dir.path()),
                |b, &(p, s)| b.resume_at(p, s),
            )
            .start(Start::Sequence(1))
            .open()
            .expect("resumed");
        let mut done = Vec::new();
        for i in 0..10_000u64 {
            let id = sent_total + i + 1;
            let mut body = FrameBody::trade(0, id, 1, 1);
            body.source_seq = id;
            send(&mut ingest, &rs[(i % 16) as usize], &body, id, &mut done);
        }
        while done.len() < 10_000 {
            ingest.drain_completions(|c| done.push(c));
            std::thread::yield_now();
        }
        assert!(
            done.iter().all(|c| c.epoch == round),
            "epoch is {round} after {} restarts",
            round - 1
        );
        sent_total += 10_000;
        // The round's new reader reads everything from seq 1 (the ring holds it all).
        let mut count = 0u64;
        let mut per_partition: HashMap<u32, u64> = HashMap::new();
        while count < sent_total {
            let k = poll_in_sequence(
                &mut sub,
                &mut per_partition,
                "sequences continue across restarts",
            );
            count += k;
            if k == 0 {
                sub.wait_for_data(Duration::from_millis(10));
            }
        }
        // The resumed reader gets exactly what it had not seen.
        let mut fresh = 0u64;
        loop {
            let k = poll_in_sequence(&mut resumed, &mut seen, "no duplicate, no silent gap");
            fresh += k;
            if k == 0 {
                break;
            }
        }
        assert_eq!(
            fresh, 10_000,
            "round {round}: resumed reader got exactly the new events"
        );
        // A reader that stayed mapped through the restarts: its mapping still
        // reads the same files, and it continues after what it saw.
        let p = persistent.get_or_insert_with(|| {
            Subscriber::builder(TOPIC)
                .node_dir(dir.path())
                .start(Start::Sequence(1))
                .open()
                .expect("persistent")
        });
        let mut fresh = 0u64;
        while p.poll(4096, |e| match e {
            Event::Tick(t) => {
                let n = persistent_seen.entry(t.partition).or_insert(0);
                assert_eq!(
                    t.seq,
                    *n + 1,
                    "persistent reader: no duplicate, no silent gap"
                );
                *n = t.seq;
                fresh += 1;
            }
            other => panic!("{other:?}"),
        }) > 0
        {}
        assert_eq!(
            fresh, 10_000,
            "round {round}: the persistent reader got exactly the new events"
        );
        assert_eq!(p.epoch(0), Some(round));
        saved_positions = resumed.positions();
        assert_eq!(sub.epoch(0), Some(round));
        drop(sub);
        broker.shutdown();
    }
}

#[test]
fn a_second_broker_on_the_same_node_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&config(dir.path(), 1, 1)).expect("broker");
    let err = Broker::start(&config(dir.path(), 1, 1))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains(&format!(
            "another writer (pid {}) holds this file",
            std::process::id()
        )),
        "the holder's pid is named: {err}"
    );
    broker.shutdown();
}

#[test]
fn a_shrunk_partition_count_is_refused_with_both_counts_and_growth_is_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    Broker::start(&config(dir.path(), 3, 1))
        .expect("broker")
        .shutdown();
    let err = Broker::start(&config(dir.path(), 2, 1))
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("partition count is 3 on disk but 2 was requested"),
        "{err}"
    );
    // Growing in the configuration is growing the topic: readers see 4.
    let broker = Broker::start(&config(dir.path(), 4, 1)).expect("grown");
    let sub = Subscriber::builder(TOPIC)
        .node_dir(dir.path())
        .open()
        .expect("subscriber");
    assert_eq!(sub.partitions(), [0, 1, 2, 3]);
    drop(sub);
    broker.shutdown();
    // Partition 0 was made when there were 3: only the rings on disk say 4,
    // and going back to 3 would leave partition 3 without a writer.
    let err = Broker::start(&config(dir.path(), 3, 1))
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("partition count is 4 on disk but 3 was requested"),
        "{err}"
    );
}

/// One poll; every tick must follow the last sequence seen on its
/// partition (kept in `last`). Returns the ticks read.
fn poll_in_sequence(sub: &mut Subscriber, last: &mut HashMap<u32, u64>, what: &str) -> u64 {
    sub.poll(4096, |e| match e {
        Event::Tick(t) => {
            let n = last.entry(t.partition).or_insert(0);
            assert_eq!(t.seq, *n + 1, "{what} on partition {}", t.partition);
            *n = t.seq;
        }
        other => panic!("{other:?}"),
    }) as u64
}

/// Symbols (in arrival order) in a topic's rings, per partition merged.
fn symbols_in(dir: &std::path::Path, topic: &str) -> Vec<String> {
    let mut sub = Subscriber::builder(topic)
        .node_dir(dir)
        .start(Start::Earliest)
        .open()
        .expect("subscribe");
    let mut out = Vec::new();
    while sub.poll(4096, |e| {
        if let Event::Tick(t) = e {
            out.push(
                t.instrument()
                    .map(|i| i.symbol().to_string())
                    .unwrap_or_default(),
            );
        }
    }) > 0
    {}
    out
}

fn rule(name: &str, source: &str, target: &str, symbols: &[&str]) -> tickwire_api::RoutingRule {
    tickwire_api::RoutingRule {
        rule_name: name.into(),
        source_pattern: source.into(),
        target_topic: target.into(),
        routing_key_template: Some("{symbol}".into()),
        conditions: tickwire_api::RuleConditions {
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        priority: 1,
        enabled: true,
        created_at: String::new(),
    }
}

#[test]
fn routing_rules_move_matching_events_from_the_next_one_on_for_pulsar_and_synthetic_sources() {
    use tickwire_api::Engine;
    use tickwire_bridge::Sink;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path(), 2, 1);
    c.topics.push(TopicConfig {
        name: "test/vip".into(),
        partitions: 1,
        capacity: 1 << 14,
        ..TopicConfig::default()
    });
    let broker = Broker::start(&c).expect("broker");
    let engine = tickwire_broker::edge::BrokerEngine::new(&broker);
    let mut sink = tickwire_broker::pulsar::IngestSink::new(&broker, TOPIC, 64).expect("sink");
    let event = |symbol: &str| tickwire_bridge::MarketEvent {
        instrument: Instrument {
            symbol: symbol.into(),
            exchange: "XNAS".into(),
            currency: "USD".into(),
            size_decimals: 0,
        },
        kind: tickwire_proto::Kind::Trade,
        ts_event: tickwire_proto::futex::realtime_ns(),
        px_a: tickwire_proto::frame::PRICE_SCALE,
        px_b: tickwire_proto::frame::UNDEF_PRICE,
        size_a: 1,
        size_b: 0,
    };
    let mut seq = 0;
    let mut send = |sink: &mut tickwire_broker::pulsar::IngestSink, source: &str, symbol: &str| {
        seq += 1;
        while sink.try_send(&event(symbol), source, 7, seq, seq).is_err() {
            std::thread::yield_now();
        }
    };
    let us = "persistent://public/default/md-us";
    let eu = "persistent://public/default/md-eu";
    // Before any rule: everything in the configured topic.
    send(&mut sink, us, "AAPL");
    send(&mut sink, eu, "SAP");
    // AAPL from md-* sources goes to test/vip from now on.
    engine
        .set_routing_rules(&[rule("vip", "*/md-*", "test/vip", &["AAPL"])], false)
        .expect("rules");
    send(&mut sink, us, "AAPL");
    send(&mut sink, us, "MSFT");
    send(&mut sink, "persistent://public/default/other", "AAPL");
    // A bad rule is refused naming its field, and changes nothing.
    let e = engine
        .set_routing_rules(&[rule("bad", "*", "no/such", &[])], false)
        .expect_err("unknown topic");
    assert_eq!(e.0, "rules[0].target_topic");
    send(&mut sink, eu, "AAPL");
    // Rules off: back to the configured topic.
    engine.set_routing_rules(&[], false).expect("rules");
    send(&mut sink, us, "AAPL");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut main, mut vip) = (Vec::new(), Vec::new());
    while std::time::Instant::now() < deadline {
        main = symbols_in(dir.path(), TOPIC);
        vip = symbols_in(dir.path(), "test/vip");
        if main.len() + vip.len() == 7 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    main.sort();
    assert_eq!(
        vip,
        ["AAPL", "AAPL"],
        "the rule's matches, while it was in force"
    );
    assert_eq!(main, ["AAPL", "AAPL", "AAPL", "MSFT", "SAP"]);

    // The synthetic feed: its source name is `synthetic`.
    engine
        .set_routing_rules(&[rule("syn", "synthetic", "test/vip", &["MSFT"])], false)
        .expect("rules");
    let before = symbols_in(dir.path(), "test/vip").len();
    let ingest = broker.ingest(1);
    let topic = 0;
    let mut s = c.synthetic.clone();
    s.rate = 20_000;
    let stop = tokio_util::sync::CancellationToken::new();
    let (st, rules) = (stop.clone(), broker.rules().reader());
    let feed = std::thread::spawn(move || {
        tickwire_broker::synthetic::run(ingest, topic, &s, 9, rules, st)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut moved = Vec::new();
    while std::time::Instant::now() < deadline && moved.len() < 3 {
        moved = symbols_in(dir.path(), "test/vip").split_off(before);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.cancel();
    feed.join().expect("feed").expect("ran");
    assert!(
        moved.len() >= 3,
        "the feed's MSFT reached test/vip ({moved:?})"
    );
    assert!(
        moved.iter().all(|s| s == "MSFT"),
        "only MSFT moved: {moved:?}"
    );
    let main_after = symbols_in(dir.path(), TOPIC);
    assert!(main_after.len() > 5, "the feed's other symbols stayed");
    assert_eq!(
        main_after.iter().filter(|s| *s == "MSFT").count(),
        1,
        "no MSFT from the feed in the configured topic (the one is the bridge's)"
    );
    broker.shutdown();
}

fn instrument(symbol: &str) -> Instrument {
    Instrument {
        symbol: symbol.into(),
        exchange: "XNAS".into(),
        currency: "USD".into(),
        size_decimals: 0,
    }
}

/// Reads until `want` ticks arrived (or 10 s passed), checking each
/// partition's sequences are contiguous; returns the ticks per partition
/// and every other event seen.
fn read_ticks(
    sub: &mut Subscriber,
    want: usize,
    last: &mut HashMap<u32, u64>,
) -> (HashMap<u32, usize>, Vec<String>) {
    let mut per = HashMap::new();
    let mut other = Vec::new();
    let mut n = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while n < want && std::time::Instant::now() < deadline {
        match sub.recv_timeout(Duration::from_millis(50)) {
            Some(Event::Tick(t)) => {
                if let Some(prev) = last.insert(t.partition, t.seq) {
                    assert_eq!(t.seq, prev + 1, "partition {} in order", t.partition);
                }
                *per.entry(t.partition).or_insert(0) += 1;
                n += 1;
            }
            Some(e) => other.push(format!("{e:?}")),
            None => {}
        }
    }
    assert_eq!(n, want, "every event sent arrived ({per:?}, {other:?})");
    (per, other)
}

#[test]
fn a_topic_created_grown_and_deleted_at_run_time_is_written_read_and_removed() {
    use tickwire_broker::topics::{TopicError, TopicSpec};
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(&config(dir.path(), 2, 2)).expect("broker");
    let topics = broker.topics();
    let mut ingest = broker.ingest(4096);
    let mut done = Vec::new();
    assert!(ingest.resolver().topic("rt/new").is_none());

    let spec = TopicSpec {
        name: "rt/new".into(),
        partitions: 2,
        capacity: Some(1 << 12),
        template: None,
        retention: None,
    };
    let info = topics.create(&spec).expect("created");
    assert_eq!((info.partitions, info.capacity), (2, 1 << 12));
    assert!(matches!(topics.create(&spec), Err(TopicError::Exists(_))));
    let mut sub = Subscriber::builder("rt/new")
        .node_dir(dir.path())
        .start(Start::Earliest)
        .open()
        .expect("the new topic's rings are there");
    let topic = ingest.resolver().topic("rt/new").expect("routable at once");
    let symbols: Vec<String> = (0..64).map(|i| format!("S{i}")).collect();
    let mut token = 0;
    let mut send_all = |ingest: &mut Ingest, done: &mut Vec<Completion>| {
        for s in &symbols {
            let route = ingest
                .resolver()
                .route(topic, &instrument(s))
                .expect("route");
            token += 1;
            send(ingest, &route, &FrameBody::default(), token, done);
        }
    };
    send_all(&mut ingest, &mut done);
    let mut last = HashMap::new();
    let (per, _) = read_ticks(&mut sub, 64, &mut last);
    assert_eq!(per.len(), 2, "both partitions written: {per:?}");

    // Growing: the open subscriber takes on partitions 2 and 3, keys hash
    // over 4 from the next event, and nothing is lost.
    let e = topics.grow("rt/new", 1).expect_err("shrink");
    assert!(e.to_string().contains("never shrink"), "{e}");
    assert_eq!(topics.grow("rt/new", 4).expect("grown").partitions, 4);
    assert_eq!(ingest.resolver().partitions(topic), Some(4));
    send_all(&mut ingest, &mut done);
    let (per, other) = read_ticks(&mut sub, 64, &mut last);
    assert_eq!(
        per.keys().copied().max(),
        Some(3),
        "the new partitions are written and read: {per:?}"
    );
    assert_eq!(
        other
            .iter()
            .filter(|e| e.contains("PartitionAdded"))
            .count(),
        2,
        "{other:?}"
    );
    let fresh = Subscriber::builder("rt/new")
        .node_dir(dir.path())
        .open()
        .expect("subscriber");
    assert_eq!(fresh.partitions(), [0, 1, 2, 3]);
    drop(fresh);
    ingest.drain_completions(|c| done.push(c));

    // Deleting: routing stops at once, readers see the end and the removal,
    // the files go, and nothing in flight was orphaned.
    let old_route = ingest
        .resolver()
        .route(topic, &instrument("S1"))
        .expect("route");
    topics.delete("rt/new").expect("deleted");
    assert!(ingest.resolver().topic("rt/new").is_none());
    assert!(matches!(
        ingest.try_send(&old_route, &FrameBody::default(), None),
        Err(SendError::UnknownRoute { .. })
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut removed = false;
    while !removed && std::time::Instant::now() < deadline {
        if let Some(Event::Replaced { removed: r, .. }) =
            sub.recv_timeout(Duration::from_millis(50))
        {
            removed = r;
        }
    }
    assert!(removed, "the reader was told the rings were removed");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rt"))
        .collect();
    assert!(left.is_empty(), "no files of the deleted topic: {left:?}");
    assert!(matches!(
        topics.delete("rt/new"),
        Err(TopicError::NotFound(_))
    ));
    // The name can be used again, from sequence 0.
    topics.create(&spec).expect("created again");
    let again = ingest.resolver().topic("rt/new").expect("routable");
    assert_ne!(again, topic, "a topic index is never reused");
    ingest.drain_completions(|c| done.push(c));
    assert_eq!(done.len(), 128, "a completion for every event sent");
    let stats = broker.stats();
    assert_eq!((stats.orphaned, stats.lost_completions), (0, 0));
    assert_eq!(
        stats
            .readers
            .iter()
            .map(|(t, _)| t.as_str())
            .collect::<Vec<_>>(),
        [TOPIC, "rt/new"]
    );
    broker.shutdown();
}
