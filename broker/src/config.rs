//! One config struct, read from TOML, a default on every field, validated
//! once at start. `config/tickwire.toml` is the commented reference.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("config {path}: {source}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Cause (names the key and line).
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("config: {key}: {why}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// Shard threads.
    pub shards: ShardsConfig,
    /// Topics and their partitions.
    pub topics: Vec<TopicConfig>,
    /// The built-in synthetic feed.
    pub synthetic: SyntheticConfig,
    /// Periodic stats logging.
    pub stats: StatsConfig,
    /// Apache Pulsar in (off by default).
    pub bridge: tickwire_bridge::BridgeConfig,
    /// The remote edge: gRPC, REST, WebSocket.
    pub edge: tickwire_api::EdgeConfig,
    /// The on-disk journal of every committed event.
    pub journal: JournalConfig,
    /// Bars built from the journal, for history.
    pub history: HistoryConfig,
}

/// One-minute bars built from the journal (REST and gRPC history).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Build bars (needs the journal).
    pub enabled: bool,
    /// How long after a minute's end, in event time, its bars are closed
    /// and written; events for a closed minute are counted as late and
    /// left out.
    pub lateness: String,
    /// Events stamped further ahead of the clock than this are left out
    /// of bars (a source with a wrong clock must not close every minute).
    pub max_skew: String,
    /// How long bars are kept (a duration such as `366d`; `forever` keeps
    /// them). Longer than the journal's: bars are what history serves
    /// once the raw events are gone.
    pub retention: String,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            lateness: "5s".into(),
            max_skew: "1m".into(),
            retention: "366d".into(),
        }
    }
}

/// How the journal writes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JournalIo {
    /// io_uring when the kernel allows it, else write(2) (logged).
    Auto,
    /// io_uring, or refuse to start.
    Uring,
    /// write(2).
    Plain,
}

/// The journal: every committed event appended to segment files on disk.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Journal every topic (a gating reader of each ring: ingest slows
    /// rather than the journal skipping).
    pub enabled: bool,
    /// Where; default `<node dir>/journal`, or `/var/tmp/tickwire/<id>/journal`
    /// when the node directory is a tmpfs such as /dev/shm.
    pub dir: Option<PathBuf>,
    /// How long segments are kept, for topics that set no `retention`
    /// (a duration such as `7d`, `12h`).
    pub retention: String,
    /// Most bytes kept per partition (0: no cap); the oldest segments go first.
    pub max_bytes_per_partition: u64,
    /// Frames (64 bytes) per segment file.
    pub segment_frames: u64,
    /// Bytes per write.
    pub write_bytes: usize,
    /// How often written segments are fdatasync'ed (ms; 0: left to the
    /// kernel). What a power loss can take; a killed process loses nothing.
    pub fsync_interval_ms: u64,
    /// `auto`, `uring` or `plain`.
    pub io: JournalIo,
    /// Pin the journal thread, and the bar builder with it, to this core.
    pub core: Option<usize>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            dir: None,
            retention: "7d".into(),
            max_bytes_per_partition: 0,
            segment_frames: tickwire_proto::journal::DEFAULT_SEGMENT_FRAMES,
            write_bytes: 256 * 1024,
            fsync_interval_ms: 1000,
            io: JournalIo::Auto,
            core: None,
        }
    }
}

/// Node identity and where its files live.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node id: the directory name under the shm root.
    pub id: String,
    /// Node directory; default `/dev/shm/tickwire/<id>`.
    pub dir: Option<PathBuf>,
    /// Symbology table capacity (instruments).
    pub symbology_capacity: u32,
    /// Mode of the data files it creates (`.ring`, `symbology`): readers
    /// need read access.
    pub data_file_mode: u32,
    /// Mode of the reader-state files it creates (`.readers`): readers
    /// need read and write access.
    pub reader_file_mode: u32,
    /// Group to give the files it creates (a name or a numeric id), so
    /// readers running as other users in that group can read; default the
    /// broker's own group.
    pub group: Option<String>,
}

