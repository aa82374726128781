//! Topics created, grown and deleted while the broker runs.
//!
//! A change is made in this order, so no sender ever routes to a ring a
//! shard does not write, and nothing routed to a topic is lost by its
//! deletion:
//!
//! - **create / grow**: the new partitions' rings are created here (off the
//!   shards), handed to their shards, and only when every shard has taken
//!   its rings is the new [`Layout`] published; senders route to the new
//!   partitions from their next event. Growing changes which partition a
//!   routing key hashes to, as in Pulsar and Kafka: per-key order holds
//!   within each partition's stream, and across the change only by
//!   sequence within each partition.
//! - **delete**: the layout without the topic is published first (senders
//!   get [`SendError::UnknownRoute`](crate::engine::SendError) from their
//!   next event), then after a grace period each shard commits what is
//!   queued and closes the rings (readers see the end of the stream), and
//!   the files are removed (readers see the ring removed). The topic's index
//!   is never reused.
//!
//! Changes are serialized; each waits for the shards, never the reverse.

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tickwire_proto::file::{FileModes, RingParams, readers_path, ring_file_name};
use tickwire_proto::frame::SLOT_SIZE;

use crate::config::Config;
use crate::engine::{
    BrokerError, Layout, Placement, RingSlot, ShardCommand, Shared, TopicOrigin, TopicState,
    check_free, log_ring_open, ring_bytes_missing,
};
use crate::router::RoutingTemplate;

/// How long a deletion waits between unpublishing a topic and closing its
/// rings: a sender that loaded the old layout just before has pushed its
/// event by then.
const DELETE_GRACE: Duration = Duration::from_millis(200);

/// How long a change waits for the shards to take it.
const SHARD_WAIT: Duration = Duration::from_secs(10);

/// The most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 4096;

/// A topic to create.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    /// Name (the rules of ring file names: see
    /// [`validate_topic`](tickwire_proto::file::validate_topic)).
    pub name: String,
    /// Partitions, 1..=4096.
    pub partitions: u32,
    /// Slots per partition ring (a power of two); `None`: the node default.
    pub capacity: Option<u64>,
    /// Routing-key template; `None`: `{symbol}.{exchange}.{kind}`.
    pub template: Option<RoutingTemplate>,
    /// How long its journal keeps events; `None`: the journal's default.
    pub retention: Option<Duration>,
}

/// Why a topic change was refused. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// A field of the request is invalid.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// `name`, `partitions`, `capacity`.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// A live topic has that name.
    #[error("topic {0} already exists")]
    Exists(String),
    /// No live topic has that name.
    #[error("topic {0} not found")]
    NotFound(String),
    /// The change would break something that uses the topic.
    #[error("{0}")]
    Conflict(String),
    /// No room for the rings, or a ring could not be created.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker is stopping, or a shard did not answer.
    #[error("{0}")]
    Unavailable(String),
}

/// What a topic is now, for listings.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
    /// Slots per partition ring.
    pub capacity: u64,
    /// Where it came from.
    pub origin: TopicOrigin,
    /// How long its journal keeps events (`None`: the journal is off, so
    /// events live only as long as their ring slots).
    pub retention: Option<Duration>,
}

struct Rings {
    /// Next ring index per shard.
    counts: Vec<u32>,
    /// Round-robin position for the next partition.
    next_shard: usize,
}

/// Creates, grows and deletes topics of a running broker
/// ([`Broker::topics`](crate::engine::Broker::topics)).
pub struct TopicControl {
    shared: Arc<Shared>,
    dir: PathBuf,
    modes: FileModes,
    default_capacity: u64,
    rings: Mutex<Rings>,
    journal: Option<Arc<crate::journal::Journal>>,
}

