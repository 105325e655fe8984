//! Deterministic simulator of the relay tree: thousands of rooms ([`RoomNode`], each over its
//! [`TreeNode`]) in virtual time.
//!
//! The simulator runs the very state machines the node runs, the room layer included (the
//! child-connect deadline, the probe before a link is declared down, one snapshot request in
//! flight). It plays the shell: it delivers [`RoomOutput::SendControl`] and
//! [`RoomOutput::Publish`] after a per-link latency, answers [`RoomOutput::RequestSnapshot`] by
//! asking a random attached member for [`TreeNode::snapshot_for_newcomer`] (every member can
//! answer; the node asks the broadcaster, which would put every newcomer's request on the root's
//! books here), reports a child's media connection to its parent
//! ([`RoomNode::handle_child_connected`]) three link latencies after the child was told to
//! connect (offer, answer, DTLS), answers probes of live peers after a round trip, answers record
//! checks with "live" (the broadcaster never leaves a simulated room), fires timers, and plays the
//! transport's liveness detection: a crashed peer's neighbours notice after a detection delay,
//! either as a failed media link ([`RoomNode::handle_link_down`], the default) or as a closed
//! connection they must probe ([`CrashDetection::ConnectionClosed`]).
//!
//! Everything is driven by one seeded generator and one event queue ordered by (time, sequence
//! number), so the same [`SimConfig`] always yields the same trace and the same [`SimReport`].
//!
//! Ground truth is kept beside the nodes: the edge child -> parent exists while the child names the
//! parent and the parent is alive; a node "has a path to the root" when following edges reaches the
//! root. Invariants are checked incrementally, exactly: a cycle can only close when an edge is
//! added, so every new edge walks up to the root; capacity is checked after every call into a node;
//! every live node without a path is checked against the repair bound once per simulated second.
//!
//! One file, about 1.6k lines: the event loop, the ground truth and the report share the
//! simulator's state and are read together when a figure looks wrong; the rules themselves are
//! all in [`super::tree`] and [`super::room`].
//!
//! Traffic accounting counts the CBOR size of every message a node sends or receives (see
//! [`TreeMsg::wire_len`]), plus an edge keep-alive (by default 1 message of 20 bytes per second
//! each way per tree edge, standing for what the transport's liveness costs), plus snapshot
//! requests and replies. Nothing is gossiped to the whole room, so nothing else is received.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::room::{RoomEvent, RoomNode, RoomOutput, RoomTimings};
use super::tree::{Config, JoinKind, Snapshot, TreeEvent, TreeMsg, TreeNode, TreeUpdate};
use super::{Millis, NodeId, SplitMix64};

/// Bytes a signature and envelope add to a published update.
const SIGNATURE_OVERHEAD: usize = 64 + 8;
/// Bytes of a snapshot request.
const SNAPSHOT_REQUEST_BYTES: usize = 48;
/// Candidates in a snapshot.
const SNAPSHOT_LEN: usize = 8;

/// Kinds of received control traffic, for the breakdown of the busiest viewer.
const RX_KINDS: [&str; 16] = [
    "Join(New)",
    "Accept",
    "Refuse",
    "Leave",
    "Summary",
    "Directory",
    "Relocate",
    "Update",
    "SnapshotRequest",
    "Snapshot",
    "KeepAlive",
    "Join(Repair)",
    "Join(Move)",
    "Join(Handover)",
    "Join(Promote)",
    "MoveUnder",
];

fn msg_kind(m: &TreeMsg) -> usize {
    match m {
        TreeMsg::Join { kind, .. } => match kind {
            JoinKind::New => 0,
            JoinKind::Repair => 11,
            JoinKind::Move => 12,
            JoinKind::Handover => 13,
            JoinKind::Promote => 14,
        },
        TreeMsg::MoveUnder { .. } => 15,
        TreeMsg::Accept { .. } => 1,
        TreeMsg::Refuse { .. } => 2,
        TreeMsg::Leave { .. } => 3,
        TreeMsg::Summary { .. } => 4,
        TreeMsg::Directory { .. } => 5,
        _ => 6,
    }
}

/// How capacities (maximum children) are drawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CapacityDist {
    /// Every viewer has `fanout` slots.
    Fixed,
    /// Mixed relative to the fanout K: 15% leaf only (0), 25% K/2, 40% K, 20% 2K.
    Heterogeneous,
    /// Explicit (weight, capacity) pairs.
    Weighted(Vec<(f64, u16)>),
}

/// A mass departure: `fraction` of the live viewers leave at `at_secs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MassDeparture {
    /// When.
    pub at_secs: f64,
    /// Fraction of the live viewers.
    pub fraction: f64,
    /// Graceful leave (true) or crash (false).
    pub graceful: bool,
}

/// How the neighbours of a crashed peer learn of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrashDetection {
    /// The media transport fails (connection state, RTCP): the link is down at once.
    #[default]
    Transport,
    /// Only the control connection closes: the neighbour probes, and declares the link down when
    /// the probe goes unanswered.
    ConnectionClosed,
}

/// Parameters of one simulated run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Viewers (the broadcaster comes on top).
    pub nodes: usize,
    /// Nominal fanout K (broadcaster's capacity and the reference of [`CapacityDist`]).
    pub fanout: u16,
    /// Mean session length (exponential); `None`: nobody leaves by churn. Each departure is
    /// replaced by a newcomer so the room keeps its size.
    pub churn_mean_secs: Option<f64>,
    /// Simulated time.
    pub duration_secs: f64,
    /// Seed of everything random.
    pub seed: u64,
    /// Mean one-way latency of a link; each link gets a fixed latency in [0.5, 1.5) × this.
    pub link_latency_ms: f64,
    /// Capacities of the viewers.
    pub capacity: CapacityDist,
    /// Arrival rate of the initial join wave.
    pub join_rate_per_sec: f64,
    /// Share of churn departures that are crashes (the rest leave gracefully).
    pub crash_fraction: f64,
    /// A crash is noticed by each neighbour after a delay uniform in this range (transport
    /// liveness: connection state and RTCP along the edge).
    pub crash_detect_ms: (u64, u64),
    /// Optional mass departure (not replaced).
    pub mass_departure: Option<MassDeparture>,
    /// Optional crash of all the root's children at once (not replaced).
    pub kill_root_children_at_secs: Option<f64>,
    /// A live node without a path to the root for longer than this violates the repair bound.
    pub repair_bound_secs: f64,
    /// Depth sampling period.
    pub sample_interval_secs: f64,
    /// Keep-alive bytes per second per tree edge and direction.
    pub keepalive_bytes_per_sec: f64,
    /// Nodes living less than this are left out of the per-node traffic figures.
    pub min_lifetime_for_traffic_secs: f64,
    /// The tree's tunables (capacity is overridden per viewer).
    pub tree: Config,
    /// The room layer's deadlines.
    #[serde(default)]
    pub room: RoomTimings,
    /// How a crash is noticed by the crashed peer's neighbours.
    #[serde(default)]
    pub crash_detection: CrashDetection,
    /// Share of arrivals that vanish right after sending their first join request, before any
    /// answer: the candidate that accepts them never hears from them again (their media never
    /// connects, nobody's transport notices).
    #[serde(default)]
    pub ghost_joiner_fraction: f64,
    /// Closes of the control connection of each tree edge per hour, both peers alive (idle
    /// timeouts, NAT rebinding): both ends probe each other, and the edge must survive.
    #[serde(default)]
    pub connection_drops_per_edge_per_hour: f64,
    /// Share of (child, parent) pairs whose media never connects, both peers alive and their
    /// control traffic fine (two NATs that defeat hole punching, no TURN): the ICE checks go
    /// unanswered and neither side hears of the other's media. Drawn per pair from the seed.
    #[serde(default)]
    pub unreachable_pair_fraction: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 1000,
            fanout: 4,
            churn_mean_secs: Some(600.0),
            duration_secs: 600.0,
            seed: 1,
            link_latency_ms: 50.0,
            capacity: CapacityDist::Heterogeneous,
            join_rate_per_sec: 200.0,
            crash_fraction: 0.2,
            crash_detect_ms: (500, 1000),
            mass_departure: None,
            kill_root_children_at_secs: None,
            repair_bound_secs: 30.0,
            sample_interval_secs: 5.0,
            keepalive_bytes_per_sec: 20.0,
            min_lifetime_for_traffic_secs: 60.0,
            tree: Config::default(),
            room: RoomTimings::default(),
            crash_detection: CrashDetection::Transport,
            ghost_joiner_fraction: 0.0,
            connection_drops_per_edge_per_hour: 0.0,
            unreachable_pair_fraction: 0.0,
        }
    }
}

