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
//!
//! # Driving it
//!
//! [`TreeNode`] is sans-IO: the shell (the node's room task, or the simulator) owns the
//! sockets and the clock, feeds it inputs with the current time and executes its [`Output`]s.
//! The order of the calls is documented, with an example, on [`TreeNode`]. Deadlines are data:
//! one [`Timer`] per kind, kept in a table, the earliest returned by
//! [`TreeNode::poll_timeout`].
//!
//! # Where each rule lives
//!
//! | file | decides |
//! |------|---------|
//! | `msg.rs` | the messages and their exact sizes on the wire |
//! | `config.rs` | tunables, and how many children a peer takes |
//! | `join.rs` | the joiner's side: which candidate to ask, retries, timeouts, answers |
//! | `admit.rs` | the parent's side: accept, pass down, preempt or refuse a join |
//! | `repair.rs` | parent loss: orphans, successors, backups, the grandparent's slot |
//! | `rebalance.rs` | make-before-break moves, promotions, relocations |
//! | `slots.rs` | summaries up, directories down, snapshots for newcomers |
//! | `timer.rs` | the deadlines, and the order expired ones are served in |
//! | `output.rs` | what the shell is asked to do |

mod admit;
mod config;
mod join;
mod msg;
mod output;
mod rebalance;
mod repair;
mod slots;
#[cfg(test)]
mod tests;
mod timer;

use super::{Millis, NodeId, SplitMix64};
use admit::{Downstream, JoinReq};
use join::Joiner;
use msg::MAX_SLOTS_IN;
use output::Outbox;
use rebalance::Moves;
use repair::RepairState;
use slots::SlotState;
use timer::TimerTable;

pub use config::Config;
pub use msg::{
    DEPTH_DETACHED, JoinKind, MAX_ANCESTORS, RefuseReason, SlotAd, Snapshot, TreeMsg, TreeUpdate,
};
pub use output::{Output, TreeEvent};
pub use timer::Timer;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Path {
    depth: u16,
    /// Root first, parent last.
    ancestors: Vec<NodeId>,
}

/// One peer's view of the relay tree and its decisions (the algorithm is in the module docs).
///
/// # Call order
///
/// Inputs are [`TreeNode::start`] (a viewer; [`TreeNode::new_root`] makes the broadcaster),
/// [`TreeNode::handle_snapshot`], [`TreeNode::handle_message`], [`TreeNode::handle_update`],
/// [`TreeNode::handle_link_down`], [`TreeNode::handle_timeout`] and [`TreeNode::leave`], each
/// with the current time. After every input, the shell:
///
/// 1. drains [`TreeNode::poll_output`] until it returns `None`, executing each [`Output`] in
///    order (messages, signed updates, media sessions to open or close, events); an input
///    fed back while draining (a snapshot answered at once) only queues more outputs;
/// 2. asks [`TreeNode::poll_timeout`] for the earliest deadline and calls
///    [`TreeNode::handle_timeout`] once it has passed, then drains again.
///
/// A late or early wake-up is harmless: only the timers that have expired are served.
///
/// ```
/// use waterfall::proto::tree::Timer;
/// use waterfall::proto::{Config, Millis, NodeId, Output, SlotAd, Snapshot, TreeMsg, TreeNode};
///
/// let root = NodeId([0; 32]);
/// let mut viewer = TreeNode::new(NodeId([7; 32]), Config::default(), 42);
/// viewer.start(Millis(0));
/// let mut sent = Vec::new();
/// while let Some(output) = viewer.poll_output() {
///     match output {
///         // Any member answers with the best free slots it knows (here: the root's).
///         Output::RequestSnapshot => {
///             let slot = SlotAd { peer: root, depth: 0, free: 4, capacity: 4 };
///             viewer.handle_snapshot(Snapshot { candidates: vec![slot] }, Millis(20));
///         }
///         // To the peer, over the network.
///         Output::Send { to, msg } => sent.push((to, msg)),
///         // Publish updates, open or close media sessions, report events.
///         _ => {}
///     }
/// }
/// assert!(matches!(sent.as_slice(), [(to, TreeMsg::Join { .. })] if *to == root));
/// // No answer: at the join request's deadline the viewer forgets the silent root and asks
/// // for a fresh snapshot.
/// let deadline = viewer.poll_timeout().expect("the join request waits for its answer");
/// assert_eq!(viewer.deadline(Timer::JoinAnswer), Some(deadline));
/// viewer.handle_timeout(deadline);
/// assert_eq!(viewer.poll_output(), Some(Output::RequestSnapshot));
/// ```
///
/// Its state is grouped by role, each group declared next to the rules that use it.
#[derive(Debug)]
pub struct TreeNode {
    id: NodeId,
    cfg: Config,
    /// Maximum children (from the configuration, fixed for the session).
    capacity: u16,
    rng: SplitMix64,
    is_root: bool,
    /// [`TreeNode::leave`] was called: inputs are ignored from then on.
    left: bool,
    /// Our place: parent, path to the root, the update we announce.
    up: Upstream,
    /// As joiner: the request in flight, candidates, refusals.
    join: Joiner,
    /// As parent: our children.
    down: Downstream,
    /// As orphan: the repair in progress, and the backup parent for the next one.
    repair: RepairState,
    /// As mover, grandparent or promoted peer: rebalancing and promotions.
    moves: Moves,
    /// What we know of free slots: the directory and our last summary.
    slots: SlotState,
    /// Every deadline, one per [`Timer`].
    timers: TimerTable,
    /// Outputs for the shell, in order.
    out: Outbox,
}

