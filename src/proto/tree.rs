//! The relay-tree state machine of one peer ([`TreeNode`]).
//!
//! # Model
//!
//! The broadcaster is the root (depth 0); every viewer has one parent and at most `capacity`
//! children (configured, or measured uplink ÷ stream bitrate; 0 = leaf only). Each peer knows:
//! its parent and the path from the root to it (the `ancestors` of its parent's [`TreeUpdate`]),
//! its children and their updates, a *summary* of the best free slots below each child, and a
//! *directory* of the best free slots of the whole tree, received from its parent.
//!
//! # What travels where (control traffic stays flat as the room grows)
//!
//! - [`TreeMsg`]s go point to point between tree neighbours, or between a joiner and a candidate.
//! - A node's signed [`TreeUpdate`] is handed out with [`Output::Publish`] to its *tree
//!   neighbours only* (parent and children), immediately when its path changes (children must know
//!   their ancestors to avoid cycles) and coalesced when only its children change.
//! - [`TreeMsg::Summary`] goes up one edge, at most every `summary_interval`, only when it
//!   changed: the best `summary_len` free slots of the sender's subtree. The root's summary is the
//!   directory of the whole tree. A parent's children share a byte budget
//!   (`summary_budget_bytes_per_sec`): the child of a parent with many slots sends fewer entries
//!   and, if need be, less often, so a high-capacity relay is not flooded with summaries.
//! - [`TreeMsg::Directory`] goes down every edge, at most every `directory_interval`, only when it
//!   changed. Each child gets its own: the shallowest two levels of what the parent knows (its
//!   directory, itself, the other children's summaries -- never the child's own subtree) shuffled
//!   per child, so the room's joins spread over many nearly-as-good slots and each part of the
//!   tree also learns nearby slots. Every member can thus answer a newcomer's snapshot request
//!   ([`TreeNode::snapshot_for_newcomer`]) and every member has backup candidates.
//! - Liveness is the transport's business (the WebRTC connection and its RTCP along tree edges):
//!   the shell calls [`TreeNode::handle_link_down`]. There are no room-wide heartbeats.
//!
//! A node therefore receives O(capacity) messages per interval whatever the room size; nothing is
//! gossiped to the whole room.
//!
//! # Decisions
//!
//! - **Join**: among known candidates with a free slot, the two shallowest levels, weighted by
//!   spare slots (twice for the shallowest level) and by RTT: the design's order (depth, then
//!   spare capacity, then RTT) as preferences, so that joiners holding similar directories do not
//!   all race for the same few slots. The candidate accepts while it has room, else passes the
//!   request to a free slot of its subtree (at most one level below the candidate the joiner
//!   chose, for the first attempts) or refuses with a [`RefuseReason`] and hints (the best free
//!   slots of its own subtree, fresher than the directory); the joiner retries after a random
//!   jitter.
//! - **No cycles**: a candidate refuses a joiner that appears in its own ancestor path, or whose lost
//!   parent does (the joiner would land in a sibling's subtree while both are repairing), and a
//!   detached candidate (no path to the root) refuses everyone. A repairing node first only accepts
//!   parents strictly shallower than its old depth: depth then decreases along every new edge and no
//!   cycle can close even on stale information. After `repair_settle` it takes any candidate.
//!   Finally, a node that finds itself among its own ancestors leaves its parent (defence in depth).
//! - **Backup**: every attached node keeps a backup parent chosen at random among the shallowest
//!   directory entries outside its own subtree, so the orphans of one relay scatter over several
//!   parents. A departing relay names its grandparent as successor to its most capable child, which
//!   takes over the freed slot.
//! - **Repair**: on parent loss (graceful [`TreeMsg::Leave`] or link down) the node switches to its
//!   backup at once; its subtree stays attached to it and is told it is detached until the repair
//!   is done. Without a usable backup or shallower slot it asks its lost parent's parent: alive
//!   as of the last update, it holds the lost parent's slot (it evicts that child on the word of
//!   a peer the child listed among its own children, if that peer's link to it went down --
//!   never when the child itself told the peer to go: a live relay and its whole subtree would
//!   be cut, and its own orphaned state would evict the next relay up) and fresh summaries of
//!   the neighbouring subtrees to forward to (never into the lost one). After a repair that
//!   sank it more than one level, a relay checks for a better place within a quarter to half
//!   of `rebalance_interval`. A repair request unanswered after
//!   `repair_timeout_ms` (a stale directory names departed peers) moves on to the next
//!   candidate. A node detached upstream for longer than `upstream_grace` repairs itself.
//! - **Starvation**: a full parent that knows no free slot anywhere (its subtree and its
//!   directory show none) gives a repairing or new peer that can relay the slot of a less
//!   capable child (a leaf-only one first) and hands that child over to it (at most once per
//!   `PREEMPT_GAP_MS`); with no weaker child it passes the request to one of its relay
//!   children. A member that knows no free slot names the root in its snapshot (with no free
//!   slot), and a newcomer that can relay and knows nothing better asks it. Without this, a
//!   room whose top slots are held by weak peers after its relays are lost never regrows.
//! - **Rebalancing** (bandwidth-aware placement): every `rebalance_interval` (jittered) a node
//!   looks for a free slot shallower than its own: one level up if it is more capable than its
//!   parent, two levels up otherwise, and moves there make-before-break: it attaches to the new
//!   parent before it leaves the old one, so nobody's stream is cut. With no such slot, a peer
//!   more capable than its parent (a relay, or one with room for all its parent's children)
//!   asks its grandparent for a **promotion**: the grandparent takes it in beside the parent
//!   (one child over its capacity, for at most `PROMOTION_DEADLINE_MS`), the promoted peer
//!   calls the former parent under it ([`TreeMsg::MoveUnder`]; if full, it first sends its
//!   least capable child to the slot it left there, at that child's old depth), the former
//!   parent sends its other children to the promoted peer too (they keep their depth as far as
//!   it has room) and moves make-before-break; once it has left the grandparent is back within
//!   capacity. These moves are bounded in depth (strictly above the mover, but for the former
//!   parent, which goes to its promoted child's level). Strong peers thus rise to the top and
//!   weak ones sink, one level at a time, without a cut; a grandparent grants one promotion at
//!   a time and at most one per `PROMOTION_GAP_MS`. A promotion it cannot grant is an ordinary
//!   move: a full parent asked by a more capable node relocates one of its leaf children with
//!   less capacity (make-before-break) to open a slot. A refused or unanswered move doubles the
//!   gap to the next check (up to 4 times): the whole room holds the same directory, and its
//!   shallowest entries would otherwise draw everyone's moves.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::{Millis, NodeId, SplitMix64};

/// Depth advertised by a node that currently has no path to the root.
pub const DEPTH_DETACHED: u16 = u16::MAX;
/// Longest ancestor path accepted from the network (longer means a loop or an attack).
pub const MAX_ANCESTORS: usize = 64;
/// Longest slot list accepted from the network.
const MAX_SLOTS_IN: usize = 32;
/// Remembered refusal hints.
const MAX_HINTS: usize = 24;
/// Minimum gap between two relocation orders from one parent.
const RELOCATE_GAP_MS: u64 = 10_000;
/// Failed moves in a row beyond which the rebalancing gap stops doubling (4 times).
const MAX_MOVE_BACKOFF: u8 = 2;
/// Minimum gap between two preemptions by one parent: a last resort against starvation, each
/// costs a leaf a short outage.
const PREEMPT_GAP_MS: u64 = 10_000;
/// How long an orphan with children keeps candidates below its lost parent from adopting it.
const CYCLE_GUARD_MS: u64 = 2_000;
/// First-join attempts that ask for a slot at most one level below the chosen candidate.
const NEW_BOUNDED_ATTEMPTS: u8 = 4;
/// How many times a join request may be passed down by full candidates.
const MAX_FORWARD: u8 = 3;
/// A promotion holds one child over the grandparent's capacity for at most this long; then the
/// former parent is handed to the promoted child the hard way.
const PROMOTION_DEADLINE_MS: u64 = 2_000;
/// Gap between two promotions granted by one parent.
const PROMOTION_GAP_MS: u64 = 10_000;

/// The signed state a peer announces to its tree neighbours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeUpdate {
    /// Who this is about.
    pub peer: NodeId,
    /// Current parent (`None` for the root and for a detached peer).
    pub parent: Option<NodeId>,
    /// Depth (root = 0) or [`DEPTH_DETACHED`].
    pub depth: u16,
    /// Path from the root to the parent, root first (empty when detached).
    pub ancestors: Vec<NodeId>,
    /// Current children.
    pub children: Vec<NodeId>,
    /// Maximum number of children.
    pub capacity: u16,
    /// Measured or configured uplink.
    pub uplink_kbps: u32,
    /// Increases with every update of this peer.
    pub seq: u64,
    /// Sender's clock when produced.
    pub ts_ms: u64,
}

/// An advertised free slot: `peer` at `depth` can take `free` more children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAd {
    /// The candidate parent.
    pub peer: NodeId,
    /// Its depth.
    pub depth: u16,
    /// Free child slots.
    pub free: u16,
    /// Its capacity.
    pub capacity: u16,
}

/// What a member hands a newcomer: the best free slots it knows, shallowest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Candidate parents.
    pub candidates: Vec<SlotAd>,
}

/// Why a node asks to become a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinKind {
    /// First attachment.
    New,
    /// After losing the parent.
    Repair,
    /// Rebalancing: make-before-break move of an attached node.
    Move,
    /// Directed by the departing parent to a slot in the successor's subtree; accepted even while
    /// the target is itself repairing (the departing parent made the plan acyclic).
    Handover,
    /// To the grandparent: take my parent's place (`lost_parent` names it), which is less
    /// capable than me; my parent then moves under me. Make-before-break: the grandparent holds
    /// one child over its capacity until the parent has moved.
    Promote,
}

impl JoinKind {
    /// A make-before-break move of an attached node (a refusal only delays the next check).
    pub fn is_move(self) -> bool {
        matches!(self, JoinKind::Move | JoinKind::Promote)
    }
}

/// Why a join was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefuseReason {
    /// No free slot.
    Full,
    /// Accepting would close a cycle.
    Cycle,
    /// The candidate has no path to the root right now.
    NotAttached,
    /// The candidate is deeper than the joiner allowed.
    TooDeep,
    /// The candidate is leaving.
    Leaving,
}

/// Messages exchanged point to point between peers of the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TreeMsg {
    /// Please adopt me.
    Join {
        /// Why.
        kind: JoinKind,
        /// Joiner's capacity (for bandwidth-aware decisions).
        capacity: u16,
        /// Refuse if deeper than this.
        max_depth: Option<u16>,
        /// The parent the joiner just lost (refuse if it is among your ancestors).
        lost_parent: Option<NodeId>,
        /// Set when a full candidate forwarded the request down its subtree: the real joiner,
        /// to whom the answer goes.
        joiner: Option<NodeId>,
        /// Times forwarded so far.
        hops: u8,
        /// The joiner's link to `lost_parent` went down (it crashed or vanished): the lost
        /// parent's parent may evict it at once to give the joiner its slot. Not set when the
        /// lost parent told us to go (it evicted us, or it left and told its parent itself): a
        /// live parent must not be evicted on our word, with its whole subtree.
        #[serde(default, skip_serializing_if = "is_false")]
        parent_gone: bool,
    },
    /// Adopted: the parent's update and its directory.
    Accept {
        /// The new parent's state (depth, ancestors).
        parent: TreeUpdate,
        /// The best free slots of the tree, for backups.
        directory: Vec<SlotAd>,
    },
    /// Not adopted.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// Better candidates (free slots below the refuser).
        hints: Vec<SlotAd>,
    },
    /// The sender stops being our parent or child. To a child, `successor` names where to go.
    Leave {
        /// Suggested new parent (the leaver's parent, whose slot frees).
        successor: Option<NodeId>,
    },
    /// Child to parent: the best free slots in the child's subtree.
    Summary {
        /// Shallowest first.
        slots: Vec<SlotAd>,
    },
    /// Parent to child: the best free slots of the whole tree.
    Directory {
        /// Shallowest first.
        slots: Vec<SlotAd>,
    },
    /// Parent to leaf child: please move elsewhere (make-before-break), a more capable peer needs
    /// the slot.
    Relocate,
    /// Move (make-before-break, with your subtree) under `target`: from a promoted child to its
    /// former parent (`target` is the sender), or from a parent to a child (the promoted peer's
    /// least capable child goes to the former parent, the former parent's other children to
    /// the promoted peer).
    MoveUnder {
        /// The new parent.
        target: NodeId,
    },
}

/// What happened, for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TreeEvent {
    /// First attachment.
    Joined {
        /// The parent.
        parent: NodeId,
        /// Our depth.
        depth: u16,
    },
    /// The parent changed (repair or rebalancing).
    ParentChanged {
        /// Previous parent.
        old: Option<NodeId>,
        /// New parent.
        new: NodeId,
    },
    /// Our depth changed (`None`: no path to the root right now).
    DepthChanged {
        /// New depth.
        depth: Option<u16>,
    },
    /// We lost our parent.
    Orphaned {
        /// The parent lost.
        lost: NodeId,
    },
    /// Attached again after being orphaned.
    Rejoined {
        /// New parent.
        parent: NodeId,
        /// How long we were orphaned.
        outage_ms: u64,
    },
    /// A child was accepted.
    ChildAdded(NodeId),
    /// A child left or was lost.
    ChildRemoved(NodeId),
}

/// Instructions for the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Send a message to one peer.
    Send {
        /// Recipient.
        to: NodeId,
        /// Message.
        msg: TreeMsg,
    },
    /// Sign this update and deliver it to these tree neighbours (parent and children); keep it as
    /// our current signed state.
    Publish {
        /// Our new state.
        update: TreeUpdate,
        /// Recipients.
        to: Vec<NodeId>,
    },
    /// Open the media session from this (new) parent.
    ConnectParent {
        /// The parent.
        peer: NodeId,
    },
    /// Start forwarding the stream to this child.
    AcceptChild {
        /// The child.
        peer: NodeId,
    },
    /// A join was refused (the `Refuse` message is also in the queue).
    RefuseChild {
        /// The joiner.
        peer: NodeId,
        /// Why.
        reason: RefuseReason,
    },
    /// Close the media session with this peer.
    Disconnect {
        /// The peer.
        peer: NodeId,
    },
    /// Fetch a [`Snapshot`] from any member and pass it to [`TreeNode::handle_snapshot`].
    RequestSnapshot,
    /// Call [`TreeNode::handle_timeout`] at this time (replaces earlier requests).
    Timer(Millis),
    /// For the application.
    Event(TreeEvent),
}