/// What a shard does when it has nothing to do.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IdleStrategy {
    /// Spin, then yield, then park (default: keeps cores for others).
    Adaptive,
    /// Spin forever: lowest latency, one core per shard at 100%.
    BusySpin,
}

/// Shard threads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// Number of shard threads.
    pub count: usize,
    /// Pin shard `i` to `cores[i]` (or core `i` when `cores` is empty).
    pub pin: bool,
    /// Core ids for pinning.
    pub cores: Vec<usize>,
    /// Idle behaviour.
    pub idle: IdleStrategy,
    /// Adaptive idle: empty polls spent spinning before yielding.
    pub spin_iterations: u32,
    /// Adaptive idle: empty polls spent yielding before parking.
    pub yield_iterations: u32,
    /// Longest park before looking again, microseconds.
    pub park_timeout_us: u64,
    /// Ingest queue capacity per shard (events).
    pub queue_capacity: usize,
    /// Most events committed per batch (one header publish and wake each).
    pub batch_max: usize,
    /// How often dead readers' slots are looked for, milliseconds.
    pub reclaim_interval_ms: u64,
}

/// One topic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Name, e.g. `market-data/normalized/equities`.
    pub name: String,
    /// Partitions (can grow once the rings exist, never shrink).
    pub partitions: u32,
    /// Slots per partition ring, a power of two.
    pub capacity: u64,
    /// Routing key template: `{symbol}`, `{exchange}`, `{currency}`, `{kind}`
    /// (parsed when the file is read).
    pub routing_key: crate::router::RoutingTemplate,
    /// How long its journal keeps events (default `journal.retention`).
    pub retention: Option<String>,
}

/// The synthetic feed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// On or off.
    pub enabled: bool,
    /// Topic it publishes to.
    pub topic: String,
    /// Events per second (0 = as fast as the shards take them).
    pub rate: u64,
    /// Fraction of events that are quotes.
    pub quote_ratio: f64,
    /// PRNG seed (same seed, same feed).
    pub seed: u64,
}

/// Periodic stats.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// Seconds between stats log lines (0 = off).
    pub log_interval_secs: u64,
}

/// The most ring and symbology bytes one node may configure (1 TiB): a
/// typo in a capacity or partition count is refused before anything is
/// created. Whether the node directory can hold them is checked at start.
pub const MAX_FILE_BYTES: u64 = 1 << 40;

/// Physical memory in bytes (0 if unknown).
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(size as u64)
}

/// A group name, or a numeric id, to its gid.
fn resolve_group(g: &str) -> Option<u32> {
    if let Ok(id) = g.parse::<u32>() {
        return Some(id);
    }
    let name = std::ffi::CString::new(g).ok()?;
    // SAFETY: getgrnam with a NUL-terminated name; the result, if any,
    // points to static storage we read at once (the broker resolves its
    // group once, at start, on one thread).
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return None;
    }
    // SAFETY: non-null result of getgrnam.
    Some(unsafe { (*gr).gr_gid })
}

