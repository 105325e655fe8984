//! The room layer of one peer ([`RoomNode`]): the rules of a room around its [`TreeNode`].
//!
//! The tree decides who is whose parent. Around it, a room has rules that are about time and
//! trust rather than about the tree's shape, and that the simulator must run exactly as the node
//! runs them; they live here, without I/O:
//!
//! - **The child-connect deadline.** A child the tree accepted must connect its media within
//!   [`RoomTimings::child_connect_ms`] (15 s). One that does not went elsewhere and its word (a
//!   Leave) was lost, or vanished before it offered; without the deadline its slot stays taken and
//!   the tree lists a child that is not there. Expired, it is declared down
//!   ([`LinkCause::NeverConnected`]) and its slot is freed.
//! - **The parent-connect deadline.** The child's side of the same rule: the media to a new
//!   parent must be up within [`RoomTimings::parent_connect_ms`] (10 s, before the parent's own
//!   deadline). A parent we cannot reach (ICE fails or never completes: two NATs that defeat hole
//!   punching and no TURN) is usually alive, and the path is what fails; so the child tells it
//!   it goes (a Leave), repairs elsewhere without asking the grandparent to evict it
//!   ([`LinkCause::ParentConnectFailed`], [`LinkCause::ParentNeverConnected`]), and does not try
//!   that parent again for [`RoomTimings::unreachable_memory_ms`] (5 min), so it picks another
//!   slot instead of coming back to a path that does not work.
//! - **The probe before a link is declared down.** When the control connection to a tree
//!   neighbour closes ([`RoomNode::handle_peer_disconnected`]) the neighbour may have crashed, or
//!   the connection was merely closed while idle and reopens on the next message. The room asks
//!   the shell to probe it ([`RoomOutput::Probe`]); an answer keeps the edge, a failure or no
//!   answer within [`RoomTimings::probe_ms`] declares the link down. A media connection that
//!   fails ([`RoomNode::handle_link_down`]) is proof enough and needs no probe.
//! - **Telling a child that may be alive.** A child dropped without proof that it is gone (it
//!   never connected, did not answer a probe in time, or was cut from the fan-out for being too
//!   slow) is sent a Leave: it repairs, rather than keep us for its parent while we no longer list
//!   it.
//! - **One snapshot request in flight.** The tree asks for a [`Snapshot`] whenever it knows no
//!   candidate; while one request is out, further ones are dropped, and a request unanswered
//!   after [`RoomTimings::snapshot_ms`] counts as an empty answer (the tree retries with jitter).
//! - **The replay window** ([`ReplayWindow`]): signatures and nonces of recent envelopes, bounded,
//!   so a replayed control message or signalling exchange is refused.
//! - **The end of the broadcast.** The root that leaves asks the shell to send a signed "broadcast
//!   ended" notice down the tree ([`RoomOutput::SendEnd`]) before its Leave messages. A viewer
//!   handed a notice the shell verified ([`RoomNode::handle_end_notice`]) forwards it to its
//!   children, reports [`RoomEvent::BroadcastEnded`] and closes. As a fallback, an orphan asks the
//!   shell to check the room record ([`RoomOutput::CheckRecord`], again every
//!   [`RoomTimings::record_check_ms`] while it has no path to the root); a record that says the
//!   broadcast is over ends the room the same way.
//!
//! Signatures, sealing and the notice's bytes are the shell's business: this layer only learns
//! that a notice was verified, never sees a key.
//!
//! # Files
//!
//! `mod.rs` holds [`RoomNode`], its inputs from the tree's side and the translation of the tree's
//! outputs (where the child-connect deadline is armed and the snapshot request is kept single);
//! one file per concern besides: `links.rs` (probes, the child-connect deadline, declaring a link
//! down), `end.rs` (leaving, the end notice, the record check), `timer.rs` (the timer table),
//! `replay.rs` (the replay window), `output.rs` (what the room tells its shell).
//!
//! [`RoomOutput`] restates five of the tree's outputs ([`Output`]) rather
//! than wrapping them: the shell and the simulator match one flat enum whose contract is the
//! room's (a `SendControl` is sealed and signed; `AcceptChild` starts the connect deadline).
//!
//! # Call order
//!
//! The same as [`TreeNode`]'s: feed inputs with `handle_*(.., now)`, then drain
//! [`RoomNode::poll_output`] until it returns `None`, then ask [`RoomNode::poll_timeout`] when to
//! call [`RoomNode::handle_timeout`] next. Timers are data ([`RoomTimer`] in a table, merged with
//! the tree's own deadline), so the shell keeps a single wake-up.
//!
//! ```
//! use waterfall::proto::{Config, Millis, NodeId, RoomNode, RoomOutput, RoomTimings, TreeNode};
//!
//! let root = NodeId([1; 32]);
//! let tree = TreeNode::new(NodeId([2; 32]), Config::default(), 7);
//! let mut room = RoomNode::new(tree, root, RoomTimings::default());
//! room.start(Millis(0));
//! while let Some(out) = room.poll_output() {
//!     match out {
//!         // A viewer that knows nobody asks the broadcaster for join candidates.
//!         RoomOutput::RequestSnapshot { from } => assert_eq!(from, root),
//!         _ => {}
//!     }
//! }
//! // Unanswered, the request counts as empty once its deadline passes.
//! let wake = room.poll_timeout().expect("the tree and the snapshot deadline are armed");
//! room.handle_timeout(wake);
//! ```