/// Tunables of the tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Configured maximum children (`--max-children`); `None`: uplink ÷ stream bitrate.
    pub max_children: Option<u16>,
    /// Measured or configured uplink.
    pub uplink_kbps: u32,
    /// Bitrate of the stream.
    pub stream_kbps: u32,
    /// Upper bound of the capacity, whatever the uplink.
    pub capacity_limit: u16,
    /// Entries in a subtree summary.
    pub summary_len: usize,
    /// Entries in the directory.
    pub directory_len: usize,
    /// Minimum gap between two summaries to the parent.
    pub summary_interval_ms: u64,
    /// Minimum gap between two directories to the children.
    pub directory_interval_ms: u64,
    /// Delay to coalesce updates that only change the children list.
    pub publish_coalesce_ms: u64,
    /// A join request without answer after this is considered refused.
    pub join_timeout_ms: u64,
    /// Retries after a refusal wait a random delay below this.
    pub retry_jitter_ms: u64,
    /// During this long after losing its parent a node only takes strictly shallower parents.
    pub repair_settle_ms: u64,
    /// Detached upstream for longer than this: repair ourselves.
    pub upstream_grace_ms: u64,
    /// Mean gap between two rebalancing checks (0 disables rebalancing).
    pub rebalance_interval_ms: u64,
    /// A refusing candidate is not asked again for this long.
    pub refuse_memory_ms: u64,
    /// A repair request (the stream is cut meanwhile) without answer after this (or 4 RTT of the
    /// target when measured, whichever is longer) is considered refused; a late accept is still
    /// taken or released.
    #[serde(default = "default_repair_timeout_ms")]
    pub repair_timeout_ms: u64,
    /// Summary bytes per second a parent receives from all its children together (0: no budget):
    /// a child of a parent with `c` slots sends at most `budget / c` bytes per second, and fewer
    /// entries to a parent with many slots.
    #[serde(default = "default_summary_budget")]
    pub summary_budget_bytes_per_sec: u32,
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

#[derive(Clone, Debug)]
struct ChildInfo {
    capacity: u16,
    has_children: bool,
    /// The child's own children, from its last signed update: only they may report it lost.
    kids: Vec<NodeId>,
    summary: Vec<SlotAd>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Copy, Debug)]
struct JoinReq {
    joiner: NodeId,
    kind: JoinKind,
    capacity: u16,
    max_depth: Option<u16>,
    lost_parent: Option<NodeId>,
    hops: u8,
    parent_gone: bool,
}

/// A promotion granted by this node: `new` took the place of `old`, which is to move under it.
#[derive(Clone, Copy, Debug)]
struct Promotion {
    old: NodeId,
    new: NodeId,
    deadline: Millis,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    target: NodeId,
    kind: JoinKind,
    sent: Millis,
}

#[derive(Clone, Debug)]
struct Orphan {
    since: Millis,
    old_depth: u16,
    lost: Option<NodeId>,
    successor: Option<NodeId>,
    /// Our path before the loss (tells a successor grandparent from a handover target).
    lost_ancestors: Vec<NodeId>,
    /// We were a leaf handed over elsewhere by a parent that may well stay (a preempting
    /// parent, or a departing one): we cannot close a cycle, so candidates below that parent
    /// need not refuse us.
    leaf_handover: bool,
    /// The link to the lost parent went down (it crashed or vanished), rather than a word from
    /// it: only then may its own parent evict it on our word.
    link_down: bool,
}