/// Percentiles of a distribution.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Dist {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Dist {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Invariant violations (all must be 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Violations {
    /// Edges that closed a cycle.
    pub cycles: u64,
    /// Times a node held more children than its capacity.
    pub over_capacity: u64,
    /// Outages longer than the repair bound.
    pub unrepaired: u64,
    /// Ground-truth bookkeeping disagreed with a full recount (simulator bug).
    pub bookkeeping: u64,
}

impl Violations {
    /// Sum of all.
    pub fn total(&self) -> u64 {
        self.cycles + self.over_capacity + self.unrepaired + self.bookkeeping
    }
}

/// Result of a run. `Display` is the human table; serde gives the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// The configuration.
    pub config: SimConfig,
    /// ceil(log_K N).
    pub ideal_depth: u32,
    /// Depth of attached viewers, over all samples.
    pub depth: Dist,
    /// Deepest viewer at the end.
    pub final_max_depth: u32,
    /// Depth of attached viewers over the samples of the steady state: from 60 s after the
    /// initial join wave (`nodes / join_rate_per_sec`) on. The wave is a flash crowd of the whole
    /// room; this is the room under churn alone.
    pub steady_depth: Dist,
    /// The deepest viewer of each steady-state sample: under churn the tree's maximum is a
    /// moving figure (a subtree sinks when its relay leaves, and rebalancing lifts it back within
    /// seconds), so its distribution says more than its single worst value.
    #[serde(default)]
    pub steady_sample_max: Dist,
    /// Fraction of the steady-state samples whose deepest viewer is within ideal + 1.
    #[serde(default)]
    pub steady_samples_within_ideal_plus_one: f64,
    /// Time of the last sample (of all, join wave included) whose deepest viewer was deeper
    /// than ideal + 1, in seconds; `None` if there was none. Without churn: how long the tree
    /// took to settle after the flash crowd.
    #[serde(default)]
    pub last_sample_over_ideal_plus_one_secs: Option<f64>,
    /// Control bytes received per viewer per second in the steady state (each viewer's time
    /// after the steady state began, at least `min_lifetime_for_traffic_secs` of it).
    pub steady_rx_bytes_per_sec: Dist,
    /// Time from arrival to a path to the root, ms.
    pub join_ms: Dist,
    /// Each outage (time without a path to the root) of a viewer that got repaired, ms.
    pub outage_ms: Dist,
    /// The outages that began with a crash (they include the transport's detection delay).
    pub outage_crash_ms: Dist,
    /// The outages that began otherwise (graceful leave, moves, self-repair).
    pub outage_other_ms: Dist,
    /// Repair time as the orphan sees it: from noticing the loss to the new parent's accept, ms.
    pub repair_ms: Dist,
    /// Fraction of viewer-time with a path to the root.
    pub continuity: f64,
    /// Control bytes received per viewer per second.
    pub rx_bytes_per_sec: Dist,
    /// Control messages received per viewer per second.
    pub rx_msgs_per_sec: Dist,
    /// Control bytes sent per viewer per second.
    pub tx_bytes_per_sec: Dist,
    /// Control bytes the broadcaster received per second.
    pub root_rx_bytes_per_sec: f64,
    /// What the viewer that received the most per second received, by kind, bytes per second.
    pub busiest_rx_bytes_per_sec: std::collections::BTreeMap<String, f64>,
    /// Viewers that arrived.
    pub arrivals: u64,
    /// Graceful departures.
    pub leaves: u64,
    /// Crashes.
    pub crashes: u64,
    /// Live viewers at the end.
    pub live_at_end: u64,
    /// Of which with a path to the root.
    pub attached_at_end: u64,
    /// Invariant violations.
    pub violations: Violations,
    /// Simulated events processed.
    pub events: u64,
    /// Join requests refused, by reason.
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// Join requests sent.
    pub join_requests: u64,
    /// Links the room layer declared down, by cause.
    #[serde(default)]
    pub links_down: std::collections::BTreeMap<String, u64>,
    /// Probes sent after a closed connection, and of them answered.
    #[serde(default)]
    pub probes: u64,
    /// Probes answered (the edge was kept).
    #[serde(default)]
    pub probes_answered: u64,
    /// Children that live peers listed at the end although they had departed for longer than
    /// the repair bound: slots lost to ghosts.
    #[serde(default)]
    pub stale_children_at_end: u64,
    /// Media connections attempted over an unreachable pair (see
    /// [`SimConfig::unreachable_pair_fraction`]), and of them, attempts a child made again to a
    /// parent it had already failed to reach.
    #[serde(default)]
    pub unreachable_attempts: u64,
    /// Repeated attempts to a parent already found unreachable.
    #[serde(default)]
    pub unreachable_repeats: u64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "waterfall sim: {} viewers, fanout {}, churn mean {}, {} s simulated, seed {}",
            c.nodes,
            c.fanout,
            c.churn_mean_secs
                .map_or("off".to_string(), |m| format!("{m} s")),
            c.duration_secs,
            c.seed
        )?;
        writeln!(
            f,
            "  depth            mean {:.2}  p50 {:.0}  p99 {:.0}  max {:.0} over all samples  (final max {}; ideal ceil(log_K N) = {})",
            self.depth.mean,
            self.depth.p50,
            self.depth.p99,
            self.depth.max,
            self.final_max_depth,
            self.ideal_depth
        )?;
        if self.steady_depth.count > 0 {
            writeln!(
                f,
                "    steady state   mean {:.2}  p50 {:.0}  p99 {:.0}  max {:.0}  (from 60 s after the join wave on)",
                self.steady_depth.mean,
                self.steady_depth.p50,
                self.steady_depth.p99,
                self.steady_depth.max
            )?;
            writeln!(
                f,
                "    per sample     deepest viewer p50 {:.0}  p95 {:.0}  max {:.0}; {:.1}% of samples within ideal + 1",
                self.steady_sample_max.p50,
                self.steady_sample_max.p95,
                self.steady_sample_max.max,
                self.steady_samples_within_ideal_plus_one * 100.0
            )?;
        }
        match self.last_sample_over_ideal_plus_one_secs {
            Some(t) => writeln!(
                f,
                "    last sample deeper than ideal + 1 at {t:.0} s (of {:.0} s)",
                self.config.duration_secs
            )?,
            None => writeln!(f, "    no sample deeper than ideal + 1")?,
        }
        writeln!(
            f,
            "  join time        p50 {:.0} ms  p99 {:.0} ms  ({} joins)",
            self.join_ms.p50, self.join_ms.p99, self.join_ms.count
        )?;
        writeln!(
            f,
            "  outage/repair    p50 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms  ({} outages)",
            self.outage_ms.p50, self.outage_ms.p95, self.outage_ms.p99, self.outage_ms.count
        )?;
        writeln!(
            f,
            "    after a crash  p50 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms  ({}; includes detection)",
            self.outage_crash_ms.p50,
            self.outage_crash_ms.p95,
            self.outage_crash_ms.p99,
            self.outage_crash_ms.count
        )?;
        writeln!(
            f,
            "    otherwise      p50 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms  ({})",
            self.outage_other_ms.p50,
            self.outage_other_ms.p95,
            self.outage_other_ms.p99,
            self.outage_other_ms.count
        )?;
        writeln!(
            f,
            "    orphan's view  p50 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms  ({} repairs, loss noticed to accepted)",
            self.repair_ms.p50, self.repair_ms.p95, self.repair_ms.p99, self.repair_ms.count
        )?;
        writeln!(f, "  continuity       {:.4}%", self.continuity * 100.0)?;
        writeln!(
            f,
            "  control rx/node  {:.0} B/s mean  {:.0} B/s p99  {:.0} B/s max  (root {:.0} B/s)",
            self.rx_bytes_per_sec.mean,
            self.rx_bytes_per_sec.p99,
            self.rx_bytes_per_sec.max,
            self.root_rx_bytes_per_sec
        )?;
        if self.steady_rx_bytes_per_sec.count > 0 {
            writeln!(
                f,
                "    steady state   {:.0} B/s mean  {:.0} B/s p99  {:.0} B/s max",
                self.steady_rx_bytes_per_sec.mean,
                self.steady_rx_bytes_per_sec.p99,
                self.steady_rx_bytes_per_sec.max
            )?;
        }
        writeln!(
            f,
            "                   {:.2} msg/s mean  {:.2} msg/s p99  {:.2} msg/s max  (tx {:.0} B/s mean)",
            self.rx_msgs_per_sec.mean,
            self.rx_msgs_per_sec.p99,
            self.rx_msgs_per_sec.max,
            self.tx_bytes_per_sec.mean
        )?;
        let busiest: Vec<String> = self
            .busiest_rx_bytes_per_sec
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect();
        writeln!(f, "    busiest, B/s   {}", busiest.join(", "))?;
        writeln!(
            f,
            "  population       {} arrivals, {} leaves, {} crashes; {} live at end, {} attached",
            self.arrivals, self.leaves, self.crashes, self.live_at_end, self.attached_at_end
        )?;
        let v = &self.violations;
        write!(
            f,
            "  invariants       cycles {}  over-capacity {}  unrepaired {}  bookkeeping {}  ({} events)",
            v.cycles, v.over_capacity, v.unrepaired, v.bookkeeping, self.events
        )?;
        write!(
            f,
            "\n  join requests    {} sent; refused {:?}",
            self.join_requests, self.refusals
        )?;
        write!(
            f,
            "\n  room rules       links down {:?}; {} probes, {} answered; {} stale children at end",
            self.links_down, self.probes, self.probes_answered, self.stale_children_at_end
        )?;
        if self.unreachable_attempts > 0 {
            write!(
                f,
                "\n  unreachable      {} media attempts over unreachable pairs, {} of them repeated",
                self.unreachable_attempts, self.unreachable_repeats
            )?;
        }
        Ok(())
    }
}

