//! The configuration of a `tickwire serve` process in a test.

use std::path::{Path, PathBuf};

/// Writes `<dir>/tickwire.toml`: the node on `<dir>/node` (with
/// `node_extra` added to `[node]`), the synthetic feed at 5,000 events/s,
/// stats every second, the edge on ports of its own. Returns its path.
pub fn write(dir: &Path, node_extra: &str) -> PathBuf {
    let cfg = dir.join("tickwire.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndir = {:?}\n{node_extra}\n[synthetic]\nrate = 5000\n[stats]\nlog_interval_secs = 1\n[edge]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n",
            dir.join("node").display().to_string()
        ),
    )
    .expect("config");
    cfg
}