mod end;
mod links;
mod output;
mod replay;
#[cfg(test)]
mod tests;
mod timer;

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::tree::{Output, Snapshot, TreeEvent, TreeMsg, TreeNode, TreeUpdate};
use super::{Millis, NodeId};
pub use output::{EndCause, LinkCause, RoomEvent, RoomOutput};
pub use replay::{REPLAY_WINDOW_CAPACITY, ReplayWindow};
pub use timer::RoomTimer;
use timer::TimerTable;

/// The room's deadlines. The defaults are those of the node; tests may shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomTimings {
    /// An accepted child that has not connected its media after this is dropped.
    pub child_connect_ms: u64,
    /// A tree neighbour whose connection closed must answer a probe within this.
    pub probe_ms: u64,
    /// A snapshot request unanswered after this counts as an empty answer. Longer than the
    /// node's request timeout, so in the node it only covers a shell that never answers.
    pub snapshot_ms: u64,
    /// While an orphan has no path to the root, it checks the room record this often.
    pub record_check_ms: u64,
    /// A new parent whose media has not connected after this is given up (shorter than the
    /// parent's `child_connect_ms`, so the child leaves first and says so).
    #[serde(default = "default_parent_connect_ms")]
    pub parent_connect_ms: u64,
    /// A parent our media could not reach is not tried again for this long.
    #[serde(default = "default_unreachable_memory_ms")]
    pub unreachable_memory_ms: u64,
}

fn default_parent_connect_ms() -> u64 {
    10_000
}

fn default_unreachable_memory_ms() -> u64 {
    300_000
}

impl Default for RoomTimings {
    fn default() -> Self {
        RoomTimings {
            child_connect_ms: 15_000,
            probe_ms: 1_500,
            snapshot_ms: 6_000,
            record_check_ms: 5_000,
            parent_connect_ms: default_parent_connect_ms(),
            unreachable_memory_ms: default_unreachable_memory_ms(),
        }
    }
}

/// One peer's room: its [`TreeNode`] and the room-level rules of the module docs.
///
/// Call order: `handle_*` (or [`RoomNode::start`], [`RoomNode::leave`]), then
/// [`RoomNode::poll_output`] until `None`, then [`RoomNode::poll_timeout`]; call
/// [`RoomNode::handle_timeout`] when that time comes. See the module example.
#[derive(Debug)]
pub struct RoomNode {
    tree: TreeNode,
    broadcaster: NodeId,
    timings: RoomTimings,
    timers: TimerTable,
    /// Children whose media connection is up (a subset of the tree's children).
    media_up: BTreeSet<NodeId>,
    /// The parent whose media connection is being set up (its deadline armed), if any.
    connecting_parent: Option<NodeId>,
    record_check_inflight: bool,
    replay: ReplayWindow,
    closed: bool,
    out: VecDeque<RoomOutput>,
}

impl RoomNode {
    /// The room of `tree`; `broadcaster` is the root's id (the tree's own id at the root).
    pub fn new(tree: TreeNode, broadcaster: NodeId, timings: RoomTimings) -> Self {
        RoomNode {
            tree,
            broadcaster,
            timings,
            timers: TimerTable::default(),
            media_up: BTreeSet::new(),
            connecting_parent: None,
            record_check_inflight: false,
            replay: ReplayWindow::default(),
            closed: false,
            out: VecDeque::new(),
        }
    }

    /// The tree state machine (read only: every input goes through the room).
    pub fn tree(&self) -> &TreeNode {
        &self.tree
    }

    /// Our id.
    pub fn id(&self) -> NodeId {
        self.tree.id()
    }

    /// The deadlines in force.
    pub fn timings(&self) -> &RoomTimings {
        &self.timings
    }

    /// The broadcaster's id.
    pub fn broadcaster(&self) -> NodeId {
        self.broadcaster
    }

    /// Whether the room is over (left, or the broadcast ended).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether this neighbour's media connection is up (children only).
    pub fn is_child_connected(&self, child: NodeId) -> bool {
        self.media_up.contains(&child)
    }

    /// The replay window: `true` if `key` (a digest of a signature or nonce) is new.
    pub fn is_fresh(&mut self, key: [u8; 32]) -> bool {
        self.replay.insert(key)
    }

    /// Next output for the shell.
    pub fn poll_output(&mut self) -> Option<RoomOutput> {
        self.out.pop_front()
    }