impl Orphan {
    /// The lost parent to name in a join request to `target`. Candidates whose path contains it
    /// refuse: a subtree must not land in a sibling subtree while both repair. A node without
    /// children cannot close a cycle, and the lost parent may be alive (it handed us over), in
    /// which case the guard would shut us out of its whole subtree: a leaf names it only to the
    /// grandparent, which then evicts a dead parent at once.
    ///
    /// A live lost parent (it evicted us, or we left it after its own repair failed) would shut
    /// our subtree out of its whole subtree -- the whole room, if it is the root -- so the guard
    /// lapses after `CYCLE_GUARD_MS`: by then a dead parent's subtree knows it is detached (and
    /// refuses joiners for that reason).
    fn cycle_guard(&self, has_children: bool, target: NodeId, now: Millis) -> Option<NodeId> {
        let grandparent = self.lost_ancestors.len() >= 2
            && self.lost_ancestors[self.lost_ancestors.len() - 2] == target;
        if self.leaf_handover && !has_children {
            // The parent that handed us over may well be alive: naming it to the grandparent
            // would have it evicted with its whole subtree.
            return None;
        }
        // Without children now we may still take some before the answer comes (a handover
        // target accepts while it repairs): only a leaf handed over by its parent goes unguarded.
        let guarded = (has_children || !self.leaf_handover)
            && self.lost_ancestors.len() >= 2
            && now < self.since.plus(CYCLE_GUARD_MS);
        self.lost.filter(|_| guarded || grandparent)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Path {
    depth: u16,
    /// Root first, parent last.
    ancestors: Vec<NodeId>,
}

/// One peer's view of the relay tree and its decisions. See the module docs.
#[derive(Debug)]
pub struct TreeNode {
    id: NodeId,
    cfg: Config,
    capacity: u16,
    rng: SplitMix64,
    is_root: bool,
    started: bool,
    joined_once: bool,
    left: bool,
    parent: Option<NodeId>,
    parent_capacity: u16,
    /// Children of our parent (us included), from its last update.
    parent_children: u16,
    path: Option<Path>,
    last_depth: u16,
    children: BTreeMap<NodeId, ChildInfo>,
    backup: Option<NodeId>,
    directory: Vec<SlotAd>,
    hints: Vec<SlotAd>,
    refused: BTreeMap<NodeId, Millis>,
    rtt: BTreeMap<NodeId, u32>,
    pending: Option<Pending>,
    orphan: Option<Orphan>,
    upstream_detached_since: Option<Millis>,
    seq: u64,
    retry_at: Option<Millis>,
    publish_due: Option<Millis>,
    summary_due: Option<Millis>,
    last_summary_at: Option<Millis>,
    last_summary: Vec<SlotAd>,
    dir_due: Option<Millis>,
    last_dir_at: Option<Millis>,
    rebalance_at: Option<Millis>,
    last_relocate_at: Option<Millis>,
    /// Last time a leaf-only child was handed over to make room for a repairing relay.
    last_preempt_at: Option<Millis>,
    /// Failed moves in a row: each doubles the gap to the next rebalancing check, so nodes whose
    /// directory is stale do not flood the few shallow slots it names.
    move_failures: u8,
    /// First-join attempts so far (the first few are bounded in depth).
    new_attempts: u8,
    /// The root, named by a snapshot that knew no free slot.
    root_hint: Option<NodeId>,
    /// As grandparent: a promotion in flight (one child over capacity until it ends).
    promotion: Option<Promotion>,
    last_promotion_at: Option<Millis>,
    /// As promoted peer: the former parent, which is to move under us (and until when).
    promoted_from: Option<(NodeId, Millis)>,
    /// As promoted peer with no free slot: the former parent's move, answered once the child
    /// we sent to it has left.
    held: Option<JoinReq>,
    last_timer: Option<Millis>,
    out: VecDeque<Output>,
}

impl TreeNode {
    /// A viewer that has not joined yet; call [`TreeNode::start`].
    pub fn new(id: NodeId, cfg: Config, seed: u64) -> Self {
        let capacity = cfg.capacity();
        TreeNode {
            id,
            cfg,
            capacity,
            rng: SplitMix64::new(seed),
            is_root: false,
            started: false,
            joined_once: false,
            left: false,
            parent: None,
            parent_capacity: 0,
            parent_children: 0,
            path: None,
            last_depth: 0,
            children: BTreeMap::new(),
            backup: None,
            directory: Vec::new(),
            hints: Vec::new(),
            refused: BTreeMap::new(),
            rtt: BTreeMap::new(),
            pending: None,
            orphan: None,
            upstream_detached_since: None,
            seq: 0,
            retry_at: None,
            publish_due: None,
            summary_due: None,
            last_summary_at: None,
            last_summary: Vec::new(),
            dir_due: None,
            last_dir_at: None,
            rebalance_at: None,
            last_relocate_at: None,
            last_preempt_at: None,
            move_failures: 0,
            new_attempts: 0,
            root_hint: None,
            promotion: None,
            last_promotion_at: None,
            promoted_from: None,
            held: None,
            last_timer: None,
            out: VecDeque::new(),
        }
    }

    /// The broadcaster: attached at depth 0 from the start.
    pub fn new_root(id: NodeId, cfg: Config, seed: u64) -> Self {
        let mut n = TreeNode::new(id, cfg, seed);
        n.is_root = true;
        n.started = true;
        n.joined_once = true;
        n.path = Some(Path {
            depth: 0,
            ancestors: Vec::new(),
        });
        n
    }

    // ----- accessors -----

    /// Our identity.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Whether we are the root.
    pub fn is_root(&self) -> bool {
        self.is_root
    }

    /// Children allowed beyond the capacity right now: 1 while a promotion is in flight (the
    /// make-before-break overlap, at most `PROMOTION_DEADLINE_MS`), else 0.
    pub fn over_capacity_allowance(&self) -> u16 {
        u16::from(self.promotion.is_some())
    }
    /// Current parent.
    pub fn parent(&self) -> Option<NodeId> {
        self.parent
    }
    /// Current backup parent.
    pub fn backup(&self) -> Option<NodeId> {
        self.backup
    }
    /// Depth, if we have a path to the root.
    pub fn depth(&self) -> Option<u16> {
        self.path.as_ref().map(|p| p.depth)
    }
    /// Root-first path to our parent (empty when detached).
    pub fn ancestors(&self) -> &[NodeId] {
        self.path.as_ref().map_or(&[], |p| &p.ancestors)
    }
    /// Current children.
    pub fn children(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.children.keys().copied()
    }
    /// Number of children.
    pub fn child_count(&self) -> usize {
        self.children.len()
    }
    /// Maximum children.
    pub fn capacity(&self) -> u16 {
        self.capacity
    }
    /// Whether we have a path to the root (as far as we know).
    pub fn is_attached(&self) -> bool {
        self.path.is_some()
    }
    /// Whether we lost our parent and are repairing.
    pub fn is_orphan(&self) -> bool {
        self.orphan.is_some()
    }
    /// Whether [`TreeNode::leave`] was called.
    pub fn has_left(&self) -> bool {
        self.left
    }
    /// The directory (best free slots of the tree) as last received.
    pub fn directory(&self) -> &[SlotAd] {
        &self.directory
    }

    /// Our current state as an update (the shell signs it).
    pub fn current_update(&self, now: Millis) -> TreeUpdate {
        TreeUpdate {
            peer: self.id,
            parent: self.parent,
            depth: self.depth().unwrap_or(DEPTH_DETACHED),
            ancestors: self.ancestors().to_vec(),
            children: self.children.keys().copied().collect(),
            capacity: self.capacity,
            uplink_kbps: self.cfg.uplink_kbps,
            seq: self.seq,
            ts_ms: now.0,
        }
    }

    /// Next output for the shell.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`TreeNode::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let pending = self.pending.map(|p| p.sent.plus(self.timeout_for(&p)));
        let upstream = self
            .upstream_detached_since
            .map(|t| t.plus(self.cfg.upstream_grace_ms));
        [
            pending,
            upstream,
            self.retry_at,
            self.publish_due,
            self.summary_due,
            self.dir_due,
            self.rebalance_at,
            self.promotion.map(|p| p.deadline),
            self.promoted_from.map(|(_, t)| t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// How long to wait for an answer to a join request: repairs are urgent (the subtree has no
    /// stream), and a target that does not answer quickly is most likely gone.
    fn timeout_for(&self, p: &Pending) -> u64 {
        match p.kind {
            JoinKind::Repair | JoinKind::Handover => {
                let rtt = self.rtt.get(&p.target).map_or(0, |r| 4 * *r as u64);
                self.cfg
                    .repair_timeout_ms
                    .max(rtt)
                    .min(self.cfg.join_timeout_ms)
            }
            JoinKind::New | JoinKind::Move | JoinKind::Promote => self.cfg.join_timeout_ms,
        }
    }

    /// Record a measured RTT to a peer (tie-break between equal candidates).
    pub fn set_rtt(&mut self, peer: NodeId, rtt_ms: u32) {
        self.rtt.insert(peer, rtt_ms);
    }

    /// The best candidates we know for a newcomer: our subtree's free slots and the directory,
    /// shallowest first, at most `max`.
    pub fn snapshot_for_newcomer(&self, max: usize) -> Snapshot {
        let mut all = self.compute_summary(self.cfg.directory_len.max(max));
        all.extend(self.directory.iter().copied());
        sort_ads(&mut all);
        dedup_ads(&mut all);
        all.retain(|a| a.free > 0);
        all.truncate(max);
        if all.is_empty() && self.depth().is_some() {
            // We know no free slot anywhere: name the root (free 0) so the newcomer has someone
            // to ask; a starved root makes room for a peer that can relay.
            let root = self.ancestors().first().copied().unwrap_or(self.id);
            all.push(SlotAd {
                peer: root,
                depth: 0,
                free: 0,
                capacity: 0,
            });
        }
        Snapshot { candidates: all }
    }

    // ----- inputs -----

    /// Begin joining: asks the shell for a snapshot.
    pub fn start(&mut self, now: Millis) {
        if self.started || self.left {
            return;
        }
        self.started = true;
        self.attempt_join(now);
        self.after(now);
    }

    /// A snapshot arrived (answer to [`Output::RequestSnapshot`]).
    pub fn handle_snapshot(&mut self, snapshot: Snapshot, now: Millis) {
        if self.left {
            return;
        }
        for ad in snapshot.candidates.into_iter().take(MAX_SLOTS_IN) {
            if ad.free == 0 && ad.depth == 0 && ad.peer != self.id {
                self.root_hint = Some(ad.peer);
            }
            self.add_hint(ad);
        }
        if self.pending.is_none() && (self.orphan.is_some() || !self.joined_once) {
            self.retry_at = None;
            self.attempt_join(now);
        }
        self.after(now);
    }

    /// A message from a peer.
    pub fn handle_message(&mut self, from: NodeId, msg: TreeMsg, now: Millis) {
        if self.left || from == self.id {
            return;
        }
        match msg {
            TreeMsg::Join {
                kind,
                capacity,
                max_depth,
                lost_parent,
                joiner,
                hops,
                parent_gone,
            } => {
                let req = JoinReq {
                    joiner: joiner.unwrap_or(from),
                    kind,
                    capacity,
                    max_depth,
                    lost_parent,
                    hops,
                    parent_gone,
                };
                self.on_join(req, now)
            }
            TreeMsg::Accept { parent, directory } => self.on_accept(from, parent, directory, now),
            TreeMsg::Refuse { reason: _, hints } => self.on_refuse(from, hints, now),
            TreeMsg::Leave { successor } => self.on_leave(from, successor, now),
            TreeMsg::Summary { mut slots } => {
                if let Some(c) = self.children.get_mut(&from) {
                    slots.truncate(MAX_SLOTS_IN);
                    c.summary = slots;
                    self.summary_dirty(now);
                }
            }
            TreeMsg::Directory { mut slots } => {
                if self.parent == Some(from) && !self.is_root {
                    slots.truncate(MAX_SLOTS_IN);
                    if slots != self.directory {
                        self.directory = slots;
                        self.directory_changed(now);
                    }
                }
            }
            TreeMsg::Relocate => self.on_relocate(from, now),
            TreeMsg::MoveUnder { target } => self.on_move_under(from, target, now),
        }
        self.after(now);
    }

    /// A signed update from a tree neighbour (delivered by the shell after [`Output::Publish`]).
    pub fn handle_update(&mut self, from: NodeId, update: TreeUpdate, now: Millis) {
        if self.left || update.peer != from {
            return;
        }
        if self.parent == Some(from) {
            self.on_parent_update(update, now);
        } else if let Some(c) = self.children.get_mut(&from) {
            c.capacity = update.capacity;
            c.has_children = !update.children.is_empty();
            c.kids = update.children;
            c.kids.truncate(MAX_SLOTS_IN);
        }
        self.after(now);
    }

    /// The transport lost the connection to `peer` (WebRTC failed/closed, or no RTCP for too long).
    pub fn handle_link_down(&mut self, peer: NodeId, now: Millis) {
        if self.left {
            return;
        }
        if self.parent == Some(peer) {
            self.parent_lost(None, true, now);
        }
        if self.children.contains_key(&peer) {
            self.remove_child(peer, now);
        }
        if self.pending.is_some_and(|p| p.target == peer) {
            self.give_up_pending(now);
        }
        self.after(now);
    }

    /// Timers.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.left {
            return;
        }
        self.last_timer = None;
        if self
            .pending
            .is_some_and(|p| now >= p.sent.plus(self.timeout_for(&p)))
        {
            self.give_up_pending(now);
        }
        if self.publish_due.is_some_and(|t| now >= t) {
            self.publish_now(now);
        }
        if self.summary_due.is_some_and(|t| now >= t) {
            self.flush_summary(now);
        }
        if self.dir_due.is_some_and(|t| now >= t) {
            self.flush_directory(now);
        }
        if self
            .upstream_detached_since
            .is_some_and(|t| now >= t.plus(self.cfg.upstream_grace_ms))
        {
            // Our ancestors could not repair in time: repair ourselves.
            self.upstream_detached_since = None;
            if let Some(p) = self.parent {
                self.send(p, TreeMsg::Leave { successor: None });
            }
            self.parent_lost(None, false, now);
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.attempt_join(now);
        }
        if self.rebalance_at.is_some_and(|t| now >= t) {
            self.rebalance_at = None;
            self.rebalance(now);
        }
        if let Some(pr) = self.promotion
            && now >= pr.deadline
        {
            self.promotion = None;
            // The former parent did not move under the promoted peer in time: hand it over the
            // hard way (its subtree has a short cut) rather than stay over capacity.
            while self.children.len() > self.capacity as usize {
                let (victim, successor) = if self.children.contains_key(&pr.old) {
                    (
                        pr.old,
                        self.children.contains_key(&pr.new).then_some(pr.new),
                    )
                } else {
                    (pr.new, None)
                };
                if !self.children.contains_key(&victim) {
                    break;
                }
                self.send(victim, TreeMsg::Leave { successor });
                self.out.push_back(Output::Disconnect { peer: victim });
                self.remove_child(victim, now);
            }
        }
        if self.promoted_from.is_some_and(|(_, t)| now >= t) {
            self.promoted_from = None;
            if let Some(h) = self.held.take() {
                self.send(
                    h.joiner,
                    TreeMsg::Refuse {
                        reason: RefuseReason::Full,
                        hints: Vec::new(),
                    },
                );
            }
        }
        self.after(now);
    }

    /// Leave gracefully: children and parent are told; the most capable child is pointed at our
    /// parent, whose slot we free.
    pub fn leave(&mut self, now: Millis) {
        if self.left {
            return;
        }
        // The most capable child takes our slot at our parent; its siblings are directed to the
        // free slots of its subtree (disjoint from theirs, so the plan has no cycle), where they
        // keep their depth. Those without a slot fall back on their backups.
        let successor_child = self
            .children
            .iter()
            .max_by_key(|(id, c)| (c.capacity, c.has_children, Reverse(**id)))
            .map(|(id, _)| *id);
        let mut slots: Vec<SlotAd> = successor_child
            .and_then(|s| self.children.get(&s))
            .map(|c| c.summary.clone())
            .unwrap_or_default();
        let kids: Vec<NodeId> = self.children.keys().copied().collect();
        for c in kids {
            let successor = if Some(c) == successor_child {
                self.parent.filter(|_| self.path.is_some())
            } else if let (Some(_), Some(d)) = (successor_child, self.depth()) {
                // Only the successor and its children: the orphan ends at most one level deeper.
                slots
                    .iter_mut()
                    .find(|a| a.free > 0 && a.depth <= d + 2)
                    .map(|a| {
                        a.free -= 1;
                        a.peer
                    })
            } else {
                None
            };
            self.send(c, TreeMsg::Leave { successor });
            self.out.push_back(Output::Disconnect { peer: c });
        }
        if let Some(p) = self.parent {
            self.send(p, TreeMsg::Leave { successor: None });
            self.out.push_back(Output::Disconnect { peer: p });
        }
        if let Some(p) = self.pending.take() {
            // If it accepts after all, our absence will time out there; tell it now.
            self.send(p.target, TreeMsg::Leave { successor: None });
        }
        self.left = true;
        self.children.clear();
        self.parent = None;
        self.path = None;
        self.orphan = None;
        self.retry_at = None;
        self.publish_due = None;
        self.summary_due = None;
        self.dir_due = None;
        self.rebalance_at = None;
        self.upstream_detached_since = None;
        let _ = now;
    }

    // ----- join side -----

    fn on_accept(&mut self, from: NodeId, upd: TreeUpdate, directory: Vec<SlotAd>, now: Millis) {
        // The answer may come from where a full target forwarded our request.
        let Some(p) = self.pending else {
            // Stale (we timed out and went elsewhere): free the slot we were given.
            if self.parent != Some(from) {
                self.send(from, TreeMsg::Leave { successor: None });
            }
            return;
        };
        self.pending = None;
        let bad = (upd.depth == DEPTH_DETACHED && p.kind != JoinKind::Handover)
            || upd.ancestors.len() >= MAX_ANCESTORS
            || upd.ancestors.contains(&self.id)
            || upd.peer != from;
        if bad {
            self.send(from, TreeMsg::Leave { successor: None });
            self.refused
                .insert(from, now.plus(self.cfg.refuse_memory_ms));
            self.schedule_retry(now);
            return;
        }
        let old = self.parent;
        if let Some(o) = old.filter(|o| *o != from) {
            if p.kind == JoinKind::Promote {
                // We hold our former parent's place: it comes under us. If we have no free slot
                // our least capable child takes the one we leave at the former parent (at its
                // old depth), and the former parent's move waits for it.
                self.send(o, TreeMsg::MoveUnder { target: self.id });
                self.promoted_from = Some((o, now.plus(PROMOTION_DEADLINE_MS)));
                if self.free() == 0
                    && let Some(k) = self
                        .children
                        .iter()
                        .min_by_key(|(id, c)| (c.has_children, c.capacity, **id))
                        .map(|(id, _)| *id)
                {
                    self.send(k, TreeMsg::MoveUnder { target: o });
                }
            } else {
                // Make-before-break: the new parent is in place, now leave the old one.
                self.send(o, TreeMsg::Leave { successor: None });
            }
            self.out.push_back(Output::Disconnect { peer: o });
        }
        self.parent = Some(from);
        self.parent_capacity = upd.capacity;
        self.parent_children = upd.children.len().min(u16::MAX as usize) as u16;
        if upd.depth == DEPTH_DETACHED {
            // Handover to a sibling that is itself repairing: we follow it once it is attached.
            self.path = None;
            self.upstream_detached_since = Some(now);
            self.hints.clear();
            self.out.push_back(Output::ConnectParent { peer: from });
            self.emit(TreeEvent::ParentChanged { old, new: from });
            self.orphan = None;
            self.publish_now(now);
            return;
        }
        let mut ancestors = upd.ancestors;
        ancestors.push(from);
        let new_path = Path {
            depth: upd.depth.saturating_add(1),
            ancestors,
        };
        self.last_depth = new_path.depth;
        let depth = new_path.depth;
        self.path = Some(new_path);
        self.upstream_detached_since = None;
        self.hints.clear();
        let mut directory = directory;
        directory.truncate(MAX_SLOTS_IN);
        if !self.is_root {
            self.directory = directory;
        }
        self.out.push_back(Output::ConnectParent { peer: from });
        if !self.joined_once {
            self.joined_once = true;
            self.emit(TreeEvent::Joined {
                parent: from,
                depth,
            });
        } else {
            self.emit(TreeEvent::ParentChanged { old, new: from });
        }
        // A relay repaired far below its old place (its own region was repairing too, or no
        // shallower slot answered in time) drags its subtree down: look for better soon.
        let sank = !self.children.is_empty()
            && self
                .orphan
                .as_ref()
                .is_some_and(|o| depth > o.old_depth.saturating_add(1));
        if let Some(o) = self.orphan.take() {
            self.emit(TreeEvent::Rejoined {
                parent: from,
                outage_ms: now.since(o.since),
            });
        }
        self.emit(TreeEvent::DepthChanged { depth: Some(depth) });
        // Children need the new path at once (cycle safety), the new parent our summary.
        self.publish_now(now);
        self.last_summary_at = None;
        self.last_summary.clear();
        self.summary_dirty(now);
        self.directory_changed(now);
        self.choose_backup(now);
        if p.kind.is_move() {
            self.move_failures = 0;
            // Stay put for a while after a move.
            self.rebalance_at = Some(now.plus(2 * self.rebalance_gap()));
        } else if sank {
            self.move_failures = 0;
            let base = self.cfg.rebalance_interval_ms / 4;
            self.rebalance_at = Some(now.plus(base + self.rng.below(base.max(1))));
        } else if self.rebalance_at.is_none() {
            self.rebalance_at = Some(now.plus(self.rebalance_gap()));
        }
    }

    fn on_refuse(&mut self, from: NodeId, hints: Vec<SlotAd>, now: Millis) {
        if self.pending.is_none() {
            return;
        }
        let kind = self.pending.map(|p| p.kind);
        let until = now.plus(self.cfg.refuse_memory_ms);
        if let Some(p) = self.pending.take() {
            // Full, or it would not have forwarded.
            self.forget(p.target, until);
        }
        self.forget(from, until);
        for h in hints.into_iter().take(MAX_SLOTS_IN) {
            self.add_hint(h);
        }
        if !kind.is_some_and(JoinKind::is_move) {
            self.schedule_retry(now);
        } else {
            self.move_failed(now);
        }
    }

    fn give_up_pending(&mut self, now: Millis) {
        if let Some(p) = self.pending.take() {
            self.forget(p.target, now.plus(self.cfg.refuse_memory_ms));
            if !p.kind.is_move() || self.orphan.is_some() {
                self.retry_at = Some(now);
            } else {
                self.move_failed(now);
            }
        }
    }

    /// A candidate refused or did not answer: not again for a while, and out of our copies of
    /// the directory and hints (else a stale directory full of departed peers loops forever;
    /// once empty we ask for a fresh snapshot).
    fn forget(&mut self, peer: NodeId, until: Millis) {
        self.refused.insert(peer, until);
        self.hints.retain(|h| h.peer != peer);
        self.directory.retain(|h| h.peer != peer);
    }

    fn schedule_retry(&mut self, now: Millis) {
        let jitter = self.rng.below(self.cfg.retry_jitter_ms.max(1));
        self.retry_at = Some(now.plus(jitter));
    }

    fn add_hint(&mut self, ad: SlotAd) {
        if ad.peer == self.id || ad.free == 0 || ad.depth == DEPTH_DETACHED {
            return;
        }
        self.hints.retain(|h| h.peer != ad.peer);
        self.hints.insert(0, ad);
        self.hints.truncate(MAX_HINTS);
    }

    /// Peers known to be in our own subtree (children and what their summaries name).
    fn in_own_subtree(&self, peer: NodeId) -> bool {
        self.children.contains_key(&peer)
            || self
                .children
                .values()
                .any(|c| c.summary.iter().any(|a| a.peer == peer))
    }

    fn usable(&self, ad: &SlotAd, now: Millis) -> bool {
        ad.peer != self.id
            && ad.free > 0
            && ad.depth != DEPTH_DETACHED
            && Some(ad.peer) != self.parent
            && self.orphan.as_ref().is_none_or(|o| o.lost != Some(ad.peer))
            && self.refused.get(&ad.peer).is_none_or(|t| *t <= now)
            && !self.in_own_subtree(ad.peer)
    }

    /// Usable candidates: the hints (fresh: from a snapshot or a refusal) if any, else the
    /// directory (older, often stale at the top).
    fn candidates(&self, now: Millis) -> Vec<SlotAd> {
        let mut v: Vec<SlotAd> = self
            .hints
            .iter()
            .filter(|a| self.usable(a, now))
            .copied()
            .collect();
        if v.is_empty() {
            v = self
                .directory
                .iter()
                .filter(|a| self.usable(a, now))
                .copied()
                .collect();
        }
        dedup_ads(&mut v);
        v
    }

    /// Candidates for a move: the directory and the hints together. Hints outlive the join or
    /// refused move that brought them (they are cleared only by an accept), and a refused move
    /// leaves those of a deep subtree: taken alone they would hide the directory's shallow slots
    /// from every later move, and pin a sunk subtree where it is.
    fn move_candidates(&self, now: Millis) -> Vec<SlotAd> {
        let mut v: Vec<SlotAd> = self
            .hints
            .iter()
            .chain(self.directory.iter())
            .filter(|a| self.usable(a, now))
            .copied()
            .collect();
        dedup_ads(&mut v);
        v
    }

    /// Join rule: smallest depth first. Among the candidates of that depth the choice is random,
    /// weighted by spare slots and by RTT: the tie-breaks of the design (spare capacity, then
    /// RTT) as preferences rather than absolutes, so that joiners holding the same directory
    /// do not all race for one slot.
    fn pick(&mut self, cands: &[SlotAd]) -> Option<SlotAd> {
        let min = cands.iter().map(|a| a.depth).min()?;
        let weights: Vec<(SlotAd, u64)> = cands
            .iter()
            .filter(|a| a.depth <= min.saturating_add(1))
            .map(|a| {
                let rtt = self.rtt.get(&a.peer).copied().unwrap_or(100).max(1) as u64;
                let near = if a.depth == min { 2 } else { 1 };
                (*a, (a.free as u64 * near * 1_000_000) / rtt)
            })
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| *w).sum();
        let mut r = self.rng.below(total.max(1));
        for (a, w) in &weights {
            if r < *w {
                return Some(*a);
            }
            r -= w;
        }
        weights.first().map(|(a, _)| *a)
    }

    fn attempt_join(&mut self, now: Millis) {
        if self.left || self.pending.is_some() || self.is_root {
            return;
        }
        self.refused.retain(|_, t| *t > now);
        let (kind, max_depth, lost) = if let Some(o) = self.orphan.clone() {
            // Without children we cannot close a cycle: no need to wait for shallower parents.
            let strict = !self.children.is_empty() && now < o.since.plus(self.cfg.repair_settle_ms);
            // Successor named by the departed parent first, then the backup.
            let mut target = None;
            // The departing parent's plan comes first, even from a candidate that refused us
            // lately (its slot is the one the departure frees). Once tried, it is dropped.
            if let Some(s) = o.successor {
                if let Some(orphan) = self.orphan.as_mut() {
                    orphan.successor = None;
                }
                let kind = if o.lost_ancestors.contains(&s) {
                    JoinKind::Repair
                } else {
                    JoinKind::Handover
                };
                let md = (kind == JoinKind::Repair).then(|| o.old_depth.saturating_sub(1));
                let guard = o.cycle_guard(!self.children.is_empty(), s, now);
                self.send_join(s, kind, md, guard, now);
                return;
            }
            if target.is_none() {
                let cands = self.candidates(now);
                let shallower: Vec<SlotAd> = cands
                    .iter()
                    .filter(|a| a.depth < o.old_depth)
                    .copied()
                    .collect();
                let backup = self
                    .backup
                    .and_then(|b| shallower.iter().find(|a| a.peer == b).copied());
                // The lost parent's parent: alive as of our last update, it has the slot of the
                // lost parent (it evicts it on our word), and fresh summaries of the neighbouring
                // subtrees to forward us to; a directory entry may be long gone.
                let grandparent = (o.lost_ancestors.len() >= 2)
                    .then(|| o.lost_ancestors[o.lost_ancestors.len() - 2])
                    .filter(|g| *g != self.id && self.refused.get(g).is_none_or(|t| *t <= now));
                if let Some(b) = backup {
                    target = Some((b.peer, Some(o.old_depth.saturating_sub(1))));
                } else if let Some(a) = self.pick(&shallower) {
                    target = Some((a.peer, Some(o.old_depth.saturating_sub(1))));
                } else if let Some(g) = grandparent {
                    target = Some((g, Some(o.old_depth.saturating_sub(1))));
                } else if strict {
                    self.retry_at = Some(o.since.plus(self.cfg.repair_settle_ms));
                    return;
                } else if let Some(a) = self.pick(&cands) {
                    target = Some((a.peer, None));
                }
            }
            if target.is_none()
                && self.capacity > 0
                && let Some(r) = self
                    .root_hint
                    .filter(|r| self.refused.get(r).is_none_or(|t| *t <= now))
            {
                // Nobody we know has a free slot (a starved room): ask the root, which makes
                // room for a peer that can relay, as for a newcomer.
                target = Some((r, None));
            }
            match target {
                Some((t, md)) => {
                    let guard = o.cycle_guard(!self.children.is_empty(), t, now);
                    self.send_join(t, JoinKind::Repair, md, guard, now);
                }
                None => self.need_snapshot(now),
            }
            return;
        } else if !self.joined_once {
            (JoinKind::New, None, None)
        } else {
            return;
        };
        let cands = self.candidates(now);
        match self.pick(&cands) {
            None if self.capacity > 0
                && let Some(r) = self
                    .root_hint
                    .filter(|r| self.refused.get(r).is_none_or(|t| *t <= now)) =>
            {
                // Nobody has a free slot (a starved room): ask the root, which makes room for a
                // peer that can relay.
                self.send_join(r, kind, None, None, now)
            }
            Some(a) => {
                // A full target passes the request down its subtree, whose shallowest free slot
                // may be far deeper than what we know elsewhere: allow one level of slack, and
                // drop the bound after a few refusals (we must land somewhere).
                self.new_attempts = self.new_attempts.saturating_add(1);
                let slack = 1 + (self.new_attempts.saturating_sub(1) / NEW_BOUNDED_ATTEMPTS) as u16;
                let bound = (self.new_attempts <= 3 * NEW_BOUNDED_ATTEMPTS)
                    .then(|| a.depth.saturating_add(slack));
                self.send_join(a.peer, kind, max_depth.or(bound), lost, now)
            }
            None => self.need_snapshot(now),
        }
    }

    fn need_snapshot(&mut self, now: Millis) {
        self.out.push_back(Output::RequestSnapshot);
        self.retry_at = Some(now.plus(self.cfg.join_timeout_ms));
    }

    fn send_join(
        &mut self,
        target: NodeId,
        kind: JoinKind,
        max_depth: Option<u16>,
        lost_parent: Option<NodeId>,
        now: Millis,
    ) {
        self.pending = Some(Pending {
            target,
            kind,
            sent: now,
        });
        let parent_gone = kind == JoinKind::Repair
            && lost_parent.is_some()
            && self
                .orphan
                .as_ref()
                .is_some_and(|o| o.link_down && o.lost == lost_parent);
        self.send(
            target,
            TreeMsg::Join {
                kind,
                capacity: self.capacity,
                max_depth,
                lost_parent,
                joiner: None,
                hops: 0,
                parent_gone,
            },
        );
    }

    fn on_relocate(&mut self, from: NodeId, now: Millis) {
        if self.parent != Some(from) || !self.children.is_empty() || self.pending.is_some() {
            return;
        }
        let Some(depth) = self.depth() else { return };
        let cands = self.candidates(now);
        if let Some(a) = self.pick(&cands) {
            // Any depth will do: we are a leaf, the slot is wanted by a more capable peer.
            let _ = depth;
            self.send_join(a.peer, JoinKind::Move, None, None, now);
        }
    }

    fn rebalance_gap(&mut self) -> u64 {
        let base = self.cfg.rebalance_interval_ms;
        (base / 2 + self.rng.below(base.max(1))) << self.move_failures.min(MAX_MOVE_BACKOFF)
    }

    /// A move was refused or not answered: back off.
    fn move_failed(&mut self, now: Millis) {
        self.move_failures = self.move_failures.saturating_add(1).min(MAX_MOVE_BACKOFF);
        if self.cfg.rebalance_interval_ms > 0 {
            self.rebalance_at = Some(now.plus(self.rebalance_gap()));
        }
    }

    fn rebalance(&mut self, now: Millis) {
        if self.cfg.rebalance_interval_ms == 0 {
            return;
        }
        self.rebalance_at = Some(now.plus(self.rebalance_gap()));
        if self.is_root
            || self.pending.is_some()
            || self.orphan.is_some()
            || self.promotion.is_some()
            || self.promoted_from.is_some()
        {
            return;
        }
        let Some(d) = self.depth() else { return };
        if d < 2 || (self.capacity == 0 && self.children.is_empty()) {
            return;
        }
        let more_capable = self.capacity > self.parent_capacity;
        let cands: Vec<SlotAd> = self
            .move_candidates(now)
            .into_iter()
            .filter(|a| a.depth + 2 <= d)
            .collect();
        if let Some(a) = self.pick(&cands) {
            let worthwhile = more_capable || a.depth + 3 <= d;
            if worthwhile {
                self.send_join(a.peer, JoinKind::Move, Some(d - 2), None, now);
                return;
            }
        }
        if more_capable
            && self.capacity > 1
            && (self.free() >= self.parent_children || !self.children.is_empty())
            && self.promotion.is_none()
            && self.promoted_from.is_none()
        {
            // No free slot above: ask the grandparent to put us in our parent's place (the
            // parent then moves under us); failing that it may relocate a weaker leaf for us.
            let anc = self.ancestors();
            if anc.len() >= 2 {
                let g = anc[anc.len() - 2];
                if self.refused.get(&g).is_none_or(|t| *t <= now) {
                    self.send_join(g, JoinKind::Promote, Some(d - 2), self.parent, now);
                }
            }
        }
    }

    // ----- parent side -----

    fn free(&self) -> u16 {
        self.capacity
            .saturating_sub(self.children.len().min(u16::MAX as usize) as u16)
    }

    fn on_join(&mut self, req: JoinReq, now: Millis) {
        let JoinReq {
            joiner: from,
            kind,
            capacity,
            max_depth,
            lost_parent,
            hops,
            parent_gone,
        } = req;
        if from == self.id {
            return;
        }
        if kind == JoinKind::Promote && self.try_promote(&req, now) {
            return;
        }
        // A promotion we cannot grant is an ordinary move.
        let req = JoinReq {
            kind: if kind == JoinKind::Promote {
                JoinKind::Move
            } else {
                kind
            },
            ..req
        };
        let kind = req.kind;
        if kind == JoinKind::Move
            && self
                .promoted_from
                .is_some_and(|(o, t)| o == from && now < t)
        {
            if self.free() == 0 && !self.children.contains_key(&from) {
                // Our former parent, while the child we sent to it has not left yet.
                self.held = Some(req);
                return;
            }
            self.promoted_from = None;
        }
        let handover = kind == JoinKind::Handover;
        if kind == JoinKind::Repair
            && parent_gone
            && let Some(l) = lost_parent
            && self
                .children
                .get(&l)
                .is_some_and(|c| c.kids.contains(&from))
        {
            // A child of our child `l` lost it: `l` crashed or left (its own word may still be on
            // the way, and our transport notices later). Its slot is the orphan's best place.
            self.send(l, TreeMsg::Leave { successor: None });
            self.out.push_back(Output::Disconnect { peer: l });
            self.remove_child(l, now);
        }
        let reason = if self.children.contains_key(&from) {
            None // duplicate (our Accept was lost or is in flight): accept again
        } else if handover {
            if self.ancestors().contains(&from) || self.parent == Some(from) {
                Some(RefuseReason::Cycle)
            } else if self.free() == 0 {
                Some(RefuseReason::Full)
            } else {
                None
            }
        } else if self.path.is_none() {
            Some(RefuseReason::NotAttached)
        } else if self.ancestors().contains(&from)
            || lost_parent.is_some_and(|l| l == self.id || self.ancestors().contains(&l))
            || self.parent == Some(from)
            || self.pending.is_some_and(|p| p.target == from)
        {
            Some(RefuseReason::Cycle)
        } else if max_depth.is_some_and(|m| self.depth().is_some_and(|d| d > m)) {
            Some(RefuseReason::TooDeep)
        } else if self.free() == 0 {
            Some(RefuseReason::Full)
        } else {
            None
        };
        if reason == Some(RefuseReason::Full)
            && !handover
            && hops < MAX_FORWARD
            && self.forward_join(&req, now)
        {
            return;
        }
        let mut reason = reason;
        if reason == Some(RefuseReason::Full)
            && matches!(kind, JoinKind::Repair | JoinKind::New)
            && self.knows_no_free_slot()
            && self
                .last_preempt_at
                .is_none_or(|t| now.since(t) >= PREEMPT_GAP_MS)
            && let Some(v) = self.preemptible_child(capacity)
        {
            // Nowhere below to send it: rather than leave a more capable peer (and the subtree
            // it may carry) without a place, give it a weaker child's slot and hand that child
            // over to it (the newcomer has room: it is more capable than the child, and if it
            // is full after all the child is refused with hints and goes elsewhere). Without
            // this, a room whose top slots are all held by weak peers starves its relays.
            self.send(
                v,
                TreeMsg::Leave {
                    successor: Some(from),
                },
            );
            self.out.push_back(Output::Disconnect { peer: v });
            self.remove_child(v, now);
            self.last_preempt_at = Some(now);
            reason = None;
        }
        if reason == Some(RefuseReason::Full)
            && matches!(kind, JoinKind::Repair | JoinKind::New)
            && capacity > 0
            && hops < MAX_FORWARD
            && self.knows_no_free_slot()
        {
            // Starved, and no weaker child here: one of our relay children may have one.
            let relays: Vec<NodeId> = self
                .children
                .iter()
                .filter(|(id, c)| c.has_children && Some(**id) != lost_parent && **id != from)
                .map(|(id, _)| *id)
                .collect();
            if !relays.is_empty() {
                let t = relays[self.rng.below(relays.len() as u64) as usize];
                self.send(
                    t,
                    TreeMsg::Join {
                        kind,
                        capacity,
                        max_depth,
                        lost_parent,
                        joiner: Some(from),
                        hops: hops + 1,
                        parent_gone: false,
                    },
                );
                return;
            }
        }
        if let Some(reason) = reason {
            let hints: Vec<SlotAd> = if reason == RefuseReason::Full {
                self.compute_summary(self.cfg.summary_len)
                    .into_iter()
                    .filter(|a| a.peer != self.id && a.peer != from)
                    .collect()
            } else {
                Vec::new()
            };
            self.send(from, TreeMsg::Refuse { reason, hints });
            self.out
                .push_back(Output::RefuseChild { peer: from, reason });
            if reason == RefuseReason::Full && kind == JoinKind::Move {
                self.maybe_relocate_for(capacity, now);
            }
            return;
        }
        let fresh = !self.children.contains_key(&from);
        self.children.entry(from).or_insert(ChildInfo {
            capacity,
            has_children: false,
            kids: Vec::new(),
            summary: Vec::new(),
        });
        let parent = self.current_update(now);
        let directory = self.directory_for(from);
        self.send(from, TreeMsg::Accept { parent, directory });
        if fresh {
            self.out.push_back(Output::AcceptChild { peer: from });
            self.emit(TreeEvent::ChildAdded(from));
            self.children_changed(now);
        }
    }

    /// A full candidate passes the request to a free slot of its subtree, whose summary is fresher
    /// than what the joiner holds (saves the joiner a round trip per level).
    fn forward_join(&mut self, req: &JoinReq, now: Millis) -> bool {
        let _ = now;
        let cands: Vec<SlotAd> = self
            .children
            .iter()
            .filter(|(id, _)| Some(**id) != req.lost_parent)
            .flat_map(|(_, c)| c.summary.iter())
            .filter(|a| {
                a.free > 0
                    && a.peer != req.joiner
                    && a.peer != self.id
                    && req.max_depth.is_none_or(|m| a.depth <= m)
            })
            .copied()
            .collect();
        let Some(target) = self.pick(&cands) else {
            return false;
        };
        // Book the slot in our copy so the next joiner goes elsewhere.
        for c in self.children.values_mut() {
            for a in c.summary.iter_mut().filter(|a| a.peer == target.peer) {
                a.free = a.free.saturating_sub(1);
            }
        }
        self.send(
            target.peer,
            TreeMsg::Join {
                kind: req.kind,
                capacity: req.capacity,
                max_depth: req.max_depth,
                lost_parent: req.lost_parent,
                joiner: Some(req.joiner),
                hops: req.hops + 1,
                parent_gone: false,
            },
        );
        true
    }

    /// Neither our subtree nor our directory shows a free slot: the room may be starved of
    /// capacity at the top (its relays lost and its slots held by leaf-only peers).
    fn knows_no_free_slot(&self) -> bool {
        self.compute_summary(1).is_empty() && self.directory.iter().all(|a| a.free == 0)
    }

    /// The child to give up for a joiner that can relay: a leaf-only child (capacity 0: it can
    /// have no children, whatever its last update says), else the least capable child if it is
    /// less capable than the joiner (it is handed to the joiner with its subtree, which has a
    /// short cut: rare, the room is starved).
    fn preemptible_child(&self, capacity: u16) -> Option<NodeId> {
        if capacity == 0 {
            return None;
        }
        self.children
            .iter()
            .filter(|(_, c)| c.capacity < capacity)
            .min_by_key(|(id, c)| (c.capacity, c.has_children, **id))
            .map(|(id, _)| *id)
    }

    fn maybe_relocate_for(&mut self, capacity: u16, now: Millis) {
        if self
            .last_relocate_at
            .is_some_and(|t| now.since(t) < RELOCATE_GAP_MS)
        {
            return;
        }
        let victim = self
            .children
            .iter()
            .filter(|(_, c)| !c.has_children && c.capacity < capacity)
            .min_by_key(|(id, c)| (c.capacity, **id))
            .map(|(id, _)| *id);
        if let Some(v) = victim {
            self.last_relocate_at = Some(now);
            self.send(v, TreeMsg::Relocate);
        }
    }

    fn on_leave(&mut self, from: NodeId, successor: Option<NodeId>, now: Millis) {
        if self.parent == Some(from) {
            self.out.push_back(Output::Disconnect { peer: from });
            self.parent_lost(successor.filter(|s| *s != self.id), false, now);
        } else if self.children.contains_key(&from) {
            self.out.push_back(Output::Disconnect { peer: from });
            self.remove_child(from, now);
        } else if self.pending.is_some_and(|p| p.target == from) {
            self.give_up_pending(now);
        }
    }

    fn remove_child(&mut self, c: NodeId, now: Millis) {
        if self.children.remove(&c).is_some() {
            self.emit(TreeEvent::ChildRemoved(c));
            self.children_changed(now);
            if self.promotion.is_some_and(|p| p.old == c || p.new == c) {
                self.promotion = None;
            }
            if self.free() > 0
                && let Some(h) = self.held.take()
            {
                self.on_join(h, now);
            }
        }
    }

    /// Grant a promotion: the joiner, a child of our child `old` more capable than it, takes a
    /// slot beside `old` now (one over our capacity) and `old` moves under it make-before-break.
    fn try_promote(&mut self, req: &JoinReq, now: Millis) -> bool {
        let Some(old) = req.lost_parent else {
            return false;
        };
        let c = req.joiner;
        let ok = req.hops == 0
            && self.path.is_some()
            && self.pending.is_none()
            && self.orphan.is_none()
            && self.promotion.is_none()
            && self.held.is_none()
            && self
                .last_promotion_at
                .is_none_or(|t| now.since(t) >= PROMOTION_GAP_MS)
            && self.children.len() <= self.capacity as usize
            && !self.children.contains_key(&c)
            && self.parent != Some(c)
            && !self.ancestors().contains(&c)
            && self
                .children
                .get(&old)
                .is_some_and(|o| o.kids.contains(&c) && o.capacity < req.capacity);
        if !ok {
            return false;
        }
        self.children.insert(
            c,
            ChildInfo {
                capacity: req.capacity,
                has_children: false,
                kids: Vec::new(),
                summary: Vec::new(),
            },
        );
        self.promotion = Some(Promotion {
            old,
            new: c,
            deadline: now.plus(PROMOTION_DEADLINE_MS),
        });
        self.last_promotion_at = Some(now);
        let parent = self.current_update(now);
        let directory = self.directory_for(c);
        self.send(c, TreeMsg::Accept { parent, directory });
        self.out.push_back(Output::AcceptChild { peer: c });
        self.emit(TreeEvent::ChildAdded(c));
        self.children_changed(now);
        true
    }

    /// `MoveUnder` from a child we lost to a promotion (target: that child) or from our parent
    /// (target: our new parent after its promotion).
    fn on_move_under(&mut self, from: NodeId, target: NodeId, now: Millis) {
        let from_child = target == from && self.children.contains_key(&from);
        if !from_child && self.parent != Some(from) {
            return;
        }
        if from_child {
            self.out.push_back(Output::Disconnect { peer: from });
            self.remove_child(from, now);
            // Our other children go under the promoted peer too (it took our place and had room
            // for them when it asked): they keep their depth, we alone go one level down.
            let kids: Vec<NodeId> = self.children.keys().copied().collect();
            for k in kids {
                self.send(k, TreeMsg::MoveUnder { target });
            }
        }
        if target == self.id
            || self.is_root
            || self.pending.is_some()
            || self.orphan.is_some()
            || self.path.is_none()
            || self.parent == Some(target)
            || self.in_own_subtree(target)
        {
            return;
        }
        // Bounded in depth so that stale paths cannot close a cycle: our promoted former child
        // is at our level (its subtree is deeper than the bound: never forwarded), any other
        // target must be strictly above us, and so must whatever slot it forwards us to (two
        // peers forwarded into each other's moving subtrees would close a loop otherwise).
        let Some(depth) = self.depth() else { return };
        let max_depth = if from_child {
            depth
        } else {
            depth.saturating_sub(1)
        };
        self.send_join(target, JoinKind::Move, Some(max_depth), None, now);
    }

    fn children_changed(&mut self, now: Millis) {
        if self.publish_due.is_none() {
            self.publish_due = Some(now.plus(self.cfg.publish_coalesce_ms));
        }
        self.summary_dirty(now);
    }

    fn parent_lost(&mut self, successor: Option<NodeId>, link_down: bool, now: Millis) {
        if self.is_root {
            return;
        }
        let lost = self.parent.take();
        let old_depth = self.depth().unwrap_or(self.last_depth).max(1);
        let lost_ancestors = self.path.take().map(|p| p.ancestors).unwrap_or_default();
        let leaf_handover =
            self.children.is_empty() && successor.is_some_and(|s| !lost_ancestors.contains(&s));
        self.upstream_detached_since = None;
        self.orphan = Some(Orphan {
            since: now,
            old_depth,
            lost,
            successor,
            lost_ancestors,
            leaf_handover,
            link_down,
        });
        if let Some(p) = self.pending.as_mut() {
            // A move in progress becomes the repair.
            p.kind = JoinKind::Repair;
        }
        if let Some(l) = lost {
            self.emit(TreeEvent::Orphaned { lost: l });
        }
        self.emit(TreeEvent::DepthChanged { depth: None });
        // Our subtree learns it is detached (it refuses joiners meanwhile).
        self.publish_now(now);
        self.summary_dirty(now);
        self.retry_at = None;
        self.attempt_join(now);
    }

    fn on_parent_update(&mut self, upd: TreeUpdate, now: Millis) {
        self.parent_capacity = upd.capacity;
        self.parent_children = upd.children.len().min(u16::MAX as usize) as u16;
        if !upd.children.contains(&self.id) {
            // The parent dropped us.
            self.parent_lost(None, false, now);
            return;
        }
        if upd.depth == DEPTH_DETACHED {
            if self.path.take().is_some() {
                self.upstream_detached_since = Some(now);
                self.emit(TreeEvent::DepthChanged { depth: None });
                self.publish_now(now);
                self.summary_dirty(now);
            }
            return;
        }
        if upd.ancestors.len() >= MAX_ANCESTORS || upd.ancestors.contains(&self.id) {
            // A cycle closed through us: get out of it.
            if let Some(p) = self.parent {
                self.send(p, TreeMsg::Leave { successor: None });
                self.out.push_back(Output::Disconnect { peer: p });
            }
            self.parent_lost(None, false, now);
            return;
        }
        let mut ancestors = upd.ancestors;
        ancestors.push(upd.peer);
        let new_path = Path {
            depth: upd.depth.saturating_add(1),
            ancestors,
        };
        if self.path.as_ref() != Some(&new_path) {
            let depth_changed = self.depth() != Some(new_path.depth);
            self.last_depth = new_path.depth;
            let d = new_path.depth;
            self.path = Some(new_path);
            self.upstream_detached_since = None;
            if depth_changed {
                self.emit(TreeEvent::DepthChanged { depth: Some(d) });
                self.summary_dirty(now);
            }
            self.publish_now(now);
        }
    }

    // ----- summaries, directory, backup -----

    fn compute_summary(&self, len: usize) -> Vec<SlotAd> {
        let Some(depth) = self.depth() else {
            return Vec::new();
        };
        let mut v = Vec::with_capacity(1 + self.children.len() * self.cfg.summary_len);
        let free = self.free();
        if free > 0 {
            v.push(SlotAd {
                peer: self.id,
                depth,
                free,
                capacity: self.capacity,
            });
        }
        for c in self.children.values() {
            v.extend(c.summary.iter().filter(|a| a.depth > depth).copied());
        }
        sort_ads(&mut v);
        dedup_ads(&mut v);
        v.truncate(len);
        v
    }

    fn summary_dirty(&mut self, now: Millis) {
        if self.summary_due.is_none() {
            let at = match self.last_summary_at {
                Some(t) => t.plus(self.summary_gap()).max(now),
                None => now,
            };
            self.summary_due = Some(at);
        }
    }

    /// Entries in our summary: the parent keeps only the best `summary_len` of all its children's,
    /// so the more children it has, the fewer each needs to send (at least 2, for forwarding).
    fn summary_entries(&self) -> usize {
        let c = (self.parent_capacity as usize).max(1);
        (self.cfg.summary_len * 4)
            .div_ceil(c)
            .clamp(2, self.cfg.summary_len.max(2))
    }

    /// Minimum gap between two summaries: the configured interval, stretched so that all the
    /// children of our parent together stay within its byte budget.
    fn summary_gap(&self) -> u64 {
        let base = self.cfg.summary_interval_ms;
        let budget = self.cfg.summary_budget_bytes_per_sec as u64;
        if budget == 0 {
            return base;
        }
        let len = TreeMsg::Summary {
            slots: self.last_summary.clone(),
        }
        .wire_len() as u64;
        let share = (self.parent_capacity as u64).max(1);
        base.max(len * share * 1000 / budget)
    }

    fn flush_summary(&mut self, now: Millis) {
        self.summary_due = None;
        if self.is_root {
            let dir = self.compute_summary(self.cfg.directory_len);
            if dir != self.directory {
                self.directory = dir;
                self.directory_changed(now);
            }
            return;
        }
        let Some(p) = self.parent else { return };
        let s = self.compute_summary(self.summary_entries());
        if s != self.last_summary {
            self.last_summary = s.clone();
            self.last_summary_at = Some(now);
            self.send(p, TreeMsg::Summary { slots: s });
        }
    }

    /// The directory for one child (or joiner): the shallowest band (two levels) of what we know
    /// -- our own directory and our subtree's free slots -- shuffled per recipient, then the
    /// rest by depth. Every member holding the same few shallowest entries would send the whole
    /// room's joins and moves to them; different subsets per edge spread that load over the
    /// many slots that are nearly as good, and mix in nearby slots the farther down the tree.
    fn directory_for(&mut self, to: NodeId) -> Vec<SlotAd> {
        // Never slots of the recipient's own subtree: it cannot tell them all from others (its
        // view of its subtree is its children's short summaries) and joining one, on stale
        // paths, would close a cycle. By induction the directory we received has none of our
        // subtree's slots; the root's own directory is its summary of everything, so it uses
        // only the other children's summaries.
        let mut pool = if self.is_root {
            Vec::new()
        } else {
            self.directory.clone()
        };
        if let Some(d) = self.depth() {
            let free = self.free();
            if free > 0 {
                pool.push(SlotAd {
                    peer: self.id,
                    depth: d,
                    free,
                    capacity: self.capacity,
                });
            }
            for (c, info) in &self.children {
                if *c != to {
                    pool.extend(info.summary.iter().filter(|a| a.depth > d).copied());
                }
            }
        }
        pool.retain(|a| a.peer != to && a.free > 0);
        sort_ads(&mut pool);
        dedup_ads(&mut pool);
        let Some(min) = pool.first().map(|a| a.depth) else {
            return pool;
        };
        let band = pool
            .iter()
            .position(|a| a.depth > min.saturating_add(1))
            .unwrap_or(pool.len());
        for i in 0..band.saturating_sub(1) {
            let j = i + self.rng.below((band - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(self.cfg.directory_len);
        sort_ads(&mut pool);
        pool
    }

    fn directory_changed(&mut self, now: Millis) {
        if !self.children.is_empty() && self.dir_due.is_none() {
            let at = match self.last_dir_at {
                Some(t) => t.plus(self.cfg.directory_interval_ms).max(now),
                None => now,
            };
            self.dir_due = Some(at);
        }
        let backup_ok = self.backup.is_some_and(|b| {
            self.directory
                .iter()
                .chain(self.hints.iter())
                .any(|a| a.peer == b && self.usable(a, now))
        });
        if !backup_ok {
            self.choose_backup(now);
        }
    }

    fn flush_directory(&mut self, now: Millis) {
        self.dir_due = None;
        self.last_dir_at = Some(now);
        let kids: Vec<NodeId> = self.children.keys().copied().collect();
        for c in kids {
            let slots = self.directory_for(c);
            self.send(c, TreeMsg::Directory { slots });
        }
    }

    /// A random pick among the shallowest usable candidates (shallower than us when possible), so
    /// siblings scatter.
    fn choose_backup(&mut self, now: Millis) {
        if self.is_root {
            return;
        }
        let cands = self.candidates(now);
        let my = self.depth().unwrap_or(self.last_depth);
        let shallower: Vec<SlotAd> = cands.iter().filter(|a| a.depth < my).copied().collect();
        let pool = if shallower.is_empty() {
            &cands
        } else {
            &shallower
        };
        let Some(min) = pool.iter().map(|a| a.depth).min() else {
            self.backup = None;
            return;
        };
        let top: Vec<NodeId> = pool
            .iter()
            .filter(|a| a.depth == min)
            .map(|a| a.peer)
            .collect();
        let i = self.rng.below(top.len() as u64) as usize;
        self.backup = top.get(i).copied();
    }

    // ----- output helpers -----

    fn publish_now(&mut self, now: Millis) {
        self.publish_due = None;
        self.seq += 1;
        let update = self.current_update(now);
        let mut to: Vec<NodeId> = self.children.keys().copied().collect();
        if let Some(p) = self.parent {
            to.push(p);
        }
        if !to.is_empty() {
            self.out.push_back(Output::Publish { update, to });
        }
    }

    fn send(&mut self, to: NodeId, msg: TreeMsg) {
        self.out.push_back(Output::Send { to, msg });
    }

    fn emit(&mut self, e: TreeEvent) {
        self.out.push_back(Output::Event(e));
    }

    fn after(&mut self, _now: Millis) {
        let t = self.poll_timeout();
        if t != self.last_timer {
            self.last_timer = t;
            if let Some(t) = t {
                self.out.push_back(Output::Timer(t));
            }
        }
    }
}

fn sort_ads(v: &mut [SlotAd]) {
    v.sort_by_key(|a| (a.depth, Reverse(a.free), Reverse(a.capacity), a.peer));
}

/// Keeps the first entry of each peer.
fn dedup_ads(v: &mut Vec<SlotAd>) {
    let mut seen = BTreeSet::new();
    v.retain(|a| seen.insert(a.peer));
}

// ----- wire size (CBOR as ciborium encodes serde: structs as maps keyed by field names) -----

fn cbor_uint(n: u64) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}
fn cbor_text(s: &str) -> usize {
    cbor_uint(s.len() as u64) + s.len()
}
const CBOR_ID: usize = 2 + 32;
fn cbor_opt_id(o: &Option<NodeId>) -> usize {
    if o.is_some() { CBOR_ID } else { 1 }
}
fn cbor_opt_u16(o: &Option<u16>) -> usize {
    o.map_or(1, |v| cbor_uint(v as u64))
}
fn cbor_ids(v: &[NodeId]) -> usize {
    cbor_uint(v.len() as u64) + v.len() * CBOR_ID
}

impl SlotAd {
    /// Encoded size in bytes (CBOR).
    pub fn wire_len(&self) -> usize {
        1 + cbor_text("peer")
            + CBOR_ID
            + cbor_text("depth")
            + cbor_uint(self.depth as u64)
            + cbor_text("free")
            + cbor_uint(self.free as u64)
            + cbor_text("capacity")
            + cbor_uint(self.capacity as u64)
    }
}

fn cbor_ads(v: &[SlotAd]) -> usize {
    cbor_uint(v.len() as u64) + v.iter().map(SlotAd::wire_len).sum::<usize>()
}

impl TreeUpdate {
    /// Encoded size in bytes (CBOR), before signing.
    pub fn wire_len(&self) -> usize {
        1 + cbor_text("peer")
            + CBOR_ID
            + cbor_text("parent")
            + cbor_opt_id(&self.parent)
            + cbor_text("depth")
            + cbor_uint(self.depth as u64)
            + cbor_text("ancestors")
            + cbor_ids(&self.ancestors)
            + cbor_text("children")
            + cbor_ids(&self.children)
            + cbor_text("capacity")
            + cbor_uint(self.capacity as u64)
            + cbor_text("uplink_kbps")
            + cbor_uint(self.uplink_kbps as u64)
            + cbor_text("seq")
            + cbor_uint(self.seq)
            + cbor_text("ts_ms")
            + cbor_uint(self.ts_ms)
    }
}

impl Snapshot {
    /// Encoded size in bytes (CBOR).
    pub fn wire_len(&self) -> usize {
        1 + cbor_text("candidates") + cbor_ads(&self.candidates)
    }
}

impl TreeMsg {
    /// Encoded size in bytes (CBOR), for traffic accounting without encoding.
    pub fn wire_len(&self) -> usize {
        // Externally tagged enum: {variant: {fields}} or "variant" for unit variants.
        let (name, body) = match self {
            TreeMsg::Join {
                kind,
                capacity,
                max_depth,
                lost_parent,
                joiner,
                hops,
                parent_gone,
            } => (
                "Join",
                1 + cbor_text("kind")
                    + cbor_text(match kind {
                        JoinKind::New => "New",
                        JoinKind::Repair => "Repair",
                        JoinKind::Move => "Move",
                        JoinKind::Handover => "Handover",
                        JoinKind::Promote => "Promote",
                    })
                    + cbor_text("capacity")
                    + cbor_uint(*capacity as u64)
                    + cbor_text("max_depth")
                    + cbor_opt_u16(max_depth)
                    + cbor_text("lost_parent")
                    + cbor_opt_id(lost_parent)
                    + cbor_text("joiner")
                    + cbor_opt_id(joiner)
                    + cbor_text("hops")
                    + cbor_uint(*hops as u64)
                    + if *parent_gone {
                        cbor_text("parent_gone") + 1
                    } else {
                        0
                    },
            ),
            TreeMsg::Accept { parent, directory } => (
                "Accept",
                1 + cbor_text("parent")
                    + parent.wire_len()
                    + cbor_text("directory")
                    + cbor_ads(directory),
            ),
            TreeMsg::Refuse { reason, hints } => (
                "Refuse",
                1 + cbor_text("reason")
                    + cbor_text(match reason {
                        RefuseReason::Full => "Full",
                        RefuseReason::Cycle => "Cycle",
                        RefuseReason::NotAttached => "NotAttached",
                        RefuseReason::TooDeep => "TooDeep",
                        RefuseReason::Leaving => "Leaving",
                    })
                    + cbor_text("hints")
                    + cbor_ads(hints),
            ),
            TreeMsg::Leave { successor } => {
                ("Leave", 1 + cbor_text("successor") + cbor_opt_id(successor))
            }
            TreeMsg::Summary { slots } => ("Summary", 1 + cbor_text("slots") + cbor_ads(slots)),
            TreeMsg::Directory { slots } => ("Directory", 1 + cbor_text("slots") + cbor_ads(slots)),
            TreeMsg::Relocate => return cbor_text("Relocate"),
            TreeMsg::MoveUnder { .. } => ("MoveUnder", 1 + cbor_text("target") + CBOR_ID),
        };
        1 + cbor_text(name) + body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn cfg(cap: u16) -> Config {
        Config {
            max_children: Some(cap),
            ..Config::default()
        }
    }

    fn drain(n: &mut TreeNode) -> Vec<Output> {
        std::iter::from_fn(|| n.poll_output()).collect()
    }

    fn sent(out: &[Output]) -> Vec<(NodeId, TreeMsg)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { to, msg } => Some((*to, msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn ad(n: u8, depth: u16, free: u16) -> SlotAd {
        SlotAd {
            peer: id(n),
            depth,
            free,
            capacity: 4,
        }
    }

    fn join_msg(kind: JoinKind) -> TreeMsg {
        join_req(kind, 4, None, None)
    }
    /// A join request as the joiner sends it (not forwarded).
    fn join_req(
        kind: JoinKind,
        capacity: u16,
        max_depth: Option<u16>,
        lost_parent: Option<NodeId>,
    ) -> TreeMsg {
        TreeMsg::Join {
            kind,
            capacity,
            max_depth,
            lost_parent,
            joiner: None,
            hops: 0,
            parent_gone: false,
        }
    }

    /// The same request, claiming the link to the lost parent went down.
    fn gone(mut m: TreeMsg) -> TreeMsg {
        if let TreeMsg::Join { parent_gone, .. } = &mut m {
            *parent_gone = true;
        }
        m
    }

    /// A relay at depth 3 (one child) under 2, whose directory knows nothing shallower than
    /// depth 6: on losing its parent, the grandparent is the one to ask.
    fn relay_with_a_deep_directory() -> TreeNode {
        let mut n = attached(5, 2, &[0, 1], 4);
        n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
        n.handle_message(
            id(2),
            TreeMsg::Directory {
                slots: vec![ad(60, 6, 2)],
            },
            Millis(2),
        );
        drain(&mut n);
        n
    }

    /// A viewer attached under `parent` (whose path is `ancestors` + parent at `depth - 1`).
    fn attached(me: u8, parent: u8, ancestors: &[u8], cap: u16) -> TreeNode {
        let mut n = TreeNode::new(id(me), cfg(cap), me as u64);
        let t = Millis(0);
        n.start(t);
        n.handle_snapshot(
            Snapshot {
                candidates: vec![ad(parent, ancestors.len() as u16, 1)],
            },
            t,
        );
        let upd = TreeUpdate {
            peer: id(parent),
            parent: ancestors.last().map(|a| id(*a)),
            depth: ancestors.len() as u16,
            ancestors: ancestors.iter().map(|a| id(*a)).collect(),
            children: vec![id(me)],
            capacity: 4,
            uplink_kbps: 0,
            seq: 1,
            ts_ms: 0,
        };
        n.handle_message(
            id(parent),
            TreeMsg::Accept {
                parent: upd,
                directory: vec![ad(50, 1, 2), ad(51, 1, 3)],
            },
            t,
        );
        drain(&mut n);
        n
    }

    #[test]
    fn capacity_configured_or_measured() {
        assert_eq!(cfg(3).capacity(), 3);
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

    #[test]
    fn join_picks_among_the_two_shallowest_levels_and_bounds_the_depth() {
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let mut n = TreeNode::new(id(9), cfg(4), seed);
            n.start(Millis(0));
            assert!(drain(&mut n).contains(&Output::RequestSnapshot));
            n.handle_snapshot(
                Snapshot {
                    candidates: vec![ad(3, 3, 4), ad(1, 1, 1), ad(2, 2, 4), ad(4, 1, 0)],
                },
                Millis(10),
            );
            let s = sent(&drain(&mut n));
            assert_eq!(s.len(), 1);
            let (to, msg) = &s[0];
            assert!(
                *to == id(1) || *to == id(2),
                "never deeper than the shallowest level + 1, never a full one"
            );
            let depth = if *to == id(1) { 1 } else { 2 };
            let TreeMsg::Join { max_depth, .. } = msg else {
                panic!("{msg:?}")
            };
            assert_eq!(
                *max_depth,
                Some(depth + 1),
                "a full target may pass it one level down, no more"
            );
            seen.insert(*to);
        }
        assert_eq!(seen.len(), 2, "spread over both levels");
    }

    #[test]
    fn a_parent_that_knows_no_free_slot_hands_a_leaf_only_child_to_a_peer_that_can_relay() {
        let mut root = TreeNode::new_root(id(0), cfg(1), 5);
        let leaf_join = join_req(JoinKind::New, 0, None, None);
        root.handle_message(id(2), leaf_join, Millis(0));
        drain(&mut root);
        let repair = join_req(JoinKind::Repair, 4, Some(1), Some(id(7)));
        // A newcomer that cannot relay is refused: making room for it gains nothing.
        let leaf_join2 = join_req(JoinKind::New, 0, None, None);
        root.handle_message(id(6), leaf_join2, Millis(1));
        let s = sent(&drain(&mut root));
        assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
        // And a member that knows no free slot names the root to a newcomer.
        let snap = root.snapshot_for_newcomer(8);
        assert_eq!(snap.candidates.len(), 1);
        assert_eq!(
            (snap.candidates[0].peer, snap.candidates[0].free),
            (id(0), 0)
        );
        root.handle_message(id(5), repair.clone(), Millis(2));
        let s = sent(&drain(&mut root));
        assert!(s.contains(&(
            id(2),
            TreeMsg::Leave {
                successor: Some(id(5))
            }
        )));
        assert!(
            s.iter()
                .any(|(to, m)| *to == id(5) && matches!(m, TreeMsg::Accept { .. }))
        );
        assert_eq!(root.children().collect::<Vec<_>>(), vec![id(5)]);
        assert!(root.child_count() <= root.capacity() as usize);
        // An equally capable child is never preempted.
        let mut root = TreeNode::new_root(id(0), cfg(1), 5);
        root.handle_message(id(3), join_msg(JoinKind::New), Millis(0));
        drain(&mut root);
        root.handle_message(id(5), repair, Millis(2));
        let s = sent(&drain(&mut root));
        assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
    }

    /// Starved: a less capable relay child is handed over too (with its subtree); with no weaker
    /// child, the request goes down to a relay child, which may have one.
    #[test]
    fn a_starved_parent_hands_over_a_weaker_relay_or_passes_the_request_down() {
        let relay_update = |cap: u16| TreeUpdate {
            capacity: cap,
            ..update_of(3, 0, &[4])
        };
        let repair = join_req(JoinKind::Repair, 4, None, Some(id(7)));
        let mut root = TreeNode::new_root(id(0), cfg(1), 5);
        root.handle_message(id(3), join_req(JoinKind::New, 1, None, None), Millis(0));
        root.handle_update(id(3), relay_update(1), Millis(0));
        drain(&mut root);
        root.handle_message(id(5), repair.clone(), Millis(1));
        let s = sent(&drain(&mut root));
        assert!(s.contains(&(
            id(3),
            TreeMsg::Leave {
                successor: Some(id(5))
            }
        )));
        assert_eq!(root.children().collect::<Vec<_>>(), vec![id(5)]);

        let mut root = TreeNode::new_root(id(0), cfg(1), 5);
        root.handle_message(id(3), join_req(JoinKind::New, 4, None, None), Millis(0));
        root.handle_update(id(3), relay_update(4), Millis(0));
        drain(&mut root);
        root.handle_message(id(5), repair, Millis(1));
        let s = sent(&drain(&mut root));
        assert_eq!(
            s,
            vec![(
                id(3),
                TreeMsg::Join {
                    kind: JoinKind::Repair,
                    capacity: 4,
                    max_depth: None,
                    lost_parent: Some(id(7)),
                    joiner: Some(id(5)),
                    hops: 1,
                    parent_gone: false,
                }
            )]
        );
        assert_eq!(root.children().collect::<Vec<_>>(), vec![id(3)]);
    }

    /// A grandparent puts a child's more capable child in the child's place: one over capacity
    /// until the former parent has moved under it, or the deadline hands it over.
    #[test]
    fn a_grandparent_grants_a_promotion_for_a_bounded_overlap() {
        let setup = || {
            let mut g = TreeNode::new_root(id(0), cfg(2), 9);
            g.handle_message(id(1), join_req(JoinKind::New, 2, None, None), Millis(0));
            g.handle_message(id(3), join_req(JoinKind::New, 4, None, None), Millis(0));
            g.handle_update(
                id(1),
                TreeUpdate {
                    capacity: 2,
                    ..update_of(1, 0, &[2])
                },
                Millis(0),
            );
            drain(&mut g);
            g
        };
        let promote = join_req(JoinKind::Promote, 8, Some(0), Some(id(1)));

        let mut g = setup();
        g.handle_message(id(2), promote.clone(), Millis(10));
        let s = sent(&drain(&mut g));
        assert!(
            s.iter()
                .any(|(to, m)| *to == id(2) && matches!(m, TreeMsg::Accept { .. })),
            "{s:?}"
        );
        assert_eq!(g.child_count(), 3);
        assert_eq!(g.over_capacity_allowance(), 1);
        // The former parent moved under the promoted peer and leaves: back within capacity.
        g.handle_message(id(1), TreeMsg::Leave { successor: None }, Millis(300));
        assert_eq!(g.child_count(), 2);
        assert_eq!(g.over_capacity_allowance(), 0);

        // It did not move in time: handed over the hard way.
        let mut g = setup();
        g.handle_message(id(2), promote.clone(), Millis(10));
        drain(&mut g);
        assert!(
            g.poll_timeout()
                .is_some_and(|t| t.0 <= 10 + PROMOTION_DEADLINE_MS)
        );
        g.handle_timeout(Millis(10 + PROMOTION_DEADLINE_MS));
        let s = sent(&drain(&mut g));
        assert!(s.contains(&(
            id(1),
            TreeMsg::Leave {
                successor: Some(id(2))
            }
        )));
        assert_eq!(g.child_count(), 2);
        assert_eq!(g.over_capacity_allowance(), 0);

        // Not for a peer that is not more capable than its parent: an ordinary (refused) move.
        let mut g = setup();
        g.handle_message(
            id(2),
            join_req(JoinKind::Promote, 2, Some(0), Some(id(1))),
            Millis(10),
        );
        let s = sent(&drain(&mut g));
        assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
        assert_eq!(g.child_count(), 2);
        // Nor for a peer its child did not list.
        let mut g = setup();
        g.handle_message(id(6), promote, Millis(10));
        let s = sent(&drain(&mut g));
        assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
        assert_eq!(g.over_capacity_allowance(), 0);
    }

    /// The promoted peer calls its former parent under it; full, it first sends its least
    /// capable child to the slot it left there, and answers the former parent once that child
    /// has gone.
    #[test]
    fn a_promoted_peer_takes_its_former_parent_under_it() {
        let mut c = attached(2, 1, &[0], 2);
        c.handle_message(id(5), join_req(JoinKind::New, 0, None, None), Millis(1));
        c.handle_message(id(6), join_req(JoinKind::New, 4, None, None), Millis(1));
        drain(&mut c);
        c.send_join(id(0), JoinKind::Promote, Some(0), Some(id(1)), Millis(10));
        drain(&mut c);
        let root = TreeUpdate {
            peer: id(0),
            parent: None,
            depth: 0,
            ancestors: vec![],
            children: vec![id(1), id(2)],
            capacity: 2,
            uplink_kbps: 0,
            seq: 3,
            ts_ms: 0,
        };
        c.handle_message(
            id(0),
            TreeMsg::Accept {
                parent: root,
                directory: vec![],
            },
            Millis(60),
        );
        let s = sent(&drain(&mut c));
        assert!(
            s.contains(&(id(1), TreeMsg::MoveUnder { target: id(2) })),
            "{s:?}"
        );
        assert!(
            s.contains(&(id(5), TreeMsg::MoveUnder { target: id(1) })),
            "{s:?}"
        );
        assert!(
            !s.iter()
                .any(|(to, m)| *to == id(1) && matches!(m, TreeMsg::Leave { .. })),
            "make-before-break: the former parent is not cut"
        );
        assert_eq!((c.parent(), c.depth()), (Some(id(0)), Some(1)));
        // The former parent's move waits for a free slot.
        c.handle_message(
            id(1),
            join_req(JoinKind::Move, 2, Some(1), None),
            Millis(120),
        );
        assert!(sent(&drain(&mut c)).is_empty());
        c.handle_message(id(5), TreeMsg::Leave { successor: None }, Millis(150));
        let s = sent(&drain(&mut c));
        assert!(
            s.iter()
                .any(|(to, m)| *to == id(1) && matches!(m, TreeMsg::Accept { .. })),
            "{s:?}"
        );
        assert_eq!(c.child_count(), 2);
    }

    /// The former parent moves under its promoted child and sends its other children there too
    /// (make-before-break, bounded in depth); the word of a stranger moves
    /// nobody.
    #[test]
    fn a_parent_told_by_its_promoted_child_moves_under_it() {
        let directed = |capacity: u16, max_depth: u16| {
            join_req(JoinKind::Move, capacity, Some(max_depth), None)
        };
        let mut p = attached(1, 0, &[], 2);
        p.handle_message(id(2), join_req(JoinKind::New, 8, None, None), Millis(1));
        p.handle_message(id(3), join_req(JoinKind::New, 0, None, None), Millis(1));
        drain(&mut p);
        p.handle_message(id(9), TreeMsg::MoveUnder { target: id(9) }, Millis(5));
        assert!(sent(&drain(&mut p)).is_empty());
        p.handle_message(id(2), TreeMsg::MoveUnder { target: id(2) }, Millis(10));
        let s = sent(&drain(&mut p));
        assert_eq!(
            s,
            vec![
                (id(3), TreeMsg::MoveUnder { target: id(2) }),
                (id(2), directed(2, 1)),
            ]
        );
        assert_eq!(p.children().collect::<Vec<_>>(), vec![id(3)]);
        assert_eq!(p.parent(), Some(id(0)), "still attached until accepted");
        // The other child, at depth 2, goes to the promoted peer one level above it.
        let mut c = attached(3, 1, &[0], 0);
        c.handle_message(id(1), TreeMsg::MoveUnder { target: id(2) }, Millis(20));
        assert_eq!(sent(&drain(&mut c)), vec![(id(2), directed(0, 1))]);
    }

    #[test]
    fn a_newcomer_told_only_of_the_root_asks_it_if_it_can_relay() {
        let starved = Snapshot {
            candidates: vec![SlotAd {
                peer: id(0),
                depth: 0,
                free: 0,
                capacity: 0,
            }],
        };
        let mut relay = TreeNode::new(id(9), cfg(2), 1);
        relay.start(Millis(0));
        drain(&mut relay);
        relay.handle_snapshot(starved.clone(), Millis(10));
        let s = sent(&drain(&mut relay));
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].0, id(0));
        // A leaf-only newcomer waits for a real slot (it would only be refused).
        let mut leaf = TreeNode::new(id(8), cfg(0), 1);
        leaf.start(Millis(0));
        drain(&mut leaf);
        leaf.handle_snapshot(starved, Millis(10));
        let out = drain(&mut leaf);
        assert!(sent(&out).is_empty(), "{out:?}");
        assert!(out.contains(&Output::RequestSnapshot));
    }

    #[test]
    fn the_lost_parent_guard_is_for_relays_and_lapses() {
        let o = Orphan {
            since: Millis(1_000),
            old_depth: 3,
            lost: Some(id(2)),
            successor: None,
            lost_ancestors: vec![id(0), id(1), id(2)],
            leaf_handover: false,
            link_down: true,
        };
        // A relay names its lost parent (candidates below it refuse: sibling subtrees repairing
        // at once must not adopt each other)...
        assert_eq!(o.cycle_guard(true, id(9), Millis(1_100)), Some(id(2)));
        // ...for a while only: a live lost parent would shut it out of its whole subtree.
        assert_eq!(
            o.cycle_guard(true, id(9), Millis(1_000 + CYCLE_GUARD_MS)),
            None
        );
        // Without children yet too: a handover target accepts while it repairs, so it may have
        // some by the time the answer comes. After the guard lapses it names the lost parent
        // only to the grandparent, which evicts a dead child on its word.
        assert_eq!(o.cycle_guard(false, id(9), Millis(1_100)), Some(id(2)));
        assert_eq!(o.cycle_guard(false, id(9), Millis(9_000)), None);
        assert_eq!(o.cycle_guard(false, id(1), Millis(9_000)), Some(id(2)));
        // Handed over as a leaf by a parent that may stay: never named, not even to the
        // grandparent (which would evict it with its whole subtree)...
        let h = Orphan {
            leaf_handover: true,
            ..o
        };
        assert_eq!(h.cycle_guard(false, id(9), Millis(1_100)), None);
        assert_eq!(h.cycle_guard(false, id(1), Millis(1_100)), None);
        // ...unless it took children since (a handover target accepts while repairing).
        assert_eq!(h.cycle_guard(true, id(9), Millis(1_100)), Some(id(2)));
    }

    #[test]
    fn parent_accepts_up_to_capacity_and_refuses_the_rest() {
        let mut root = TreeNode::new_root(id(0), cfg(2), 7);
        for j in 1..=3u8 {
            root.handle_message(id(j), join_msg(JoinKind::New), Millis(j as u64));
        }
        let out = drain(&mut root);
        let s = sent(&out);
        let accepted: Vec<NodeId> = s
            .iter()
            .filter(|(_, m)| matches!(m, TreeMsg::Accept { .. }))
            .map(|(to, _)| *to)
            .collect();
        assert_eq!(accepted, vec![id(1), id(2)]);
        assert!(s.iter().any(|(to, m)| *to == id(3)
            && matches!(
                m,
                TreeMsg::Refuse {
                    reason: RefuseReason::Full,
                    ..
                }
            )));
        assert_eq!(root.child_count(), 2);
    }

    #[test]
    fn leaf_only_peer_refuses_children() {
        let mut n = attached(5, 0, &[], 0);
        n.handle_message(id(6), join_msg(JoinKind::New), Millis(5));
        let s = sent(&drain(&mut n));
        assert!(matches!(
            s[0].1,
            TreeMsg::Refuse {
                reason: RefuseReason::Full,
                ..
            }
        ));
        assert_eq!(n.child_count(), 0);
    }

    #[test]
    fn never_adopts_an_ancestor() {
        // 3 is under 2 under 1 under root 0: 1 must not become 3's child.
        let mut n = attached(3, 2, &[0, 1], 4);
        assert_eq!(n.depth(), Some(3));
        n.handle_message(id(1), join_msg(JoinKind::Repair), Millis(5));
        let s = sent(&drain(&mut n));
        assert!(matches!(
            s[0].1,
            TreeMsg::Refuse {
                reason: RefuseReason::Cycle,
                ..
            }
        ));
        // Nor the sibling subtree of a joiner whose lost parent is our ancestor.
        n.handle_message(
            id(7),
            join_req(JoinKind::Repair, 1, None, Some(id(2))),
            Millis(6),
        );
        let s = sent(&drain(&mut n));
        assert!(matches!(
            s[0].1,
            TreeMsg::Refuse {
                reason: RefuseReason::Cycle,
                ..
            }
        ));
    }

    #[test]
    fn parent_loss_switches_to_backup_at_once() {
        let mut n = attached(5, 1, &[0], 4);
        let backup = n.backup().expect("a backup is chosen on attach");
        assert!(backup == id(50) || backup == id(51));
        n.handle_link_down(id(1), Millis(100));
        let out = drain(&mut n);
        assert!(out.contains(&Output::Event(TreeEvent::Orphaned { lost: id(1) })));
        let s = sent(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, backup);
        assert!(matches!(
            s[0].1,
            TreeMsg::Join {
                kind: JoinKind::Repair,
                ..
            }
        ));
        assert!(n.is_orphan() && !n.is_attached());
    }

    #[test]
    fn graceful_leave_tells_children_and_parent() {
        let mut n = attached(5, 1, &[0], 4);
        n.handle_message(id(20), join_msg(JoinKind::New), Millis(1));
        n.handle_message(id(21), join_req(JoinKind::New, 8, None, None), Millis(1));
        drain(&mut n);
        n.leave(Millis(2));
        let s = sent(&drain(&mut n));
        let to = |p: NodeId| s.iter().find(|(t, _)| *t == p).map(|(_, m)| m.clone());
        // The most capable child inherits our slot at our parent.
        assert_eq!(
            to(id(21)),
            Some(TreeMsg::Leave {
                successor: Some(id(1))
            })
        );
        assert!(matches!(to(id(20)), Some(TreeMsg::Leave { .. })));
        assert_eq!(to(id(1)), Some(TreeMsg::Leave { successor: None }));
        assert!(n.has_left());
    }

    #[test]
    fn a_cycle_announced_by_the_parent_is_left() {
        let mut n = attached(5, 1, &[0], 4);
        let upd = TreeUpdate {
            peer: id(1),
            parent: Some(id(5)),
            depth: 2,
            ancestors: vec![id(0), id(5)],
            children: vec![id(5)],
            capacity: 4,
            uplink_kbps: 0,
            seq: 9,
            ts_ms: 0,
        };
        n.handle_update(id(1), upd, Millis(3));
        let out = drain(&mut n);
        assert!(sent(&out).contains(&(id(1), TreeMsg::Leave { successor: None })));
        assert!(n.is_orphan());
    }

    #[test]
    fn full_parent_forwards_to_its_subtree() {
        let mut root = TreeNode::new_root(id(0), cfg(1), 3);
        root.handle_message(id(1), join_msg(JoinKind::New), Millis(0));
        root.handle_message(
            id(1),
            TreeMsg::Summary {
                slots: vec![ad(1, 1, 3)],
            },
            Millis(1),
        );
        drain(&mut root);
        root.handle_message(id(2), join_msg(JoinKind::New), Millis(2));
        let s = sent(&drain(&mut root));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, id(1));
        assert!(matches!(
            s[0].1,
            TreeMsg::Join {
                joiner: Some(j),
                hops: 1,
                ..
            } if j == id(2)
        ));
    }

    #[test]
    fn move_is_make_before_break() {
        let mut n = attached(5, 1, &[0, 8, 9], 8);
        assert_eq!(n.depth(), Some(4));
        n.handle_message(
            id(1),
            TreeMsg::Directory {
                slots: vec![ad(60, 1, 2)],
            },
            Millis(1),
        );
        drain(&mut n);
        n.handle_timeout(Millis(1_000_000));
        let s = sent(&drain(&mut n));
        assert!(
            s.iter().any(|(to, m)| *to == id(60)
                && matches!(
                    m,
                    TreeMsg::Join {
                        kind: JoinKind::Move,
                        ..
                    }
                )),
            "{s:?}"
        );
        // Still attached to the old parent while the move is pending.
        assert_eq!(n.parent(), Some(id(1)));
        let upd = TreeUpdate {
            peer: id(60),
            parent: Some(id(0)),
            depth: 1,
            ancestors: vec![id(0)],
            children: vec![id(5)],
            capacity: 4,
            uplink_kbps: 0,
            seq: 1,
            ts_ms: 0,
        };
        n.handle_message(
            id(60),
            TreeMsg::Accept {
                parent: upd,
                directory: vec![],
            },
            Millis(1_000_100),
        );
        let s = sent(&drain(&mut n));
        assert!(s.contains(&(id(1), TreeMsg::Leave { successor: None })));
        assert_eq!(n.parent(), Some(id(60)));
        assert_eq!(n.depth(), Some(2));
    }

    #[test]
    fn wire_len_matches_cbor() {
        let upd = TreeUpdate {
            peer: id(1),
            parent: Some(id(2)),
            depth: 3,
            ancestors: vec![id(3), id(2)],
            children: vec![id(4)],
            capacity: 4,
            uplink_kbps: 12_000,
            seq: 77,
            ts_ms: 1_700_000_000_000,
        };
        let msgs = vec![
            join_msg(JoinKind::Repair),
            TreeMsg::Accept {
                parent: upd.clone(),
                directory: vec![ad(1, 2, 3), ad(2, 300, 1)],
            },
            TreeMsg::Refuse {
                reason: RefuseReason::NotAttached,
                hints: vec![ad(9, 1, 1)],
            },
            TreeMsg::Leave {
                successor: Some(id(3)),
            },
            TreeMsg::Summary { slots: vec![] },
            TreeMsg::Directory {
                slots: vec![ad(5, 5, 5)],
            },
            TreeMsg::Relocate,
            join_req(JoinKind::Promote, 8, Some(2), Some(id(4))),
            TreeMsg::MoveUnder { target: id(6) },
            gone(join_req(JoinKind::Repair, 2, Some(1), Some(id(7)))),
        ];
        // `parent_gone` is left out when false: a Join encodes as it did before the field.
        let mut plain = Vec::new();
        ciborium::into_writer(&join_msg(JoinKind::Repair), &mut plain).expect("encodes");
        assert!(!plain.windows(11).any(|w| w == b"parent_gone"));
        for m in msgs {
            let mut buf = Vec::new();
            ciborium::into_writer(&m, &mut buf).expect("encodes");
            assert_eq!(m.wire_len(), buf.len(), "{m:?}");
            let back: TreeMsg = ciborium::from_reader(&buf[..]).expect("decodes");
            assert_eq!(back, m);
        }
        let mut buf = Vec::new();
        ciborium::into_writer(&upd, &mut buf).expect("encodes");
        assert_eq!(upd.wire_len(), buf.len());
    }
    /// An orphan whose directory has nothing shallower than its old depth asks its lost parent's
    /// parent, and gives a repair target only `repair_timeout_ms` (not `join_timeout_ms`).
    #[test]
    fn orphan_falls_back_on_the_grandparent_with_a_short_timeout() {
        let mut n = relay_with_a_deep_directory();
        n.handle_link_down(id(2), Millis(100));
        let s = sent(&drain(&mut n));
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].0, id(1), "the grandparent: {s:?}");
        assert!(matches!(
            s[0].1,
            TreeMsg::Join {
                kind: JoinKind::Repair,
                lost_parent: Some(l),
                max_depth: Some(2),
                parent_gone: true,
                ..
            } if l == id(2)
        ));
        n.handle_timeout(Millis(499));
        assert_eq!(n.pending.map(|p| p.target), Some(id(1)));
        drain(&mut n);
        n.handle_timeout(Millis(500));
        assert_ne!(n.pending.map(|p| p.target), Some(id(1)));
        assert!(!n.is_attached());
        let s = sent(&drain(&mut n));
        assert!(
            s.iter().all(|(to, _)| *to != id(1)),
            "the silent grandparent is not asked again at once: {s:?}"
        );
    }

    /// A relay its live parent dropped (it names no successor) asks the grandparent, but does not
    /// claim the parent is gone: the grandparent must not evict a live relay and its subtree.
    #[test]
    fn an_evicted_relay_does_not_claim_its_parent_is_gone() {
        let mut n = relay_with_a_deep_directory();
        n.handle_message(id(2), TreeMsg::Leave { successor: None }, Millis(100));
        let s = sent(&drain(&mut n));
        let to_grandparent: Vec<_> = s.iter().filter(|(to, _)| *to == id(1)).collect();
        assert_eq!(to_grandparent.len(), 1, "{s:?}");
        assert!(
            matches!(
                to_grandparent[0].1,
                TreeMsg::Join {
                    kind: JoinKind::Repair,
                    parent_gone: false,
                    ..
                }
            ),
            "{s:?}"
        );
    }

    fn update_of(peer: u8, parent: u8, children: &[u8]) -> TreeUpdate {
        TreeUpdate {
            peer: id(peer),
            parent: Some(id(parent)),
            depth: 1,
            ancestors: vec![id(parent)],
            children: children.iter().map(|c| id(*c)).collect(),
            capacity: 4,
            uplink_kbps: 0,
            seq: 1,
            ts_ms: 0,
        }
    }

    /// A full parent gives the slot of a child to that child's orphan, on the orphan's word that
    /// the child is gone, but only to a peer the child itself listed as its child.
    #[test]
    fn grandparent_evicts_a_lost_child_for_its_orphan() {
        let mut g = TreeNode::new_root(id(0), cfg(1), 3);
        g.handle_message(id(2), join_msg(JoinKind::New), Millis(0));
        g.handle_update(id(2), update_of(2, 0, &[3]), Millis(1));
        drain(&mut g);
        let repair = |lost: u8| join_req(JoinKind::Repair, 4, Some(1), Some(id(lost)));
        // A stranger's word is not enough.
        g.handle_message(id(4), gone(repair(2)), Millis(2));
        let s = sent(&drain(&mut g));
        assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
        assert_eq!(g.children().collect::<Vec<_>>(), vec![id(2)]);
        // Nor a child's that was told to go by a live parent (evicted, or handed elsewhere):
        // evicting that parent would cut its whole subtree.
        g.handle_message(id(3), repair(2), Millis(3));
        let s = sent(&drain(&mut g));
        assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
        assert_eq!(g.children().collect::<Vec<_>>(), vec![id(2)]);
        // The lost child's own child, whose link to it went down, takes its slot.
        g.handle_message(id(3), gone(repair(2)), Millis(3));
        let s = sent(&drain(&mut g));
        assert!(s.contains(&(id(2), TreeMsg::Leave { successor: None })));
        assert!(
            s.iter()
                .any(|(to, m)| *to == id(3) && matches!(m, TreeMsg::Accept { .. }))
        );
        assert_eq!(g.children().collect::<Vec<_>>(), vec![id(3)]);
    }

    /// A full candidate does not pass an orphan's request into the subtree of the parent it lost.
    #[test]
    fn forwarding_skips_the_lost_subtree() {
        let mut g = TreeNode::new_root(id(0), cfg(2), 3);
        for c in [1u8, 2] {
            g.handle_message(id(c), join_msg(JoinKind::New), Millis(0));
            g.handle_message(
                id(c),
                TreeMsg::Summary {
                    slots: vec![ad(c + 10, 2, 3)],
                },
                Millis(1),
            );
        }
        drain(&mut g);
        g.handle_message(
            id(9),
            join_req(JoinKind::Repair, 0, None, Some(id(1))),
            Millis(2),
        );
        let s = sent(&drain(&mut g));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, id(12), "{s:?}");
    }