/// Percentiles of a histogram of depths.
fn hist_dist(hist: &[u64]) -> Dist {
    let count: u64 = hist.iter().sum();
    let q = |p: f64| {
        let target = ((count.saturating_sub(1)) as f64 * p).round() as u64;
        let mut acc = 0;
        for (d, n) in hist.iter().enumerate() {
            acc += n;
            if acc > target {
                return d as f64;
            }
        }
        0.0
    };
    let mean = if count == 0 {
        0.0
    } else {
        hist.iter()
            .enumerate()
            .map(|(d, n)| d as f64 * *n as f64)
            .sum::<f64>()
            / count as f64
    };
    Dist {
        count: count as usize,
        mean,
        p50: q(0.5),
        p95: q(0.95),
        p99: q(0.99),
        max: hist.iter().rposition(|n| *n > 0).unwrap_or(0) as f64,
    }
}

/// Smallest d with K^d >= N.
pub fn ideal_depth(nodes: usize, fanout: u16) -> u32 {
    if fanout <= 1 {
        return nodes as u32;
    }
    let mut d = 0;
    let mut reach: u128 = 1;
    while reach < nodes as u128 {
        reach *= fanout as u128;
        d += 1;
    }
    d
}

/// Run a simulation.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut sim = Sim::new(cfg);
    sim.run();
    sim.report()
}

#[derive(Debug)]
enum Ev {
    Arrive(u32),
    Msg {
        to: u32,
        from: u32,
        msg: TreeMsg,
    },
    Update {
        to: u32,
        from: u32,
        upd: TreeUpdate,
    },
    SnapReq {
        to: u32,
        from: u32,
    },
    SnapResp {
        to: u32,
        snap: Snapshot,
    },
    Timer(u32),
    /// A child's media connection to its parent is up.
    MediaUp {
        parent: u32,
        child: u32,
    },
    /// A probed peer's answer arrives.
    ProbeReply {
        to: u32,
        peer: u32,
    },
    /// A record check's answer arrives.
    RecordChecked(u32),
    /// The control connections of tree edges close (both peers alive).
    ConnectionDrops,
    Depart {
        node: u32,
        graceful: bool,
        replace: bool,
    },
    LinkDown {
        to: u32,
        peer: u32,
    },
    Mass,
    KillRootChildren,
    Sample,
    Steady,
}