    /// When [`RoomNode::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if self.closed {
            return None;
        }
        [self.timers.next(), self.tree.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    // ----- inputs -----

    /// Begin joining (viewers; the root is attached from the start).
    pub fn start(&mut self, now: Millis) {
        if self.closed {
            return;
        }
        self.tree.start(now);
        self.pump(now);
    }

    /// A tree control message from `from` (its envelope verified and fresh).
    pub fn handle_message(&mut self, from: NodeId, msg: TreeMsg, now: Millis) {
        if self.closed {
            return;
        }
        self.tree.handle_message(from, msg, now);
        self.pump(now);
    }

    /// A signed update from `from`.
    pub fn handle_update(&mut self, from: NodeId, update: TreeUpdate, now: Millis) {
        if self.closed {
            return;
        }
        self.tree.handle_update(from, update, now);
        self.pump(now);
    }

    /// The answer to [`RoomOutput::RequestSnapshot`] (empty if the request failed).
    pub fn handle_snapshot(&mut self, snapshot: Snapshot, now: Millis) {
        if self.closed {
            return;
        }
        self.timers.cancel(RoomTimer::Snapshot);
        self.tree.handle_snapshot(snapshot, now);
        self.pump(now);
    }

    /// Deadlines of the room and of the tree.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.closed {
            return;
        }
        for t in self.timers.take_due(now) {
            match t {
                RoomTimer::ChildConnect(child) => {
                    if self.tree.children().any(|c| c == child) && !self.media_up.contains(&child) {
                        self.declare_down(child, LinkCause::NeverConnected, now);
                    }
                }
                RoomTimer::Probe(peer) => self.declare_down(peer, LinkCause::ProbeTimeout, now),
                RoomTimer::ParentConnect(parent) => {
                    self.parent_unreachable(parent, LinkCause::ParentNeverConnected, now)
                }
                RoomTimer::Snapshot => {
                    // As if the request had failed: the tree retries with jitter.
                    self.tree.handle_snapshot(Snapshot::default(), now);
                }
                RoomTimer::RecordCheck => {
                    if !self.tree.is_attached() {
                        self.check_record(now);
                    }
                }
            }
        }
        if self.tree.poll_timeout().is_some_and(|t| t <= now) {
            self.tree.handle_timeout(now);
        }
        self.pump(now);
    }

    // ----- internals -----

    fn emit(&mut self, ev: RoomEvent) {
        self.out.push_back(RoomOutput::Emit(ev));
    }

    /// Translate the tree's outputs, applying the room's rules on the way.
    fn pump(&mut self, now: Millis) {
        while let Some(o) = self.tree.poll_output() {
            match o {
                Output::Send { to, msg } => self.out.push_back(RoomOutput::SendControl { to, msg }),
                Output::Publish { update, to } => {
                    self.out.push_back(RoomOutput::Publish { update, to })
                }
                Output::ConnectParent { peer } => {
                    // One media connection to a parent at a time: the deadline follows it.
                    if let Some(old) = self.connecting_parent.replace(peer) {
                        self.timers.cancel(RoomTimer::ParentConnect(old));
                    }
                    self.timers.set(
                        RoomTimer::ParentConnect(peer),
                        now.plus(self.timings.parent_connect_ms),
                    );
                    self.out.push_back(RoomOutput::ConnectParent { peer })
                }
                Output::AcceptChild { peer } => {
                    if !self.media_up.contains(&peer) {
                        self.timers.set(
                            RoomTimer::ChildConnect(peer),
                            now.plus(self.timings.child_connect_ms),
                        );
                    }
                    self.out.push_back(RoomOutput::AcceptChild { peer });
                }
                Output::RefuseChild { peer, reason } => {
                    self.out.push_back(RoomOutput::RefuseChild { peer, reason })
                }
                Output::Disconnect { peer } => {
                    self.timers.cancel(RoomTimer::ChildConnect(peer));
                    self.media_up.remove(&peer);
                    self.out.push_back(RoomOutput::Disconnect { peer });
                }
                Output::RequestSnapshot => self.request_snapshot(now),
                // The room's own poll_timeout covers the tree's.
                Output::Timer(_) => {}
                Output::Event(ev) => {
                    match ev {
                        TreeEvent::Orphaned { .. } if !self.tree.is_root() => {
                            self.check_record(now)
                        }
                        // However it went (a Leave, a link down, an eviction), it is no longer
                        // our connected child.
                        TreeEvent::ChildRemoved(c) => {
                            self.media_up.remove(&c);
                            self.timers.cancel(RoomTimer::ChildConnect(c));
                        }
                        _ => {}
                    }
                    self.emit(RoomEvent::Tree(ev));
                }
            }
        }
    }

    fn request_snapshot(&mut self, now: Millis) {
        if self.timers.is_armed(RoomTimer::Snapshot) {
            return;
        }
        // Ask the broadcaster, else our backup or parent: every member can answer.
        let me = self.tree.id();
        let from = std::iter::once(self.broadcaster)
            .chain(self.tree.backup())
            .chain(self.tree.parent())
            .find(|t| *t != me);
        if let Some(from) = from {
            self.timers
                .set(RoomTimer::Snapshot, now.plus(self.timings.snapshot_ms));
            self.out.push_back(RoomOutput::RequestSnapshot { from });
        }
    }
}
