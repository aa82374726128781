//! The best shared-memory peer: iceoryx2 publish-subscribe, configured for
//! each case: one 64-byte event per sample, or 64 events per slice sample;
//! lossless (no safe overflow, the publisher retries until delivered) for
//! the 1:1 cases, like tickwire's tethered reader.

use iceoryx2::port::backpressure_strategy::BackpressureStrategy;
use iceoryx2::prelude::*;

use crate::{Mode, Op, ReaderProc, Run, Tally, drive, payload, pin};

/// Events per slice sample in slice mode.
pub const SLICE: usize = 64;
/// Subscriber buffer (samples).
const BUFFER: usize = 256;

type Event64 = [u64; 8];

/// The service, configured the same way by the publisher and every
/// subscriber (`open_or_create` has separate impls for sized and slice
/// payloads, hence a macro rather than a generic function).
macro_rules! service {
    ($node:expr, $name:expr, $payload:ty, $readers:expr) => {
        $node
            .service_builder($name)
            .publish_subscribe::<$payload>()
            .subscriber_max_buffer_size(BUFFER)
            .history_size(0)
            .enable_safe_overflow(false)
            .max_subscribers($readers.max(1))
            .open_or_create()
            .map_err(|e| format!("iceoryx2 service: {e:?}"))
    };
}

fn service_name(tag: &str) -> String {
    format!("tickwire-bench/{}/{tag}", std::process::id())
}

/// Runs the writer with `readers` subscriber processes. `slice` sends 64
/// events per sample.
///
/// # Errors
/// iceoryx2 or process failures.
pub fn run(
    mode: Mode,
    run: &Run,
    readers: usize,
    slice: bool,
    tag: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let name = service_name(tag);
    let node = NodeBuilder::new()
        .create::<ipc::Service>()
        .map_err(|e| format!("iceoryx2 node: {e:?}"))?;
    let svc_name: ServiceName = name
        .as_str()
        .try_into()
        .map_err(|e| format!("service name: {e:?}"))?;
    let reader_args = |mode: Mode| {
        vec![
            "--system".to_string(),
            if slice {
                "iceoryx2_slice64".into()
            } else {
                "iceoryx2".into()
            },
            "--mode".into(),
            mode.name().into(),
            "--path".into(),
            name.clone(),
            "--core".into(),
            run.reader_core.to_string(),
            "--readers".into(),
            readers.to_string(),
        ]
    };
    // Lossless in every case: the publisher waits for a full subscriber.
    let strategy = BackpressureStrategy::RetryUntilDelivered;
    if slice {
        let svc = service!(node, &svc_name, [Event64], readers)?;
        let publisher = svc
            .publisher_builder()
            .initial_max_slice_len(SLICE)
            .backpressure_strategy(strategy)
            .create()
            .map_err(|e| format!("iceoryx2 publisher: {e:?}"))?;
        let procs = spawn_all(readers, &reader_args(mode))?;
        pin(run.writer_core);
        let mut failed = None;
        let mut flush = |batch: &mut Vec<Event64>| {
            if batch.is_empty() {
                return;
            }
            let r = publisher
                .loan_slice_uninit(batch.len())
                .map_err(|e| format!("{e:?}"))
                .and_then(|s| {
                    let s = s.write_from_fn(|k| batch[k]);
                    s.send().map_err(|e| format!("{e:?}"))
                });
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
            batch.clear();
        };
        let paced = mode != Mode::Max;
        let mut pending: Vec<Event64> = Vec::with_capacity(SLICE);
        drive(mode, run, |op| {
            if let Op::Publish(i, ts) = op {
                pending.push(payload(i, ts));
                if pending.len() == SLICE || paced || i == crate::END {
                    flush(&mut pending);
                }
            }
        });
        if let Some(e) = failed {
            procs.into_iter().for_each(ReaderProc::kill);
            return Err(format!("iceoryx2 send: {e}"));
        }
        crate::results(procs)
    } else {
        let svc = service!(node, &svc_name, Event64, readers)?;
        let publisher = svc
            .publisher_builder()
            .backpressure_strategy(strategy)
            .create()
            .map_err(|e| format!("iceoryx2 publisher: {e:?}"))?;
        let procs = spawn_all(readers, &reader_args(mode))?;
        pin(run.writer_core);
        let mut failed = None;
        drive(mode, run, |op| {
            if let Op::Publish(i, ts) = op {
                let r = publisher
                    .loan_uninit()
                    .map_err(|e| format!("{e:?}"))
                    .and_then(|s| {
                        s.write_payload(payload(i, ts))
                            .send()
                            .map_err(|e| format!("{e:?}"))
                    });
                if let Err(e) = r {
                    failed.get_or_insert(e);
                }
            }
        });
        if let Some(e) = failed {
            procs.into_iter().for_each(ReaderProc::kill);
            return Err(format!("iceoryx2 send: {e}"));
        }
        crate::results(procs)
    }
}

fn spawn_all(readers: usize, args: &[String]) -> Result<Vec<ReaderProc>, String> {
    let mut procs = Vec::new();
    for _ in 0..readers {
        match ReaderProc::spawn(args) {
            Ok(p) => procs.push(p),
            Err(e) => {
                procs.into_iter().for_each(ReaderProc::kill);
                return Err(e);
            }
        }
    }
    // Let the publisher see the new subscribers before the first send.
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(procs)
}

/// The subscriber process.
///
/// # Errors
/// iceoryx2 failures.
pub fn reader(
    mode: Mode,
    name: &str,
    core: usize,
    slice: bool,
    readers: usize,
) -> Result<serde_json::Value, String> {
    pin(core);
    let node = NodeBuilder::new()
        .create::<ipc::Service>()
        .map_err(|e| format!("iceoryx2 node: {e:?}"))?;
    let svc_name: ServiceName = name
        .try_into()
        .map_err(|e| format!("service name: {e:?}"))?;
    let mut tally = Tally::new(mode == Mode::Paced);
    let spin = mode != Mode::Fanout;
    let idle = || {
        if spin {
            std::hint::spin_loop()
        } else {
            std::thread::yield_now()
        }
    };
    if slice {
        let svc = service!(node, &svc_name, [Event64], readers)?;
        let sub = svc
            .subscriber_builder()
            .create()
            .map_err(|e| format!("iceoryx2 subscriber: {e:?}"))?;
        println!("READY");
        'outer: loop {
            match sub.receive().map_err(|e| format!("{e:?}"))? {
                Some(sample) => {
                    for w in sample.payload() {
                        if !tally.take(w) {
                            break 'outer;
                        }
                    }
                }
                None => idle(),
            }
        }
    } else {
        let svc = service!(node, &svc_name, Event64, readers)?;
        let sub = svc
            .subscriber_builder()
            .create()
            .map_err(|e| format!("iceoryx2 subscriber: {e:?}"))?;
        println!("READY");
        loop {
            match sub.receive().map_err(|e| format!("{e:?}"))? {
                Some(sample) => {
                    if !tally.take(&*sample) {
                        break;
                    }
                }
                None => idle(),
            }
        }
    }
    Ok(tally.to_json())
}