/// `$TICKWIRE_NODE_DIR` when set and not empty: the node directory every
/// tickwire command and shm-client use unless told otherwise.
pub fn env_node_dir() -> Option<PathBuf> {
    std::env::var_os("TICKWIRE_NODE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The spec's example topic, used by default.
pub const DEFAULT_TOPIC: &str = "market-data/normalized/equities";

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "default".into(),
            dir: None,
            symbology_capacity: tickwire_proto::symbology::DEFAULT_SYMBOLOGY_CAPACITY,
            data_file_mode: 0o640,
            reader_file_mode: 0o660,
            group: None,
        }
    }
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            count: 1,
            pin: false,
            cores: Vec::new(),
            idle: IdleStrategy::Adaptive,
            spin_iterations: 2_000,
            yield_iterations: 200,
            park_timeout_us: 1_000,
            queue_capacity: 65_536,
            batch_max: 256,
            reclaim_interval_ms: 1_000,
        }
    }
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            name: DEFAULT_TOPIC.into(),
            partitions: 4,
            capacity: 1 << 16,
            routing_key: crate::router::RoutingTemplate::default(),
            retention: None,
        }
    }
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            enabled: true,
            topic: DEFAULT_TOPIC.into(),
            rate: 20_000,
            quote_ratio: 0.7,
            seed: 42,
        }
    }
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            log_interval_secs: 10,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: NodeConfig::default(),
            shards: ShardsConfig::default(),
            topics: vec![TopicConfig::default()],
            synthetic: SyntheticConfig::default(),
            stats: StatsConfig::default(),
            bridge: tickwire_bridge::BridgeConfig::default(),
            edge: tickwire_api::EdgeConfig::default(),
            journal: JournalConfig::default(),
            history: HistoryConfig::default(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// Unreadable file, unknown keys, wrong types, invalid values.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text (`path` only names it in errors).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            source: Box::new(e),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// The node directory: `node.dir`, else `/dev/shm/tickwire/<node.id>`.
    /// `tickwire serve` puts `--node-dir`, then `$TICKWIRE_NODE_DIR`
    /// ([`env_node_dir`]), above both; `tickwire tail` and shm-client use
    /// `--node-dir`, then `$TICKWIRE_NODE_DIR`, then
    /// `/dev/shm/tickwire/default`.
    pub fn node_dir(&self) -> PathBuf {
        self.node.dir.clone().unwrap_or_else(|| {
            Path::new(tickwire_proto::file::DEFAULT_SHM_ROOT).join(&self.node.id)
        })
    }

    /// The defaults for the node whose directory is `dir` (its id the
    /// directory's name): what tools reading a node's files assume when
    /// they have no config file.
    pub fn of_node_dir(dir: &Path) -> Config {
        let mut c = Config::default();
        if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
            c.node.id = id.to_string();
        }
        c.node.dir = Some(dir.to_path_buf());
        c
    }

    /// Where the node keeps, unless configured elsewhere, what must outlive
    /// a reboot (the journal, the command store): the node directory,
    /// unless that is a tmpfs (memory, such as /dev/shm, emptied at every
    /// boot), then `/var/tmp/tickwire/<node.id>`.
    pub fn data_dir(&self) -> PathBuf {
        let node_dir = self.node_dir();
        if is_tmpfs(&node_dir) {
            Path::new("/var/tmp/tickwire").join(&self.node.id)
        } else {
            node_dir
        }
    }

    /// The journal's directory (see [`JournalConfig::dir`]).
    pub fn journal_dir(&self) -> PathBuf {
        self.journal
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("journal"))
    }

    /// The edge's settings with the command store resolved: `edge.store_url`,
    /// or when empty a SQLite file in the [data directory](Self::data_dir)
    /// (`command.db`). A store an earlier version kept in a tmpfs node
    /// directory is moved there first, so what it holds is not lost now or
    /// at the next reboot.
    ///
    /// # Errors
    /// The old store exists but could not be moved (named, with the cause).
    pub fn edge_config(&self) -> Result<tickwire_api::EdgeConfig, std::io::Error> {
        let mut edge = self.edge.clone();
        if edge.store_url.is_empty() {
            let data = self.data_dir();
            let node = self.node_dir();
            if data != node {
                move_store(&node, &data)?;
            }
            edge.store_url = format!("sqlite://{}", data.join(STORE_FILE).display());
        }
        Ok(edge)
    }

    /// The journal settings, resolved (call after [`validate`](Self::validate)).
    pub fn journal_settings(&self) -> crate::journal::JournalSettings {
        let j = &self.journal;
        crate::journal::JournalSettings {
            root: self.journal_dir(),
            retention: humantime::parse_duration(&j.retention)
                .unwrap_or(std::time::Duration::from_secs(7 * 86_400)),
            max_bytes: j.max_bytes_per_partition,
            segment_frames: j.segment_frames,
            write_bytes: j.write_bytes,
            fsync: (j.fsync_interval_ms > 0)
                .then(|| std::time::Duration::from_millis(j.fsync_interval_ms)),
        }
    }

    /// The bar builder's settings (call after [`validate`](Self::validate)).
    pub fn bar_settings(&self) -> crate::bars::BarSettings {
        let d = |s: &str, or: u64| {
            humantime::parse_duration(s).unwrap_or(std::time::Duration::from_secs(or))
        };
        crate::bars::BarSettings {
            journal_root: self.journal_dir(),
            lateness: d(&self.history.lateness, 5),
            max_skew: d(&self.history.max_skew, 60),
            retention: (self.history.retention != "forever")
                .then(|| d(&self.history.retention, 366 * 86_400)),
            core: self.journal.core,
        }
    }

    /// The modes and group the broker creates files with; the group name
    /// is resolved here.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for `node.group` naming no group.
    pub fn file_modes(&self) -> Result<tickwire_proto::file::FileModes, ConfigError> {
        let group = match &self.node.group {
            None => None,
            Some(g) => Some(resolve_group(g).ok_or_else(|| ConfigError::Invalid {
                key: "node.group".into(),
                why: format!("{g:?} is not a group on this machine (see /etc/group)"),
            })?),
        };
        Ok(tickwire_proto::file::FileModes {
            data: self.node.data_file_mode,
            readers: self.node.reader_file_mode,
            group,
        })
    }

    /// Bytes of shared memory (or disk) the rings and symbology take.
    pub fn file_bytes(&self) -> u64 {
        let rings: u64 = self
            .topics
            .iter()
            .map(|t| {
                (tickwire_proto::layout::HEADER_SIZE as u64
                    + t.capacity
                        .saturating_mul(tickwire_proto::frame::SLOT_SIZE as u64)
                    + tickwire_proto::layout::READERS_FILE_SIZE as u64)
                    .saturating_mul(t.partitions as u64)
            })
            .fold(0u64, u64::saturating_add);
        rings.saturating_add(
            tickwire_proto::symbology::SYMBOLOGY_HEADER as u64
                + self.node.symbology_capacity as u64
                    * tickwire_proto::symbology::ENTRY_SIZE as u64,
        )
    }

    /// Bytes the shards' ingest queues take.
    pub fn queue_bytes(&self) -> u64 {
        (self.shards.count as u64)
            .saturating_mul(self.shards.queue_capacity as u64)
            .saturating_mul(crate::engine::JOB_BYTES as u64)
    }

    /// Checks every value once.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                why,
            })
        };
        if self.node.id.is_empty()
            || !self
                .node
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || self.node.id.starts_with('.')
        {
            return bad(
                "node.id",
                format!(
                    "{:?} must be letters, digits, '-', '_' or '.'",
                    self.node.id
                ),
            );
        }
        if self.edge.enabled
            && let Err(why) = self.edge.validate()
        {
            // The edge names its own key ("edge.auth: ..."): not twice.
            let (key, why) = match why.split_once(": ") {
                Some((key, rest)) if key.starts_with("edge") => (key.to_string(), rest.to_string()),
                _ => ("edge".to_string(), why),
            };
            return Err(ConfigError::Invalid { key, why });
        }
        if self.node.symbology_capacity == 0 || self.node.symbology_capacity > 1 << 24 {
            return bad(
                "node.symbology_capacity",
                format!("{} is not in 1..=16777216", self.node.symbology_capacity),
            );
        }
        for (key, mode) in [
            ("node.data_file_mode", self.node.data_file_mode),
            ("node.reader_file_mode", self.node.reader_file_mode),
        ] {
            if mode > 0o777 || mode & 0o600 != 0o600 {
                return bad(
                    key,
                    format!("{mode:#o} must be at most 0o777 and give the owner read and write"),
                );
            }
        }
        let s = &self.shards;
        if s.count == 0 || s.count > 256 {
            return bad("shards.count", format!("{} is not in 1..=256", s.count));
        }
        if !s.cores.is_empty() && s.cores.len() < s.count {
            return bad(
                "shards.cores",
                format!("{} cores listed for {} shards", s.cores.len(), s.count),
            );
        }
        if s.queue_capacity < 2 || s.queue_capacity > 1 << 24 {
            return bad(
                "shards.queue_capacity",
                format!("{} is not in 2..=16777216", s.queue_capacity),
            );
        }
        if s.batch_max == 0 || s.batch_max > 1 << 16 {
            return bad(
                "shards.batch_max",
                format!("{} is not in 1..=65536", s.batch_max),
            );
        }
        if s.park_timeout_us == 0 {
            return bad("shards.park_timeout_us", "must be above 0".into());
        }
        if self.topics.is_empty() {
            return bad("topics", "at least one topic is needed".into());
        }
        for (i, t) in self.topics.iter().enumerate() {
            let key = |k: &str| format!("topics[{i}].{k}");
            if let Err(e) = tickwire_proto::file::validate_topic(&t.name) {
                return bad(&key("name"), e.to_string());
            }
            if self.topics[..i].iter().any(|o| o.name == t.name) {
                return bad(&key("name"), format!("{:?} is listed twice", t.name));
            }
            if t.partitions == 0 || t.partitions > 4096 {
                return bad(
                    &key("partitions"),
                    format!("{} is not in 1..=4096", t.partitions),
                );
            }
            if !t.capacity.is_power_of_two()
                || !(tickwire_proto::layout::MIN_CAPACITY..=tickwire_proto::layout::MAX_CAPACITY)
                    .contains(&t.capacity)
            {
                return bad(
                    &key("capacity"),
                    format!("{} is not a power of two in 4..=1073741824", t.capacity),
                );
            }
        }
        let j = &self.journal;
        if let Err(e) = humantime::parse_duration(&j.retention) {
            return bad(
                "journal.retention",
                format!("{:?} is not a duration such as 7d: {e}", j.retention),
            );
        }
        for (k, v) in [
            ("history.lateness", &self.history.lateness),
            ("history.max_skew", &self.history.max_skew),
        ] {
            if let Err(e) = humantime::parse_duration(v) {
                return bad(k, format!("{v:?} is not a duration such as 5s: {e}"));
            }
        }
        let r = &self.history.retention;
        if r != "forever" {
            match humantime::parse_duration(r) {
                Ok(d) if d >= std::time::Duration::from_secs(3600) => {}
                Ok(_) => {
                    return bad(
                        "history.retention",
                        format!("{r:?}: bars are kept at least an hour (or \"forever\")"),
                    );
                }
                Err(e) => {
                    return bad(
                        "history.retention",
                        format!("{r:?} is not a duration such as 366d, nor \"forever\": {e}"),
                    );
                }
            }
        }
        for (i, t) in self.topics.iter().enumerate() {
            if let Some(r) = &t.retention
                && let Err(e) = humantime::parse_duration(r)
            {
                return bad(
                    &format!("topics[{i}].retention"),
                    format!("{r:?} is not a duration such as 7d: {e}"),
                );
            }
        }
        let seg = tickwire_proto::journal::INDEX_EVERY;
        if j.segment_frames < seg
            || !j.segment_frames.is_multiple_of(seg)
            || j.segment_frames > 1 << 26
        {
            return bad(
                "journal.segment_frames",
                format!(
                    "{} is not a multiple of {seg} in {seg}..=67108864",
                    j.segment_frames
                ),
            );
        }
        if !(4096..=64 << 20).contains(&j.write_bytes) || !j.write_bytes.is_multiple_of(64) {
            return bad(
                "journal.write_bytes",
                format!(
                    "{} is not a multiple of 64 in 4096..=67108864",
                    j.write_bytes
                ),
            );
        }
        if self.synthetic.enabled && !self.topics.iter().any(|t| t.name == self.synthetic.topic) {
            return bad(
                "synthetic.topic",
                format!(
                    "{:?} is not one of the configured topics",
                    self.synthetic.topic
                ),
            );
        }
        if self.bridge.enabled {
            if let Err(e) = self.bridge.validate() {
                return Err(ConfigError::Invalid {
                    key: format!("bridge.{}", e.key),
                    why: e.why,
                });
            }
            if !self
                .topics
                .iter()
                .any(|t| t.name == self.bridge.target_topic)
            {
                return bad(
                    "bridge.target_topic",
                    format!(
                        "{:?} is not one of the configured topics",
                        self.bridge.target_topic
                    ),
                );
            }
        }
        let memory = physical_memory();
        if memory > 0 && self.queue_bytes() > memory / 2 {
            return bad(
                "shards.queue_capacity",
                format!(
                    "{} shards x {} events x {} bytes = {} bytes of ingest queues, more than half of this machine's {} bytes of memory",
                    self.shards.count,
                    self.shards.queue_capacity,
                    crate::engine::JOB_BYTES,
                    self.queue_bytes(),
                    memory
                ),
            );
        }
        if self.file_bytes() > MAX_FILE_BYTES {
            return bad(
                "topics",
                format!(
                    "the rings and symbology would take {} bytes (partitions x capacity x 64 per topic), above the {} bytes tickwire allows",
                    self.file_bytes(),
                    MAX_FILE_BYTES
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.synthetic.quote_ratio) {
            return bad(
                "synthetic.quote_ratio",
                format!("{} is not in 0..=1", self.synthetic.quote_ratio),
            );
        }
        Ok(())
    }
}