/// Our place in the tree, as far as we know it.
#[derive(Debug, Default)]
struct Upstream {
    parent: Option<NodeId>,
    /// Our parent's capacity, from its last update.
    parent_capacity: u16,
    /// Children of our parent (us included), from its last update.
    parent_children: u16,
    /// Our path to the root (`None`: detached, no path right now).
    path: Option<Path>,
    /// Depth of the last path we had (a detached node's reference for repairs and backups).
    last_depth: u16,
    /// Sequence number of our last published update.
    seq: u64,
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
            left: false,
            up: Upstream::default(),
            join: Joiner::default(),
            down: Downstream::default(),
            repair: RepairState::default(),
            moves: Moves::default(),
            slots: SlotState::default(),
            timers: TimerTable::default(),
            out: Outbox::default(),
        }
    }

    /// The broadcaster: attached at depth 0 from the start.
    pub fn new_root(id: NodeId, cfg: Config, seed: u64) -> Self {
        let mut n = TreeNode::new(id, cfg, seed);
        n.is_root = true;
        n.join.started = true;
        n.join.joined_once = true;
        n.up.path = Some(Path {
            depth: 0,
            ancestors: Vec::new(),
        });
        n
    }

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
        u16::from(self.moves.promotion.is_some())
    }

    /// Current parent.
    pub fn parent(&self) -> Option<NodeId> {
        self.up.parent
    }

    /// Current backup parent.
    pub fn backup(&self) -> Option<NodeId> {
        self.repair.backup
    }

    /// Depth, if we have a path to the root.
    pub fn depth(&self) -> Option<u16> {
        self.up.path.as_ref().map(|p| p.depth)
    }

    /// Root-first path to our parent (empty when detached).
    pub fn ancestors(&self) -> &[NodeId] {
        self.up.path.as_ref().map_or(&[], |p| &p.ancestors)
    }

    /// Current children.
    pub fn children(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.down.children.keys().copied()
    }

    /// Number of children.
    pub fn child_count(&self) -> usize {
        self.down.children.len()
    }

    /// Maximum children.
    pub fn capacity(&self) -> u16 {
        self.capacity
    }

    /// Whether we have a path to the root (as far as we know).
    pub fn is_attached(&self) -> bool {
        self.up.path.is_some()
    }

    /// Whether we lost our parent and are repairing.
    pub fn is_orphan(&self) -> bool {
        self.repair.orphan.is_some()
    }

    /// Whether [`TreeNode::leave`] was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The directory (best free slots of the tree) as last received.
    pub fn directory(&self) -> &[SlotAd] {
        &self.slots.directory
    }

    /// Our current state as an update (the shell signs it).
    pub fn current_update(&self, now: Millis) -> TreeUpdate {
        TreeUpdate {
            peer: self.id,
            parent: self.up.parent,
            depth: self.depth().unwrap_or(DEPTH_DETACHED),
            ancestors: self.ancestors().to_vec(),
            children: self.down.children.keys().copied().collect(),
            capacity: self.capacity,
            uplink_kbps: self.cfg.uplink_kbps,
            seq: self.up.seq,
            ts_ms: now.0,
        }
    }

    /// Next output for the shell.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop()
    }

    /// When [`TreeNode::handle_timeout`] must be called next: the earliest deadline of all.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.timers.next()
    }

    /// When `timer` fires, if it is set (for logs and tests; shells need only
    /// [`TreeNode::poll_timeout`]).
    pub fn deadline(&self, timer: Timer) -> Option<Millis> {
        self.timers.get(timer)
    }

    /// Record a measured RTT to a peer (tie-break between equal candidates).
    pub fn set_rtt(&mut self, peer: NodeId, rtt_ms: u32) {
        self.join.rtt.insert(peer, rtt_ms);
        if self.join.pending.is_some_and(|p| p.target == peer) {
            // The answer's deadline depends on the target's RTT.
            self.arm_join_answer();
            self.announce_timer();
        }
    }

    /// Begin joining: asks the shell for a snapshot.
    pub fn start(&mut self, now: Millis) {
        if self.join.started || self.left {
            return;
        }
        self.join.started = true;
        self.attempt_join(now);
        self.announce_timer();
    }

    /// A snapshot arrived (answer to [`Output::RequestSnapshot`]).
    pub fn handle_snapshot(&mut self, snapshot: Snapshot, now: Millis) {
        if self.left {
            return;
        }
        for ad in snapshot.candidates.into_iter().take(MAX_SLOTS_IN) {
            if ad.free == 0 && ad.depth == 0 && ad.peer != self.id {
                self.join.root_hint = Some(ad.peer);
            }
            self.add_hint(ad);
        }
        if self.join.pending.is_none() && (self.repair.orphan.is_some() || !self.join.joined_once) {
            self.timers.clear(Timer::Retry);
            self.attempt_join(now);
        }
        self.announce_timer();
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
            TreeMsg::Summary { slots } => self.on_summary(from, slots, now),
            TreeMsg::Directory { slots } => self.on_directory(from, slots, now),
            TreeMsg::Relocate => self.on_relocate(from, now),
            TreeMsg::MoveUnder { target } => self.on_move_under(from, target, now),
        }
        self.announce_timer();
    }

    /// A signed update from a tree neighbour (delivered by the shell after [`Output::Publish`]).
    pub fn handle_update(&mut self, from: NodeId, update: TreeUpdate, now: Millis) {
        if self.left || update.peer != from {
            return;
        }
        if self.up.parent == Some(from) {
            self.on_parent_update(update, now);
        } else {
            self.on_child_update(from, update);
        }
        self.announce_timer();
    }

    /// The transport lost the connection to `peer` (WebRTC failed/closed, or no RTCP for too long).
    pub fn handle_link_down(&mut self, peer: NodeId, now: Millis) {
        if self.left {
            return;
        }
        if self.up.parent == Some(peer) {
            self.parent_lost(None, true, now);
        }
        if self.down.children.contains_key(&peer) {
            self.remove_child(peer, now);
        }
        if self.join.pending.is_some_and(|p| p.target == peer) {
            self.give_up_pending(now);
        }
        self.announce_timer();
    }

    /// Our media could not reach `parent` (ICE failed, or never completed in time), although
    /// the parent itself may be fine: the path between us is what fails (two NATs that defeat
    /// hole punching, no TURN). Unlike [`TreeNode::handle_link_down`] this is not evidence
    /// against the parent, so the repair that follows does not ask our grandparent to evict it;
    /// the parent is not tried again before `until`, so the repair (and later moves) pick another
    /// slot instead of coming back to a path that does not work.
    pub fn handle_parent_unreachable(&mut self, parent: NodeId, until: Millis, now: Millis) {
        if self.left || self.up.parent != Some(parent) {
            return;
        }
        self.forget(parent, until);
        self.remember_unreachable(parent, until, now);
        self.out.push(Output::Disconnect { peer: parent });
        self.parent_lost(None, false, now);
        self.announce_timer();
    }

    /// Serve the timers that have expired at `now`, in the order of [`Timer::ALL`].
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.left {
            return;
        }
        self.out.last_timer = None;
        for timer in Timer::ALL {
            // Checked one by one: a handler may set or clear a later timer (an unanswered join
            // schedules an immediate retry, served in this same call).
            if self.timers.take_expired(timer, now) {
                self.on_timer(timer, now);
            }
        }
        self.announce_timer();
    }

    /// Each timer to the rules of its role.
    fn on_timer(&mut self, timer: Timer, now: Millis) {
        match timer {
            Timer::JoinAnswer => self.give_up_pending(now),
            Timer::Publish => self.publish_now(now),
            Timer::Summary => self.flush_summary(now),
            Timer::Directory => self.flush_directory(now),
            Timer::UpstreamGrace => self.upstream_grace_over(now),
            Timer::Retry => self.attempt_join(now),
            Timer::Rebalance => self.rebalance(now),
            Timer::PromotionEnd => self.promotion_over(now),
            Timer::FormerParentWait => self.former_parent_wait_over(),
        }
    }

    /// Leave gracefully: children and parent are told; the most capable child is pointed at our
    /// parent, whose slot we free.
    pub fn leave(&mut self, now: Millis) {
        if self.left {
            return;
        }
        for (c, successor) in self.successors_on_leave() {
            self.send(c, TreeMsg::Leave { successor });
            self.out.push(Output::Disconnect { peer: c });
        }
        if let Some(p) = self.up.parent {
            self.send(p, TreeMsg::Leave { successor: None });
            self.out.push(Output::Disconnect { peer: p });
        }
        if let Some(p) = self.take_pending() {
            // If it accepts after all, our absence will time out there; tell it now.
            self.send(p.target, TreeMsg::Leave { successor: None });
        }
        self.left = true;
        self.down.children.clear();
        self.up.parent = None;
        self.up.path = None;
        self.repair.orphan = None;
        // Every deadline, the promotion timers included: a node that left has nothing to wait
        // for, and a shell sleeping until `poll_timeout` must not wake for it.
        self.timers = TimerTable::default();
        let _ = now;
    }

    fn publish_now(&mut self, now: Millis) {
        self.timers.clear(Timer::Publish);
        self.up.seq += 1;
        let update = self.current_update(now);
        let mut to: Vec<NodeId> = self.down.children.keys().copied().collect();
        if let Some(p) = self.up.parent {
            to.push(p);
        }
        if !to.is_empty() {
            self.out.push(Output::Publish { update, to });
        }
    }

    fn send(&mut self, to: NodeId, msg: TreeMsg) {
        self.out.push(Output::Send { to, msg });
    }

    fn emit(&mut self, e: TreeEvent) {
        self.out.push(Output::Event(e));
    }

    /// Announce the earliest deadline if it moved (see [`Output::Timer`]).
    fn announce_timer(&mut self) {
        let t = self.poll_timeout();
        if t != self.out.last_timer {
            self.out.last_timer = t;
            if let Some(t) = t {
                self.out.push(Output::Timer(t));
            }
        }
    }
}