    /// Children of a parent with many slots send shorter summaries, and less often than the
    /// interval when the parent's byte budget requires it.
    #[test]
    fn summaries_respect_the_parents_byte_budget() {
        let mut n = attached(5, 1, &[0], 4);
        assert_eq!(n.summary_entries(), 6);
        n.parent_capacity = 8;
        assert_eq!(n.summary_entries(), 3);
        n.last_summary = vec![ad(5, 2, 4), ad(7, 3, 4), ad(8, 3, 4)];
        let len = TreeMsg::Summary {
            slots: n.last_summary.clone(),
        }
        .wire_len() as u64;
        assert_eq!(n.summary_gap(), len * 8 * 1000 / 400);
        assert!(n.summary_gap() > n.cfg.summary_interval_ms);
        n.parent_capacity = 1;
        assert_eq!(n.summary_gap(), n.cfg.summary_interval_ms);
    }

    /// A refused move pushes the next rebalancing check further out.
    #[test]
    fn refused_move_backs_off() {
        let mut n = attached(5, 1, &[0, 8, 9], 8);
        n.handle_message(
            id(1),
            TreeMsg::Directory {
                slots: vec![ad(60, 1, 2)],
            },
            Millis(1),
        );
        drain(&mut n);
        let t = Millis(1_000_000);
        n.handle_timeout(t);
        drain(&mut n);
        n.handle_message(
            id(60),
            TreeMsg::Refuse {
                reason: RefuseReason::Full,
                hints: vec![],
            },
            t.plus(100),
        );
        assert_eq!(n.move_failures, 1);
        let next = n.rebalance_at.expect("still rebalancing");
        assert!(next >= t.plus(100 + 5_000), "{next:?}");
        assert_eq!(n.parent(), Some(id(1)));
    }