struct QItem {
    t: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for QItem {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for QItem {}
impl PartialOrd for QItem {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for QItem {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, seq).
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

#[derive(Default)]
struct Stats {
    arrived: u64,
    joined_at: Option<u64>,
    departed: Option<u64>,
    rx_bytes: f64,
    /// Received bytes by kind (see [`RX_KINDS`]).
    rx_kind: [f64; RX_KINDS.len()],
    rx_msgs: f64,
    tx_bytes: f64,
    outage_since: Option<u64>,
    /// The current outage began with a crash (else a graceful leave, a move or a repair).
    outage_crash: bool,
    disconnected_ms: u64,
    flagged: bool,
    /// Bytes received before the steady state began (or 0) and when it began for this node.
    steady_base: Option<(f64, u64)>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    rng: SplitMix64,
    now: u64,
    seq: u64,
    end: u64,
    queue: BinaryHeap<QItem>,
    nodes: Vec<Option<RoomNode>>,
    /// Arrivals that vanish after their first join request.
    ghost: Vec<bool>,
    /// Draws of the connection drops, apart from the main generator so that enabling them
    /// leaves the rest of the trace as it was.
    drops_rng: SplitMix64,
    ids: Vec<NodeId>,
    alive: Vec<bool>,
    stats: Vec<Stats>,
    timer_at: Vec<Option<u64>>,
    claim: Vec<Option<u32>>,
    gt_children: Vec<Vec<u32>>,
    connected: Vec<bool>,
    edge_since: Vec<u64>,
    alive_list: Vec<u32>,
    alive_pos: Vec<usize>,
    mark: Vec<u32>,
    mark_gen: u32,
    outages: Vec<f64>,
    outages_crash: Vec<f64>,
    outages_other: Vec<f64>,
    repairs: Vec<f64>,
    /// Set while the subtrees of a crashed node are cut (outage cause).
    cutting_crash: bool,
    joins: Vec<f64>,
    depth_hist: Vec<u64>,
    final_max_depth: u32,
    last_over_ideal_plus_one: Option<u64>,
    steady_hist: Vec<u64>,
    /// Histogram of the deepest viewer per steady-state sample.
    steady_max_hist: Vec<u64>,
    steady: bool,
    violations: Violations,
    events: u64,
    refusals: std::collections::BTreeMap<String, u64>,
    join_requests: u64,
    leaves: u64,
    crashes: u64,
    arrivals: u64,
    links_down: std::collections::BTreeMap<String, u64>,
    unreachable_attempts: u64,
    unreachable_repeats: u64,
    /// (child, parent) pairs whose media was found unreachable, for `unreachable_repeats`.
    tried_unreachable: std::collections::HashSet<(u32, u32)>,
    probes: u64,
    probes_answered: u64,
}

fn node_id(seed: u64, i: u32) -> NodeId {
    let mut r = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut b = [0u8; 32];
    for chunk in b[..24].chunks_mut(8) {
        chunk.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    b[28..32].copy_from_slice(&i.to_be_bytes());
    NodeId(b)
}

fn idx(id: NodeId) -> u32 {
    u32::from_be_bytes([id.0[28], id.0[29], id.0[30], id.0[31]])
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a SimConfig) -> Self {
        let mut s = Sim {
            cfg,
            rng: SplitMix64::new(cfg.seed),
            now: 0,
            seq: 0,
            end: (cfg.duration_secs * 1000.0) as u64,
            queue: BinaryHeap::new(),
            nodes: Vec::new(),
            ghost: Vec::new(),
            drops_rng: SplitMix64::new(cfg.seed ^ 0xD0D0_D0D0),
            ids: Vec::new(),
            alive: Vec::new(),
            stats: Vec::new(),
            timer_at: Vec::new(),
            claim: Vec::new(),
            gt_children: Vec::new(),
            connected: Vec::new(),
            edge_since: Vec::new(),
            alive_list: Vec::new(),
            alive_pos: Vec::new(),
            mark: Vec::new(),
            mark_gen: 0,
            outages: Vec::new(),
            outages_crash: Vec::new(),
            outages_other: Vec::new(),
            repairs: Vec::new(),
            cutting_crash: false,
            joins: Vec::new(),
            depth_hist: Vec::new(),
            steady_hist: Vec::new(),
            steady_max_hist: Vec::new(),
            steady: false,
            final_max_depth: 0,
            last_over_ideal_plus_one: None,
            violations: Violations::default(),
            events: 0,
            refusals: Default::default(),
            join_requests: 0,
            leaves: 0,
            crashes: 0,
            arrivals: 0,
            links_down: Default::default(),
            unreachable_attempts: 0,
            unreachable_repeats: 0,
            tried_unreachable: Default::default(),
            probes: 0,
            probes_answered: 0,
        };
        // The broadcaster.
        let root = s.alloc();
        let mut rcfg = cfg.tree.clone();
        rcfg.max_children = Some(cfg.fanout);
        let id = s.ids[root as usize];
        s.nodes[root as usize] = Some(RoomNode::new(
            TreeNode::new_root(id, rcfg, cfg.seed ^ 0xB0B),
            id,
            cfg.room,
        ));
        s.alive[root as usize] = true;
        s.connected[root as usize] = true;
        s.stats[root as usize].joined_at = Some(0);
        s.alive_add(root);
        for i in 0..cfg.nodes {
            let n = s.alloc();
            let t = if cfg.join_rate_per_sec > 0.0 {
                (i as f64 * 1000.0 / cfg.join_rate_per_sec) as u64
            } else {
                0
            };
            s.push(t, Ev::Arrive(n));
        }
        if let Some(m) = &cfg.mass_departure {
            s.push((m.at_secs * 1000.0) as u64, Ev::Mass);
        }
        if let Some(at) = cfg.kill_root_children_at_secs {
            s.push((at * 1000.0) as u64, Ev::KillRootChildren);
        }
        let period = (cfg.sample_interval_secs * 1000.0).max(1.0) as u64;
        s.push(period, Ev::Sample);
        let wave = if cfg.join_rate_per_sec > 0.0 {
            cfg.nodes as f64 / cfg.join_rate_per_sec
        } else {
            0.0
        };
        s.push(((wave + 60.0) * 1000.0) as u64, Ev::Steady);
        if cfg.connection_drops_per_edge_per_hour > 0.0 {
            s.push(1000, Ev::ConnectionDrops);
        }
        s
    }

    fn alloc(&mut self) -> u32 {
        let i = self.nodes.len() as u32;
        self.nodes.push(None);
        self.ghost.push(false);
        self.ids.push(node_id(self.cfg.seed, i));
        self.alive.push(false);
        self.stats.push(Stats::default());
        self.timer_at.push(None);
        self.claim.push(None);
        self.gt_children.push(Vec::new());
        self.connected.push(false);
        self.edge_since.push(0);
        self.alive_pos.push(usize::MAX);
        self.mark.push(0);
        i
    }

    fn alive_add(&mut self, i: u32) {
        self.alive_pos[i as usize] = self.alive_list.len();
        self.alive_list.push(i);
    }

    fn alive_remove(&mut self, i: u32) {
        let pos = self.alive_pos[i as usize];
        if pos == usize::MAX {
            return;
        }
        self.alive_list.swap_remove(pos);
        if let Some(&moved) = self.alive_list.get(pos) {
            self.alive_pos[moved as usize] = pos;
        }
        self.alive_pos[i as usize] = usize::MAX;
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(QItem {
            t,
            seq: self.seq,
            ev,
        });
    }

    /// Whether the media from `parent` can never reach `child` (drawn once per pair; no draw
    /// from the main generator, so runs without unreachable pairs are unchanged).
    fn unreachable(&self, child: u32, parent: u32) -> bool {
        if self.cfg.unreachable_pair_fraction <= 0.0 {
            return false;
        }
        let (x, y) = if child < parent {
            (child, parent)
        } else {
            (parent, child)
        };
        let mut r = SplitMix64::new(!self.cfg.seed ^ ((x as u64) << 32 | y as u64));
        r.unit() < self.cfg.unreachable_pair_fraction
    }

    fn latency(&self, a: u32, b: u32) -> u64 {
        let (x, y) = if a < b { (a, b) } else { (b, a) };
        let mut r = SplitMix64::new(self.cfg.seed ^ ((x as u64) << 32 | y as u64));
        let f = 0.5 + r.unit();
        ((self.cfg.link_latency_ms * f).round() as u64).max(1)
    }

    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.rng.unit()).ln()
    }

    fn draw_capacity(&mut self) -> u16 {
        let k = self.cfg.fanout;
        let table: Vec<(f64, u16)> = match &self.cfg.capacity {
            CapacityDist::Fixed => return k,
            CapacityDist::Heterogeneous => {
                vec![(0.15, 0), (0.25, k / 2), (0.40, k), (0.20, 2 * k)]
            }
            CapacityDist::Weighted(v) => v.clone(),
        };
        let total: f64 = table.iter().map(|(w, _)| *w).sum();
        let mut u = self.rng.unit() * total;
        for (w, c) in &table {
            if u < *w {
                return *c;
            }
            u -= w;
        }
        table.last().map_or(k, |(_, c)| *c)
    }

    fn run(&mut self) {
        while let Some(item) = self.queue.pop() {
            if item.t > self.end {
                break;
            }
            self.now = item.t;
            self.events += 1;
            self.handle(item.ev);
        }
        self.now = self.end;
    }

    fn tn(&mut self, i: u32) -> Option<&mut RoomNode> {
        if self.alive[i as usize] {
            self.nodes[i as usize].as_mut()
        } else {
            None
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = Millis(self.now);
        match ev {
            Ev::Arrive(i) => self.arrive(i),
            Ev::Msg { to, from, msg } => {
                let len = msg.wire_len() as f64;
                let kind = msg_kind(&msg);
                let fid = self.ids[from as usize];
                if let Some(n) = self.tn(to) {
                    n.handle_message(fid, msg, now);
                    self.rx(to, kind, len);
                    self.drain(to);
                }
            }
            Ev::Update { to, from, upd } => {
                let len = (upd.wire_len() + SIGNATURE_OVERHEAD) as f64;
                let fid = self.ids[from as usize];
                if let Some(n) = self.tn(to) {
                    n.handle_update(fid, upd, now);
                    self.rx(to, 7, len);
                    self.drain(to);
                }
            }
            Ev::SnapReq { to, from } => {
                if let Some(n) = self.tn(to) {
                    let snap = n.tree().snapshot_for_newcomer(SNAPSHOT_LEN);
                    self.rx(to, 8, SNAPSHOT_REQUEST_BYTES as f64);
                    self.stats[to as usize].tx_bytes += snap.wire_len() as f64;
                    let t = self.now + self.latency(to, from);
                    self.push(t, Ev::SnapResp { to: from, snap });
                }
            }
            Ev::SnapResp { to, snap } => {
                let len = snap.wire_len() as f64;
                if let Some(n) = self.tn(to) {
                    n.handle_snapshot(snap, now);
                    self.rx(to, 9, len);
                    self.drain(to);
                }
            }
            Ev::Timer(i) => {
                if self.timer_at[i as usize] == Some(self.now) {
                    self.timer_at[i as usize] = None;
                    if let Some(n) = self.tn(i) {
                        n.handle_timeout(now);
                        self.drain(i);
                    }
                }
            }
            Ev::Depart {
                node,
                graceful,
                replace,
            } => self.depart(node, graceful, replace),
            Ev::LinkDown { to, peer } => {
                let fid = self.ids[peer as usize];
                let detection = self.cfg.crash_detection;
                if let Some(n) = self.tn(to) {
                    match detection {
                        CrashDetection::Transport => n.handle_link_down(fid, now),
                        CrashDetection::ConnectionClosed => n.handle_peer_disconnected(fid, now),
                    }
                    self.drain(to);
                }
            }
            Ev::MediaUp { parent, child } => {
                let cid = self.ids[child as usize];
                if self.alive[child as usize]
                    && let Some(n) = self.tn(parent)
                {
                    n.handle_child_connected(cid, now);
                    self.drain(parent);
                }
                // Both ends see the connection come up.
                let pid = self.ids[parent as usize];
                if self.alive[parent as usize]
                    && let Some(n) = self.tn(child)
                {
                    n.handle_parent_connected(pid, now);
                    self.drain(child);
                }
            }
            Ev::ProbeReply { to, peer } => {
                let pid = self.ids[peer as usize];
                if let Some(n) = self.tn(to) {
                    n.handle_probe_answered(pid, now);
                    self.drain(to);
                }
            }
            Ev::RecordChecked(i) => {
                if let Some(n) = self.tn(i) {
                    n.handle_record_checked(true, now);
                    self.drain(i);
                }
            }
            Ev::ConnectionDrops => {
                // Each tree edge (child -> parent) drops with the configured rate, checked once
                // a second; both ends see the close.
                let p = self.cfg.connection_drops_per_edge_per_hour / 3600.0;
                let live: Vec<u32> = self.alive_list.clone();
                for c in live {
                    let Some(par) = self.claim[c as usize] else {
                        continue;
                    };
                    if !self.alive[par as usize] || self.drops_rng.unit() >= p {
                        continue;
                    }
                    let (cid, pid) = (self.ids[c as usize], self.ids[par as usize]);
                    if let Some(n) = self.tn(c) {
                        n.handle_peer_disconnected(pid, now);
                        self.drain(c);
                    }
                    if let Some(n) = self.tn(par) {
                        n.handle_peer_disconnected(cid, now);
                        self.drain(par);
                    }
                }
                // None in the last seconds: every probe is settled within the run.
                if self.now + 1000 + self.cfg.room.probe_ms < self.end {
                    self.push(self.now + 1000, Ev::ConnectionDrops);
                }
            }
            Ev::Mass => {
                let Some(m) = self.cfg.mass_departure.clone() else {
                    return;
                };
                let mut victims: Vec<u32> = self
                    .alive_list
                    .iter()
                    .copied()
                    .filter(|&i| i != 0)
                    .collect();
                let k = ((victims.len() as f64) * m.fraction).round() as usize;
                // Partial Fisher-Yates.
                for j in 0..k.min(victims.len()) {
                    let r = j + self.rng.below((victims.len() - j) as u64) as usize;
                    victims.swap(j, r);
                }
                for &v in victims.iter().take(k) {
                    self.depart(v, m.graceful, false);
                }
            }
            Ev::KillRootChildren => {
                let kids: Vec<u32> = self.gt_children[0].clone();
                for k in kids {
                    self.depart(k, false, false);
                }
            }
            Ev::Steady => {
                self.steady = true;
                let live: Vec<u32> = self.alive_list.clone();
                for &i in &live {
                    // Keep-alives are booked when an edge closes: book what came before now.
                    let open = self.edge_since[i as usize] != u64::MAX;
                    self.close_edge(i);
                    if open {
                        self.edge_since[i as usize] = self.now;
                    }
                }
                for &i in &live {
                    let st = &mut self.stats[i as usize];
                    st.steady_base = Some((st.rx_bytes, self.now));
                }
            }
            Ev::Sample => {
                self.sample();
                let period = (self.cfg.sample_interval_secs * 1000.0).max(1.0) as u64;
                let t = self.now + period;
                self.push(t, Ev::Sample);
            }
        }
    }

    fn rx(&mut self, i: u32, kind: usize, bytes: f64) {
        let s = &mut self.stats[i as usize];
        s.rx_bytes += bytes;
        s.rx_kind[kind] += bytes;
        s.rx_msgs += 1.0;
    }

    fn arrive(&mut self, i: u32) {
        let cap = self.draw_capacity();
        let mut tcfg = self.cfg.tree.clone();
        tcfg.max_children = Some(cap);
        let id = self.ids[i as usize];
        let seed = self.rng.next_u64();
        let root = self.ids[0];
        let mut n = RoomNode::new(TreeNode::new(id, tcfg, seed), root, self.cfg.room);
        n.start(Millis(self.now));
        self.nodes[i as usize] = Some(n);
        if self.cfg.ghost_joiner_fraction > 0.0 {
            self.ghost[i as usize] = self.rng.unit() < self.cfg.ghost_joiner_fraction;
        }
        self.alive[i as usize] = true;
        self.stats[i as usize].arrived = self.now;
        if self.steady {
            self.stats[i as usize].steady_base = Some((0.0, self.now));
        }
        self.alive_add(i);
        self.arrivals += 1;
        if let Some(mean) = self.cfg.churn_mean_secs {
            let life = (self.exp(mean) * 1000.0) as u64;
            let graceful = self.rng.unit() >= self.cfg.crash_fraction;
            let t = self.now + life.max(1);
            self.push(
                t,
                Ev::Depart {
                    node: i,
                    graceful,
                    replace: true,
                },
            );
        }
        self.drain(i);
    }

    fn depart(&mut self, i: u32, graceful: bool, replace: bool) {
        if !self.alive[i as usize] || i == 0 {
            return;
        }
        let now = Millis(self.now);
        let mut neighbours: Vec<u32> = Vec::new();
        if let Some(n) = self.nodes[i as usize].as_mut() {
            if graceful {
                n.leave(now);
            } else {
                neighbours.extend(n.tree().parent().map(idx));
                neighbours.extend(n.tree().children().map(idx));
            }
        }
        if graceful {
            self.leaves += 1;
            self.drain(i);
        } else {
            self.crashes += 1;
        }
        // Kill it in the ground truth.
        self.alive[i as usize] = false;
        self.alive_remove(i);
        self.close_edge(i);
        if let Some(p) = self.claim[i as usize] {
            self.gt_children[p as usize].retain(|&c| c != i);
        }
        self.set_conn(i, false);
        self.stats[i as usize].departed = Some(self.now);
        let kids = self.gt_children[i as usize].clone();
        self.cutting_crash = !graceful;
        for c in kids {
            self.close_edge(c);
            self.set_subtree(c, false);
        }
        self.cutting_crash = false;
        self.nodes[i as usize] = None;
        for nb in neighbours {
            let (lo, hi) = self.cfg.crash_detect_ms;
            let d = lo + self.rng.below(hi.saturating_sub(lo) + 1);
            self.push(self.now + d, Ev::LinkDown { to: nb, peer: i });
        }
        if replace && self.cfg.churn_mean_secs.is_some() {
            let n = self.alloc();
            let t = self.now + self.rng.below(1000);
            self.push(t, Ev::Arrive(n));
        }
    }

    /// Account the keep-alive of the edge `c -> claim[c]` up to now and stop it.
    fn close_edge(&mut self, c: u32) {
        let Some(p) = self.claim[c as usize] else {
            return;
        };
        let since = self.edge_since[c as usize];
        if since == u64::MAX {
            return;
        }
        let secs = self.now.saturating_sub(since) as f64 / 1000.0;
        let bytes = secs * self.cfg.keepalive_bytes_per_sec;
        for (a, b) in [(c, p), (p, c)] {
            let s = &mut self.stats[a as usize];
            s.rx_bytes += bytes;
            s.rx_kind[10] += bytes;
            s.rx_msgs += secs;
            self.stats[b as usize].tx_bytes += bytes;
        }
        self.edge_since[c as usize] = u64::MAX;
    }

    fn drain(&mut self, i: u32) {
        while let Some(o) = self.nodes[i as usize]
            .as_mut()
            .and_then(|n| n.poll_output())
        {
            match o {
                RoomOutput::Emit(RoomEvent::Tree(TreeEvent::Rejoined { outage_ms, .. })) => {
                    self.repairs.push(outage_ms as f64);
                }
                RoomOutput::Emit(RoomEvent::LinkDown { cause, .. }) => {
                    *self.links_down.entry(format!("{cause:?}")).or_default() += 1;
                }
                RoomOutput::Emit(RoomEvent::ProbeAnswered(_)) => self.probes_answered += 1,
                RoomOutput::RefuseChild { reason, .. } => {
                    *self.refusals.entry(format!("{reason:?}")).or_default() += 1;
                }
                RoomOutput::SendControl { to, msg } => {
                    if matches!(msg, TreeMsg::Join { .. }) {
                        self.join_requests += 1;
                        if self.ghost[i as usize] && self.alive[i as usize] {
                            // Gone before any answer: nobody's transport will notice.
                            self.push(
                                self.now + 1,
                                Ev::Depart {
                                    node: i,
                                    graceful: false,
                                    replace: false,
                                },
                            );
                        }
                    }
                    let j = idx(to);
                    if j as usize >= self.nodes.len() {
                        continue;
                    }
                    self.stats[i as usize].tx_bytes += msg.wire_len() as f64;
                    let t = self.now + self.latency(i, j);
                    self.push(
                        t,
                        Ev::Msg {
                            to: j,
                            from: i,
                            msg,
                        },
                    );
                }
                RoomOutput::Publish { update, to } => {
                    let len = (update.wire_len() + SIGNATURE_OVERHEAD) as f64;
                    for r in to {
                        let j = idx(r);
                        if j as usize >= self.nodes.len() {
                            continue;
                        }
                        self.stats[i as usize].tx_bytes += len;
                        let t = self.now + self.latency(i, j);
                        self.push(
                            t,
                            Ev::Update {
                                to: j,
                                from: i,
                                upd: update.clone(),
                            },
                        );
                    }
                }
                RoomOutput::RequestSnapshot { .. } => {
                    // Any attached member will do; a few random draws, the broadcaster otherwise.
                    let mut m = 0;
                    for _ in 0..8 {
                        let k = self.rng.below(self.alive_list.len() as u64) as usize;
                        let c = self.alive_list[k];
                        if c != i && self.connected[c as usize] {
                            m = c;
                            break;
                        }
                    }
                    self.stats[i as usize].tx_bytes += SNAPSHOT_REQUEST_BYTES as f64;
                    let t = self.now + self.latency(i, m);
                    self.push(t, Ev::SnapReq { to: m, from: i });
                }
                RoomOutput::ConnectParent { peer } => {
                    let j = idx(peer);
                    if (j as usize) < self.nodes.len() && self.unreachable(i, j) {
                        // The ICE checks go unanswered: nobody hears of this media.
                        self.unreachable_attempts += 1;
                        if !self.tried_unreachable.insert((i, j)) {
                            self.unreachable_repeats += 1;
                        }
                    } else if (j as usize) < self.nodes.len() {
                        let t = self.now + 3 * self.latency(i, j);
                        self.push(
                            t,
                            Ev::MediaUp {
                                parent: j,
                                child: i,
                            },
                        );
                    }
                }
                RoomOutput::Probe { peer } => {
                    self.probes += 1;
                    let j = idx(peer);
                    if (j as usize) < self.nodes.len() && self.alive[j as usize] {
                        let t = self.now + 2 * self.latency(i, j);
                        self.push(t, Ev::ProbeReply { to: i, peer: j });
                    }
                }
                RoomOutput::CheckRecord => {
                    let t = self.now + 2 * self.latency(i, 0);
                    self.push(t, Ev::RecordChecked(i));
                }
                _ => {}
            }
        }
        if !self.alive[i as usize] {
            return;
        }
        let Some(room) = self.nodes[i as usize].as_ref() else {
            return;
        };
        let n = room.tree();
        // A promotion holds one extra child for a bounded time (make-before-break).
        if n.child_count() > n.capacity() as usize + n.over_capacity_allowance() as usize {
            self.violations.over_capacity += 1;
        }
        let new_claim = n.parent().map(idx);
        let next = room.poll_timeout();
        if new_claim != self.claim[i as usize] {
            self.reclaim(i, new_claim);
        }
        if let Some(t) = next {
            let t = t.0.max(self.now);
            if self.timer_at[i as usize].is_none_or(|x| t < x) {
                self.timer_at[i as usize] = Some(t);
                self.push(t, Ev::Timer(i));
            }
        }
    }

    fn reclaim(&mut self, i: u32, new: Option<u32>) {
        self.close_edge(i);
        if let Some(old) = self.claim[i as usize] {
            self.gt_children[old as usize].retain(|&c| c != i);
        }
        self.claim[i as usize] = new;
        let mut ok = false;
        if let Some(p) = new {
            self.gt_children[p as usize].push(i);
            self.edge_since[i as usize] = self.now;
            if !self.alive[p as usize] {
                self.edge_since[i as usize] = u64::MAX;
            }
            // Cycle check: walk up from the new parent.
            let mut cur = p;
            let mut steps = 0usize;
            let mut cycle = false;
            loop {
                if cur == i {
                    cycle = true;
                    break;
                }
                if cur == 0 || !self.alive[cur as usize] {
                    break;
                }
                match self.claim[cur as usize] {
                    Some(up) => cur = up,
                    None => break,
                }
                steps += 1;
                if steps > self.nodes.len() {
                    cycle = true;
                    break;
                }
            }
            if cycle {
                self.violations.cycles += 1;
            }
            ok = !cycle && self.alive[p as usize] && self.connected[p as usize];
        }
        self.set_subtree(i, ok);
    }

    fn set_subtree(&mut self, root: u32, val: bool) {
        self.mark_gen = self.mark_gen.wrapping_add(1);
        let g = self.mark_gen;
        let mut stack = vec![root];
        while let Some(u) = stack.pop() {
            if self.mark[u as usize] == g {
                continue;
            }
            self.mark[u as usize] = g;
            if !self.alive[u as usize] {
                continue;
            }
            self.set_conn(u, val);
            for k in 0..self.gt_children[u as usize].len() {
                let c = self.gt_children[u as usize][k];
                stack.push(c);
            }
        }
    }

    fn set_conn(&mut self, u: u32, val: bool) {
        if self.connected[u as usize] == val {
            return;
        }
        self.connected[u as usize] = val;
        let now = self.now;
        let s = &mut self.stats[u as usize];
        if val {
            if s.joined_at.is_none() {
                s.joined_at = Some(now);
                self.joins.push(now.saturating_sub(s.arrived) as f64);
            } else if let Some(since) = s.outage_since.take() {
                let d = now - since;
                s.disconnected_ms += d;
                s.flagged = false;
                self.outages.push(d as f64);
                if s.outage_crash {
                    self.outages_crash.push(d as f64);
                } else {
                    self.outages_other.push(d as f64);
                }
            }
        } else if s.joined_at.is_some() && self.alive[u as usize] {
            s.outage_since = Some(now);
            s.outage_crash = self.cutting_crash;
        } else if let Some(since) = s.outage_since.take() {
            // Departed during an outage: counts against continuity, not as a repair.
            s.disconnected_ms += now - since;
        }
    }

    fn sample(&mut self) {
        // Depths by a walk from the root over the ground truth, and a recount of connectivity.
        let mut depth = vec![u32::MAX; self.nodes.len()];
        depth[0] = 0;
        let mut stack = vec![0u32];
        let mut reached = 0u64;
        let mut max = 0;
        while let Some(u) = stack.pop() {
            reached += 1;
            let d = depth[u as usize];
            if u != 0 {
                let di = d as usize;
                if self.depth_hist.len() <= di {
                    self.depth_hist.resize(di + 1, 0);
                }
                self.depth_hist[di] += 1;
                if self.steady {
                    if self.steady_hist.len() <= di {
                        self.steady_hist.resize(di + 1, 0);
                    }
                    self.steady_hist[di] += 1;
                }
                max = max.max(d);
            }
            for &c in &self.gt_children[u as usize] {
                if self.alive[c as usize] && depth[c as usize] == u32::MAX {
                    depth[c as usize] = d + 1;
                    stack.push(c);
                }
            }
        }
        self.final_max_depth = max;
        if max > ideal_depth(self.cfg.nodes, self.cfg.fanout) + 1 {
            self.last_over_ideal_plus_one = Some(self.now);
        }
        if self.steady {
            let m = max as usize;
            if self.steady_max_hist.len() <= m {
                self.steady_max_hist.resize(m + 1, 0);
            }
            self.steady_max_hist[m] += 1;
        }
        let flagged_conn = self
            .alive_list
            .iter()
            .filter(|&&i| self.connected[i as usize])
            .count() as u64;
        if flagged_conn != reached {
            self.violations.bookkeeping += 1;
        }
        let bound = (self.cfg.repair_bound_secs * 1000.0) as u64;
        // A room whose attached members have no free slot at all (say, leaf-only viewers filling
        // the root's slots) cannot take a detached viewer in: a capacity shortage, not a failed
        // repair. A viewer that can relay is never in this case (the root hands it a weaker
        // child's slot).
        let no_room = std::iter::once(0u32)
            .chain(self.alive_list.iter().copied())
            .filter(|&i| i == 0 || self.connected[i as usize])
            .filter_map(|i| self.nodes[i as usize].as_ref().map(RoomNode::tree))
            .all(|n| n.child_count() >= n.capacity() as usize);
        for k in 0..self.alive_list.len() {
            let i = self.alive_list[k] as usize;
            if no_room
                && self.nodes[i]
                    .as_ref()
                    .is_some_and(|n| n.tree().capacity() == 0)
            {
                continue;
            }
            let s = &mut self.stats[i];
            if let Some(since) = s.outage_since
                && !s.flagged
                && self.now - since > bound
            {
                s.flagged = true;
                self.violations.unrepaired += 1;
            }
        }
    }

    fn report(mut self) -> SimReport {
        // Close the books.
        let end = self.end;
        self.now = end;
        let live: Vec<u32> = self.alive_list.clone();
        for &i in &live {
            self.close_edge(i);
        }
        self.sample();
        let mut viewer_ms = 0u64;
        let mut dark_ms = 0u64;
        let mut rx = Vec::new();
        let mut steady_rx = Vec::new();
        let mut rxm = Vec::new();
        let mut tx = Vec::new();
        let min_life = (self.cfg.min_lifetime_for_traffic_secs * 1000.0) as u64;
        let mut live_at_end = 0;
        let mut attached_at_end = 0;
        let mut busiest: Option<(f64, usize, f64)> = None;
        for i in 1..self.nodes.len() {
            let s = &self.stats[i];
            let alive = self.alive[i];
            if alive {
                live_at_end += 1;
                if self.connected[i] {
                    attached_at_end += 1;
                }
            }
            let stop = s.departed.unwrap_or(end);
            if let Some(j) = s.joined_at {
                viewer_ms += stop.saturating_sub(j);
                dark_ms += s.disconnected_ms;
                if let Some(o) = s.outage_since {
                    dark_ms += stop.saturating_sub(o);
                }
            }
            if let Some((base, since)) = s.steady_base {
                let life = stop.saturating_sub(since);
                if life >= min_life && life > 0 {
                    steady_rx.push((s.rx_bytes - base) / (life as f64 / 1000.0));
                }
            }
            if s.departed.is_some() || alive {
                let life = stop.saturating_sub(s.arrived);
                if life >= min_life && life > 0 {
                    let secs = life as f64 / 1000.0;
                    if busiest
                        .as_ref()
                        .is_none_or(|(b, _, _)| s.rx_bytes / secs > *b)
                    {
                        busiest = Some((s.rx_bytes / secs, i, secs));
                    }
                    rx.push(s.rx_bytes / secs);
                    rxm.push(s.rx_msgs / secs);
                    tx.push(s.tx_bytes / secs);
                }
            }
        }
        let depth = hist_dist(&self.depth_hist);
        let steady_depth = hist_dist(&self.steady_hist);
        let steady_sample_max = hist_dist(&self.steady_max_hist);
        let ideal = ideal_depth(self.cfg.nodes, self.cfg.fanout) as usize;
        let within: u64 = self.steady_max_hist.iter().take(ideal + 2).sum();
        let steady_samples_within_ideal_plus_one = if steady_sample_max.count == 0 {
            0.0
        } else {
            within as f64 / steady_sample_max.count as f64
        };
        let root_life = (end as f64 / 1000.0).max(1e-9);
        // Children departed longer than the repair bound ago: every rule had time to notice.
        let grace = (self.cfg.repair_bound_secs * 1000.0) as u64;
        let mut stale_children_at_end = 0;
        for &i in &live {
            let Some(n) = self.nodes[i as usize].as_ref() else {
                continue;
            };
            for c in n.tree().children() {
                let c = idx(c) as usize;
                if !self.alive[c]
                    && self.stats[c]
                        .departed
                        .is_some_and(|d| end.saturating_sub(d) > grace)
                {
                    stale_children_at_end += 1;
                }
            }
        }
        let busiest_rx = busiest
            .map(|(_, i, secs)| {
                RX_KINDS
                    .iter()
                    .zip(self.stats[i].rx_kind.iter())
                    .filter(|(_, b)| **b > 0.0)
                    .map(|(k, b)| (k.to_string(), b / secs))
                    .collect()
            })
            .unwrap_or_default();
        SimReport {
            config: self.cfg.clone(),
            ideal_depth: ideal_depth(self.cfg.nodes, self.cfg.fanout),
            depth,
            final_max_depth: self.final_max_depth,
            last_sample_over_ideal_plus_one_secs: self
                .last_over_ideal_plus_one
                .map(|t| t as f64 / 1000.0),
            steady_depth,
            steady_sample_max,
            steady_samples_within_ideal_plus_one,
            steady_rx_bytes_per_sec: Dist::of(steady_rx),
            join_ms: Dist::of(std::mem::take(&mut self.joins)),
            outage_ms: Dist::of(std::mem::take(&mut self.outages)),
            outage_crash_ms: Dist::of(std::mem::take(&mut self.outages_crash)),
            outage_other_ms: Dist::of(std::mem::take(&mut self.outages_other)),
            repair_ms: Dist::of(std::mem::take(&mut self.repairs)),
            continuity: if viewer_ms == 0 {
                1.0
            } else {
                1.0 - dark_ms as f64 / viewer_ms as f64
            },
            rx_bytes_per_sec: Dist::of(rx),
            rx_msgs_per_sec: Dist::of(rxm),
            tx_bytes_per_sec: Dist::of(tx),
            root_rx_bytes_per_sec: self.stats[0].rx_bytes / root_life,
            busiest_rx_bytes_per_sec: busiest_rx,
            arrivals: self.arrivals,
            leaves: self.leaves,
            crashes: self.crashes,
            live_at_end,
            attached_at_end,
            violations: self.violations.clone(),
            events: self.events,
            refusals: std::mem::take(&mut self.refusals),
            join_requests: self.join_requests,
            links_down: std::mem::take(&mut self.links_down),
            unreachable_attempts: self.unreachable_attempts,
            unreachable_repeats: self.unreachable_repeats,
            probes: self.probes,
            probes_answered: self.probes_answered,
            stale_children_at_end,
        }
    }
}