impl TopicControl {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: &Config,
        modes: FileModes,
        counts: Vec<u32>,
        next_shard: usize,
        journal: Option<Arc<crate::journal::Journal>>,
    ) -> TopicControl {
        TopicControl {
            shared,
            dir: config.node_dir(),
            modes,
            default_capacity: config
                .topics
                .first()
                .map_or(1 << 16, |t: &crate::config::TopicConfig| t.capacity),
            rings: Mutex::new(Rings { counts, next_shard }),
            journal,
        }
    }

    /// Live topics, by index.
    pub fn list(&self) -> Vec<TopicInfo> {
        self.shared
            .layout
            .load()
            .live()
            .map(|(_, t)| self.info(t))
            .collect()
    }

    /// The topics as they are now, with indexes and tombstones.
    pub fn layout(&self) -> Arc<Layout> {
        self.shared.layout.load()
    }

    /// Creates a topic: its rings exist and are written from the next
    /// event routed to it. A topic whose rings are left on disk from an
    /// earlier run (same capacity) resumes them, sequences continuing, and
    /// has at least as many partitions as are there.
    ///
    /// # Errors
    /// [`TopicError`]; nothing was changed.
    pub fn create(&self, spec: &TopicSpec) -> Result<TopicInfo, TopicError> {
        tickwire_proto::file::validate_topic(&spec.name).map_err(|e| TopicError::Invalid {
            field: "name",
            why: e.to_string(),
        })?;
        check_partitions(spec.partitions)?;
        let capacity = spec.capacity.unwrap_or(self.default_capacity);
        if !capacity.is_power_of_two()
            || !(tickwire_proto::layout::MIN_CAPACITY..=tickwire_proto::layout::MAX_CAPACITY)
                .contains(&capacity)
        {
            return Err(TopicError::Invalid {
                field: "capacity",
                why: format!("{capacity} is not a power of two in 4..=1073741824"),
            });
        }
        let mut rings = self.lock();
        let layout = self.shared.layout.load();
        if layout.index(&spec.name).is_some() {
            return Err(TopicError::Exists(spec.name.clone()));
        }
        // Rings left on disk from an earlier run are resumed, all of them:
        // readers count the partitions on disk.
        let partitions = tickwire_proto::file::topic_partitions(&self.dir, &spec.name)
            .map_err(BrokerError::from)?
            .map_or(spec.partitions, |on_disk| on_disk.max(spec.partitions));
        let index = layout.topics.len() as u32;
        let mut topic = TopicState {
            name: spec.name.clone(),
            partitions: 0,
            capacity,
            template: spec.template.clone().unwrap_or_default(),
            origin: TopicOrigin::Runtime,
            deleted: false,
            placements: Vec::new(),
            readers: Vec::new(),
            retention: spec.retention,
        };
        self.add_partitions(&mut rings, index, &mut topic, partitions, spec.retention)?;
        let mut next = clone_layout(&layout);
        next.topics.push(topic.clone());
        self.shared.layout.replace(next);
        tracing::info!(topic = %spec.name, partitions, asked = spec.partitions, capacity, "topic created");
        Ok(self.info(&topic))
    }

    /// Grows a run-time topic to `partitions` (never fewer than it has).
    /// Keys hash over the new count from the next event on. A configured
    /// topic grows in the configuration file.
    ///
    /// # Errors
    /// [`TopicError`]; nothing was changed.
    pub fn grow(&self, name: &str, partitions: u32) -> Result<TopicInfo, TopicError> {
        check_partitions(partitions)?;
        let mut rings = self.lock();
        let layout = self.shared.layout.load();
        let index = layout
            .index(name)
            .ok_or_else(|| TopicError::NotFound(name.into()))?;
        let mut topic = layout.topics[index as usize].clone();
        if topic.origin == TopicOrigin::Config {
            return Err(TopicError::Conflict(format!(
                "topic {name} is defined in the configuration file: change its partitions there and restart"
            )));
        }
        if partitions < topic.partitions {
            return Err(TopicError::Invalid {
                field: "partitions",
                why: format!(
                    "topic {name} has {} partitions; partitions can grow, never shrink",
                    topic.partitions
                ),
            });
        }
        if partitions == topic.partitions {
            return Ok(self.info(&topic));
        }
        let before = topic.partitions;
        let retention = topic.retention;
        self.add_partitions(&mut rings, index, &mut topic, partitions, retention)?;
        let mut next = clone_layout(&layout);
        next.topics[index as usize] = topic.clone();
        self.shared.layout.replace(next);
        tracing::info!(topic = %name, from = before, to = partitions, "topic grown");
        Ok(self.info(&topic))
    }

    /// Deletes a topic: senders stop routing to it at once, what was
    /// queued for it is committed, its readers see the end of the stream
    /// and then the rings removed, and its files are gone.
    ///
    /// # Errors
    /// [`TopicError::NotFound`]; [`TopicError::Conflict`] for a topic of
    /// the configuration file (it would come back at the next start).
    pub fn delete(&self, name: &str) -> Result<(), TopicError> {
        let _rings = self.lock();
        let layout = self.shared.layout.load();
        let index = layout
            .index(name)
            .ok_or_else(|| TopicError::NotFound(name.into()))?;
        let topic = layout.topics[index as usize].clone();
        if topic.origin == TopicOrigin::Config {
            return Err(TopicError::Conflict(format!(
                "topic {name} is defined in the configuration file (the synthetic feed and the Pulsar bridge write to configured topics): remove it there and restart"
            )));
        }
        let mut next = clone_layout(&layout);
        next.topics[index as usize].deleted = true;
        self.shared.layout.replace(next);
        std::thread::sleep(DELETE_GRACE);
        let mut waits = Vec::new();
        for p in &topic.placements {
            let (done, wait) = std::sync::mpsc::channel();
            self.shared
                .command(p.shard, ShardCommand::Remove { ring: p.ring, done });
            waits.push(wait);
        }
        self.wait(waits, "close the topic's rings")?;
        // The journal writes what the closed rings still hold, then its
        // files go with the topic.
        if let Some(j) = &self.journal {
            j.remove_topic(name);
        }
        for p in 0..topic.partitions {
            let path = self.dir.join(ring_file_name(name, p));
            for f in [readers_path(&path), path] {
                if let Err(e) = std::fs::remove_file(&f)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(file = %f.display(), error = %e, "a deleted topic's file could not be removed");
                }
            }
        }
        tracing::info!(topic = %name, partitions = topic.partitions, "topic deleted");
        Ok(())
    }

    fn info(&self, t: &TopicState) -> TopicInfo {
        TopicInfo {
            name: t.name.clone(),
            partitions: t.partitions,
            capacity: t.capacity,
            origin: t.origin,
            retention: self
                .journal
                .as_ref()
                .map(|j| t.retention.unwrap_or(j.default_retention())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rings> {
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the rings of partitions `topic.partitions..to`, hands each
    /// to a shard and waits until all have them; `topic` gains their
    /// placements. On an error the shards keep what they took (never
    /// routed to, since the layout is not published) and the count of
    /// rings per shard stays consistent.
    fn add_partitions(
        &self,
        rings: &mut Rings,
        index: u32,
        topic: &mut TopicState,
        to: u32,
        retention: Option<Duration>,
    ) -> Result<(), TopicError> {
        let from = topic.partitions;
        check_free(
            &self.dir,
            ring_bytes_missing(&self.dir, &topic.name, from..to, topic.capacity),
        )?;
        let mut writers = Vec::new();
        for p in from..to {
            let w = crate::engine::open_ring(
                &self.dir,
                &RingParams {
                    topic: topic.name.clone(),
                    partition: p,
                    partitions: to,
                    capacity: topic.capacity,
                    slot_size: SLOT_SIZE as u32,
                    modes: self.modes,
                },
                self.journal.as_ref().map(|j| j.root()),
            )?;
            log_ring_open(&topic.name, p, &w, topic.capacity);
            // Before the shard writes it: the journal's cursor comes first.
            if let Some(j) = &self.journal {
                let path = self.dir.join(ring_file_name(&topic.name, p));
                j.add(j.open_partition(&topic.name, p, &path, retention)?);
            }
            writers.push((p, w));
        }
        let n_shards = rings.counts.len();
        let mut waits = Vec::new();
        for (p, writer) in writers {
            let shard = rings.next_shard % n_shards;
            rings.next_shard += 1;
            let ring = rings.counts[shard];
            rings.counts[shard] += 1;
            let readers = Arc::new(AtomicU32::new(0));
            let (done, wait) = std::sync::mpsc::channel();
            self.shared.command(
                shard as u32,
                ShardCommand::Add {
                    ring,
                    slot: Box::new(RingSlot {
                        topic: index,
                        partition: p,
                        writer,
                        readers: readers.clone(),
                    }),
                    done,
                },
            );
            waits.push(wait);
            topic.placements.push(Placement {
                shard: shard as u32,
                ring,
            });
            topic.readers.push(readers);
        }
        self.wait(waits, "take the new rings")?;
        topic.partitions = to;
        Ok(())
    }

    fn wait(
        &self,
        waits: Vec<std::sync::mpsc::Receiver<()>>,
        what: &str,
    ) -> Result<(), TopicError> {
        let deadline = std::time::Instant::now() + SHARD_WAIT;
        for w in waits {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if w.recv_timeout(left).is_err() {
                return Err(TopicError::Unavailable(format!(
                    "the shards did not {what} within {SHARD_WAIT:?} (is the broker stopping?)"
                )));
            }
        }
        Ok(())
    }
}

fn check_partitions(partitions: u32) -> Result<(), TopicError> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(TopicError::Invalid {
            field: "partitions",
            why: format!("{partitions} is not in 1..={MAX_PARTITIONS}"),
        });
    }
    Ok(())
}

fn clone_layout(l: &Layout) -> Layout {
    Layout {
        topics: l.topics.clone(),
    }
}