    /// The deep slots a full target hinted at when it refused a move do not hide the shallow
    /// slots of the directory from the next move (they used to, for good: hints are cleared only
    /// by an accept, and a sunk subtree stayed where it was).
    #[test]
    fn a_refused_moves_hints_do_not_hide_the_directory() {
        // Depth 6, with a child: a relay that rebalances.
        let mut n = attached(5, 1, &[0, 8, 9, 10, 11], 4);
        n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
        n.handle_message(
            id(1),
            TreeMsg::Directory {
                slots: vec![ad(60, 3, 2)],
            },
            Millis(2),
        );
        drain(&mut n);
        let t = Millis(1_000_000);
        n.handle_timeout(t);
        let moves_to = |s: &[(NodeId, TreeMsg)], peer: u8| {
            s.iter().any(|(to, m)| {
                *to == id(peer)
                    && matches!(
                        m,
                        TreeMsg::Join {
                            kind: JoinKind::Move,
                            ..
                        }
                    )
            })
        };
        let s = sent(&drain(&mut n));
        assert!(moves_to(&s, 60), "{s:?}");
        // Refused, with hints of slots only one level up: not worth a move.
        n.handle_message(
            id(60),
            TreeMsg::Refuse {
                reason: RefuseReason::Full,
                hints: vec![ad(61, 4, 2)],
            },
            t.plus(100),
        );
        drain(&mut n);
        // The directory learns of another shallow slot; the next check finds it.
        n.handle_message(
            id(1),
            TreeMsg::Directory {
                slots: vec![ad(62, 2, 3)],
            },
            t.plus(200),
        );
        drain(&mut n);
        let next = n.rebalance_at.expect("still rebalancing");
        n.handle_timeout(next);
        let s = sent(&drain(&mut n));
        assert!(moves_to(&s, 62), "{s:?}");
    }

