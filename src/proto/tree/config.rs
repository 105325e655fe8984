//! Tunables of the tree ([`Config`]) and the capacity rule: how many children a peer takes.
//!
//! Intervals and budgets bound the control traffic a node sends and receives (see the module
//! docs of [`super`]); the defaults are the ones the simulator's figures were measured with.
//! Fields added later carry serde defaults so that older configuration files still load.

use serde::{Deserialize, Serialize};

/// Tunables of the tree: the defaults, changed through the builder methods (one per tunable,
/// each named after it), e.g. `Config::default().max_children(Some(8)).rebalance_interval_ms(0)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    // Each tunable is documented on its builder method (`setters!` below).
    pub(crate) max_children: Option<u16>,
    pub(crate) uplink_kbps: u32,
    pub(crate) stream_kbps: u32,
    pub(crate) capacity_limit: u16,
    pub(crate) summary_len: usize,
    pub(crate) directory_len: usize,
    pub(crate) summary_interval_ms: u64,
    pub(crate) directory_interval_ms: u64,
    pub(crate) publish_coalesce_ms: u64,
    pub(crate) join_timeout_ms: u64,
    pub(crate) retry_jitter_ms: u64,
    pub(crate) repair_settle_ms: u64,
    pub(crate) upstream_grace_ms: u64,
    pub(crate) rebalance_interval_ms: u64,
    pub(crate) refuse_memory_ms: u64,
    #[serde(default = "default_repair_timeout_ms")]
    pub(crate) repair_timeout_ms: u64,
    #[serde(default = "default_summary_budget")]
    pub(crate) summary_budget_bytes_per_sec: u32,
}

/// One builder method per tunable: it sets that tunable and returns the config.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {
        impl Config {
            $($(#[$doc])* pub fn $name(mut self, value: $ty) -> Self {
                self.$name = value;
                self
            })*
        }
    };
}

setters! {
    /// Configured maximum children (`--max-children`); `None`: uplink ÷ stream bitrate.
    max_children: Option<u16>;
    /// Measured or configured uplink.
    uplink_kbps: u32;
    /// Bitrate of the stream.
    stream_kbps: u32;
    /// Upper bound of the capacity, whatever the uplink.
    capacity_limit: u16;
    /// Entries in a subtree summary.
    summary_len: usize;
    /// Entries in the directory.
    directory_len: usize;
    /// Minimum gap between two summaries to the parent.
    summary_interval_ms: u64;
    /// Minimum gap between two directories to the children.
    directory_interval_ms: u64;
    /// Delay to coalesce updates that only change the children list.
    publish_coalesce_ms: u64;
    /// A join request without answer after this is considered refused.
    join_timeout_ms: u64;
    /// Retries after a refusal wait a random delay below this.
    retry_jitter_ms: u64;
    /// During this long after losing its parent a node only takes strictly shallower parents.
    repair_settle_ms: u64;
    /// Detached upstream for longer than this: repair ourselves.
    upstream_grace_ms: u64;
    /// Mean gap between two rebalancing checks (0 disables rebalancing).
    rebalance_interval_ms: u64;
    /// A refusing candidate is not asked again for this long.
    refuse_memory_ms: u64;
    /// A repair request (the stream is cut meanwhile) without answer after this (or 4 RTT of the
    /// target when measured, whichever is longer) is considered refused; a late accept is still
    /// taken or released.
    repair_timeout_ms: u64;
    /// Summary bytes per second a parent receives from all its children together (0: no budget):
    /// a child of a parent with `c` slots sends at most `budget / c` bytes per second, and fewer
    /// entries to a parent with many slots.
    summary_budget_bytes_per_sec: u32;
}

fn default_summary_budget() -> u32 {
    400
}

fn default_repair_timeout_ms() -> u64 {
    400
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_children: Some(4),
            uplink_kbps: 0,
            stream_kbps: 1000,
            capacity_limit: 32,
            summary_len: 6,
            directory_len: 8,
            summary_interval_ms: 2_000,
            directory_interval_ms: 4_000,
            publish_coalesce_ms: 1_000,
            join_timeout_ms: 1_000,
            retry_jitter_ms: 150,
            repair_settle_ms: 250,
            upstream_grace_ms: 6_000,
            rebalance_interval_ms: 5_000,
            refuse_memory_ms: 3_000,
            repair_timeout_ms: default_repair_timeout_ms(),
            summary_budget_bytes_per_sec: default_summary_budget(),
        }
    }
}

impl Config {
    /// Maximum children: configured, else measured uplink ÷ stream bitrate; bounded by
    /// `capacity_limit`.
    pub fn capacity(&self) -> u16 {
        let c = match self.max_children {
            Some(c) => c,
            None if self.stream_kbps == 0 => 0,
            None => (self.uplink_kbps / self.stream_kbps).min(u16::MAX as u32) as u16,
        };
        c.min(self.capacity_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_configured_or_measured() {
        assert_eq!(
            Config {
                max_children: Some(3),
                ..Config::default()
            }
            .capacity(),
            3
        );
        let measured = Config {
            max_children: None,
            uplink_kbps: 5_500,
            stream_kbps: 1_000,
            ..Config::default()
        };
        assert_eq!(measured.capacity(), 5);
        let slow = Config {
            max_children: None,
            uplink_kbps: 800,
            stream_kbps: 1_000,
            ..Config::default()
        };
        assert_eq!(
            slow.capacity(),
            0,
            "less than one stream of uplink: leaf only"
        );
    }
}