/// The default command store's file name.
pub const STORE_FILE: &str = "command.db";

/// Moves the SQLite store (`command.db` and its `-wal` and `-shm` files)
/// from `from` to `to`, unless `to` has one already or `from` has none.
/// Copied, then removed (the two may be on different file systems): an
/// error leaves the original in place.
fn move_store(from: &Path, to: &Path) -> Result<(), std::io::Error> {
    let name = |dir: &Path, suffix: &str| dir.join(format!("{STORE_FILE}{suffix}"));
    if !name(from, "").exists() || name(to, "").exists() {
        return Ok(());
    }
    let named = |what: &str, path: &Path, e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("moving the command store: {what} {}: {e}", path.display()),
        )
    };
    std::fs::create_dir_all(to).map_err(|e| named("create", to, e))?;
    let suffixes = ["-wal", "-shm", ""];
    for suffix in suffixes {
        let (src, dst) = (name(from, suffix), name(to, suffix));
        if src.exists() {
            // The main file last, under a temporary name first: a crash
            // part way leaves no store at `to`, and the original intact.
            let tmp = name(to, &format!("{suffix}.moving"));
            std::fs::copy(&src, &tmp).map_err(|e| named("copy", &src, e))?;
            std::fs::rename(&tmp, &dst).map_err(|e| named("rename", &tmp, e))?;
        }
    }
    for suffix in suffixes {
        let src = name(from, suffix);
        if src.exists() {
            std::fs::remove_file(&src).map_err(|e| named("remove", &src, e))?;
        }
    }
    tracing::info!(from = %from.join(STORE_FILE).display(), to = %to.join(STORE_FILE).display(),
        "command store moved out of memory (tmpfs) to disk, where it outlives a reboot");
    Ok(())
}