    /// A relay that a repair sank more than one level below its old depth looks for a better
    /// place soon, not after a whole rebalancing interval.
    #[test]
    fn a_relay_repaired_far_below_its_old_depth_checks_again_soon() {
        let sink = |child: bool| {
            // Depth 3, as a relay (or not).
            let mut n = attached(5, 2, &[0, 1], 4);
            if child {
                n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
            }
            n.handle_message(
                id(2),
                TreeMsg::Directory {
                    slots: vec![ad(60, 5, 2)],
                },
                Millis(2),
            );
            drain(&mut n);
            let t = Millis(100_000);
            let before = n.rebalance_at;
            n.handle_link_down(id(2), t);
            let target = n.pending.map(|p| p.target).expect("repairing");
            let upd = TreeUpdate {
                peer: target,
                parent: Some(id(30)),
                depth: 5,
                ancestors: vec![id(0), id(30), id(31), id(32), id(33)],
                children: vec![id(5)],
                capacity: 4,
                uplink_kbps: 0,
                seq: 1,
                ts_ms: 0,
            };
            n.handle_message(
                target,
                TreeMsg::Accept {
                    parent: upd,
                    directory: vec![],
                },
                t.plus(300),
            );
            assert_eq!(n.depth(), Some(6));
            (before, n.rebalance_at, t.plus(300))
        };
        let interval = cfg(4).rebalance_interval_ms;
        let (_, next, t) = sink(true);
        let next = next.expect("rebalancing");
        assert!(next > t && next.since(t) < interval / 2, "{next:?}");
        // A leaf's depth hardly matters: its schedule is unchanged.
        let (before, next, _) = sink(false);
        assert_eq!(before, next);
    }
}