/// Whether `dir` (or, if it does not exist yet, its nearest existing
/// ancestor: the file system it will be made on) is a tmpfs.
fn is_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(probe) = dir.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a NUL-terminated path and a struct to fill.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type == libc::TMPFS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_store_and_journal_go_to_disk_when_the_node_dir_is_in_memory() {
        let mut c = Config::default();
        c.node.id = "store-test".into();
        // /dev/shm is a tmpfs: emptied at every boot.
        c.node.dir = Some("/dev/shm/tickwire-config-test/none-yet".into());
        if is_tmpfs(Path::new("/dev/shm")) {
            assert_eq!(c.data_dir(), Path::new("/var/tmp/tickwire/store-test"));
            assert_eq!(
                c.journal_dir(),
                Path::new("/var/tmp/tickwire/store-test/journal")
            );
        }
        let disk = tempfile::tempdir().expect("tempdir");
        c.node.dir = Some(disk.path().to_path_buf());
        assert_eq!(c.data_dir(), disk.path());
        assert_eq!(
            c.edge_config().expect("edge config").store_url,
            format!("sqlite://{}/command.db", disk.path().display())
        );
        c.edge.store_url = "postgres://u@h/db".into();
        assert_eq!(
            c.edge_config().expect("edge config").store_url,
            "postgres://u@h/db"
        );
    }

    #[test]
    fn a_store_left_in_memory_is_moved_to_disk_whole_and_never_over_one_there() {
        let (from, to) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let to = to.path().join("node");
        std::fs::write(from.path().join("command.db"), b"main").expect("write");
        std::fs::write(from.path().join("command.db-wal"), b"wal").expect("write");
        move_store(from.path(), &to).expect("move");
        assert_eq!(std::fs::read(to.join("command.db")).expect("read"), b"main");
        assert_eq!(
            std::fs::read(to.join("command.db-wal")).expect("read"),
            b"wal"
        );
        assert!(!to.join("command.db-shm").exists());
        assert!(!from.path().join("command.db").exists());
        assert!(!from.path().join("command.db-wal").exists());
        // One at the destination already: both left as they are.
        std::fs::write(from.path().join("command.db"), b"other").expect("write");
        move_store(from.path(), &to).expect("move");
        assert_eq!(std::fs::read(to.join("command.db")).expect("read"), b"main");
        assert_eq!(
            std::fs::read(from.path().join("command.db")).expect("read"),
            b"other"
        );
    }

    #[test]
    fn the_reference_file_parses_to_the_defaults() {
        let text = include_str!("../../config/tickwire.toml");
        let c = Config::parse(text, Path::new("config/tickwire.toml")).expect("reference config");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::parse("[shards]\ncount = 2\nspeed = 9\n", Path::new("x.toml"))
            .expect_err("unknown key");
        assert!(e.to_string().contains("speed"), "{e}");
        let e = Config::parse(
            "[[topics]]\nname = \"a\"\ncapacity = 1000\n",
            Path::new("x.toml"),
        )
        .expect_err("capacity");
        assert!(e.to_string().contains("topics[0].capacity"), "{e}");
        let e = Config::parse(
            "[[topics]]\nname = \"a\"\nrouting_key = \"{sym}\"\n[synthetic]\nenabled = false\n",
            Path::new("x.toml"),
        )
        .expect_err("template");
        assert!(
            e.to_string().contains("routing_key") && e.to_string().contains("{sym}"),
            "{e}"
        );
        let e = Config::parse("[synthetic]\ntopic = \"nope\"\n", Path::new("x.toml"))
            .expect_err("synthetic topic");
        assert!(e.to_string().contains("synthetic.topic"), "{e}");
        // The edge's own checks name their key once.
        let e = Config::parse(
            "[edge]\ngrpc_addr = \"0.0.0.0:7070\"\n",
            Path::new("x.toml"),
        )
        .expect_err("open edge without auth");
        assert!(
            e.to_string()
                .starts_with("config: edge: serving 0.0.0.0:7070"),
            "{e}"
        );
        let e = Config::parse("[edge]\ncache_interval_ms = 0\n", Path::new("x.toml"))
            .expect_err("interval");
        assert_eq!(
            e.to_string(),
            "config: edge.cache_interval_ms: must be at least 1"
        );
    }

    #[test]
    fn configurations_that_cannot_fit_are_refused_before_anything_starts() {
        let e = Config::parse(
            "[[topics]]\nname = \"a\"\npartitions = 4096\ncapacity = 1073741824\n[synthetic]\nenabled = false\n",
            Path::new("x.toml"),
        )
        .expect_err("256 TiB of rings");
        assert!(
            e.to_string().contains("topics") && e.to_string().contains("bytes"),
            "{e}"
        );
        let e = Config::parse(
            "[shards]\ncount = 256\nqueue_capacity = 16777216\n",
            Path::new("x.toml"),
        )
        .expect_err("queues larger than memory");
        assert!(e.to_string().contains("shards.queue_capacity"), "{e}");
        let e = Config::parse("[node]\ndata_file_mode = 0o1777\n", Path::new("x.toml"))
            .expect_err("mode");
        assert!(e.to_string().contains("node.data_file_mode"), "{e}");
        let c = Config::parse(
            "[node]\ngroup = \"no-such-group-here\"\n",
            Path::new("x.toml"),
        )
        .expect("parses");
        let e = c.file_modes().expect_err("unknown group");
        assert!(e.to_string().contains("node.group"), "{e}");
    }
}
