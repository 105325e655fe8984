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
//! The file is one concern (the room's rules): about 700 lines with their docs, then the tests, kept
//! beside the rules they pin down.
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

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::tree::{Output, RefuseReason, Snapshot, TreeEvent, TreeMsg, TreeNode, TreeUpdate};
use super::{Millis, NodeId};

/// Remembered envelope signatures and nonces, per room.
pub const REPLAY_WINDOW_CAPACITY: usize = 4096;

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
}

impl Default for RoomTimings {
    fn default() -> Self {
        RoomTimings {
            child_connect_ms: 15_000,
            probe_ms: 1_500,
            snapshot_ms: 6_000,
            record_check_ms: 5_000,
        }
    }
}

/// The room layer's deadlines, one entry each in the timer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoomTimer {
    /// An accepted child must have connected its media by now.
    ChildConnect(NodeId),
    /// A probed neighbour must have answered by now.
    Probe(NodeId),
    /// The snapshot request in flight must have been answered by now.
    Snapshot,
    /// Check the room record again (while orphaned).
    RecordCheck,
}

/// Pending deadlines. Bounded: one per accepted child (the tree bounds those by its capacity,
/// plus one during a promotion), one per probed neighbour (parent and children), two more.
#[derive(Clone, Debug, Default)]
struct TimerTable {
    at: BTreeMap<RoomTimer, Millis>,
}

impl TimerTable {
    fn set(&mut self, t: RoomTimer, when: Millis) {
        self.at.insert(t, when);
    }
    /// Whether it was armed.
    fn cancel(&mut self, t: RoomTimer) -> bool {
        self.at.remove(&t).is_some()
    }
    fn is_armed(&self, t: RoomTimer) -> bool {
        self.at.contains_key(&t)
    }
    fn next(&self) -> Option<Millis> {
        self.at.values().min().copied()
    }
    /// Removes and returns the timers due at `now`, earliest first (ties in timer order).
    fn take_due(&mut self, now: Millis) -> Vec<RoomTimer> {
        if self.next().is_none_or(|t| t > now) {
            return Vec::new();
        }
        let mut due: Vec<(Millis, RoomTimer)> = self
            .at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, t)| (*t, *k))
            .collect();
        due.sort();
        for (_, k) in &due {
            self.at.remove(k);
        }
        due.into_iter().map(|(_, k)| k).collect()
    }
}

/// Why a link to a neighbour was declared down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum LinkCause {
    /// The media transport failed or closed (no probe needed).
    Transport,
    /// The probe after a closed connection failed at once (connection refused).
    ProbeFailed,
    /// The probe after a closed connection was not answered in time.
    ProbeTimeout,
    /// An accepted child never connected its media.
    NeverConnected,
    /// The media session cut a child that could not keep up (it is alive, and told to go).
    TooSlow,
    /// Connecting the media to a new parent failed.
    ParentConnectFailed,
}

/// How a viewer learnt that the broadcast is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndCause {
    /// The broadcaster's signed notice (along the tree or on the room topic).
    Notice,
    /// The room record says the broadcast ended (the fallback of an orphan).
    Record,
    /// The broadcaster vanished without a word: no media from the source and the broadcaster
    /// unreachable for the shell's grace period (a crash; see
    /// [`RoomNode::handle_broadcaster_lost`]).
    BroadcasterLost,
}

/// What happened in the room, for the shell and the application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomEvent {
    /// From the tree.
    Tree(TreeEvent),
    /// A link to a neighbour was declared down (and handed to the tree).
    LinkDown {
        /// The neighbour.
        peer: NodeId,
        /// Why.
        cause: LinkCause,
    },
    /// A probed neighbour answered: the edge stays.
    ProbeAnswered(NodeId),
    /// The broadcast is over; the room closes ([`RoomOutput::Close`] follows).
    BroadcastEnded(EndCause),
}

/// Instructions for the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomOutput {
    /// Seal, sign and send a tree control message to one peer.
    SendControl {
        /// Recipient.
        to: NodeId,
        /// Message.
        msg: TreeMsg,
    },
    /// Sign this update and deliver it to these tree neighbours.
    Publish {
        /// Our new state.
        update: TreeUpdate,
        /// Recipients.
        to: Vec<NodeId>,
    },
    /// Ask `from` for a snapshot and pass the answer to [`RoomNode::handle_snapshot`] (an empty
    /// one if the request failed). `from` is the broadcaster, else the backup or the parent.
    RequestSnapshot {
        /// Whom to ask.
        from: NodeId,
    },
    /// Open the media session from this (new) parent; report a failure with
    /// [`RoomNode::handle_parent_connect_failed`].
    ConnectParent {
        /// The parent.
        peer: NodeId,
    },
    /// This child was accepted: answer its offer when it comes, then report
    /// [`RoomNode::handle_child_connected`].
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
    /// Check that this neighbour is alive (any answer will do); report with
    /// [`RoomNode::handle_probe_answered`] or [`RoomNode::handle_probe_failed`].
    Probe {
        /// The neighbour.
        peer: NodeId,
    },
    /// Send the broadcaster's signed end notice to these peers (the root signs it; a viewer
    /// forwards the one it verified, byte for byte). The root also publishes it on the room topic.
    SendEnd {
        /// Recipients (our children).
        to: Vec<NodeId>,
    },
    /// Look up the room record and report with [`RoomNode::handle_record_checked`].
    CheckRecord,
    /// For the application.
    Emit(RoomEvent),
    /// The room is over: the shell stops feeding inputs and closes its media.
    Close,
}

/// Bounded memory of recent items (replay protection): a set with first-in, first-out eviction.
/// An envelope outlives its stay here only if more than the capacity arrive within its expiry;
/// expiry bounds replays beyond that.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    set: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new(REPLAY_WINDOW_CAPACITY)
    }
}

impl ReplayWindow {
    /// A window of `capacity` items.
    pub fn new(capacity: usize) -> Self {
        ReplayWindow {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True if `item` is new (and remembers it); false for a replay.
    pub fn insert(&mut self, item: [u8; 32]) -> bool {
        if !self.set.insert(item) {
            return false;
        }
        self.order.push_back(item);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }

    /// Items remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
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

    /// The control connection to `peer` closed. A tree neighbour is probed before anything is
    /// declared: an idle-closed connection simply reopens, a crashed peer does not answer.
    pub fn handle_peer_disconnected(&mut self, peer: NodeId, now: Millis) {
        if self.closed || !self.is_neighbour(peer) {
            return;
        }
        let t = RoomTimer::Probe(peer);
        if !self.timers.is_armed(t) {
            self.timers.set(t, now.plus(self.timings.probe_ms));
            self.out.push_back(RoomOutput::Probe { peer });
        }
    }

    /// A probed neighbour answered.
    pub fn handle_probe_answered(&mut self, peer: NodeId, _now: Millis) {
        if self.timers.cancel(RoomTimer::Probe(peer)) {
            self.emit(RoomEvent::ProbeAnswered(peer));
        }
    }

    /// A probe could not be delivered (the peer refused the connection): down at once.
    pub fn handle_probe_failed(&mut self, peer: NodeId, now: Millis) {
        if self.timers.cancel(RoomTimer::Probe(peer)) {
            self.declare_down(peer, LinkCause::ProbeFailed, now);
        }
    }

    /// The media transport lost `peer` (connection failed or closed, or no RTCP for too long).
    pub fn handle_link_down(&mut self, peer: NodeId, now: Millis) {
        if self.closed {
            return;
        }
        self.timers.cancel(RoomTimer::Probe(peer));
        self.declare_down(peer, LinkCause::Transport, now);
    }

    /// The media session cut `child` from the fan-out because it could not keep up: it is alive,
    /// so it is told to go (it repairs elsewhere) and its slot is freed.
    pub fn handle_child_too_slow(&mut self, child: NodeId, now: Millis) {
        if self.closed {
            return;
        }
        self.timers.cancel(RoomTimer::Probe(child));
        self.declare_down(child, LinkCause::TooSlow, now);
    }

    /// The media connection to `parent` could not be set up.
    pub fn handle_parent_connect_failed(&mut self, parent: NodeId, now: Millis) {
        if self.closed || self.tree.parent() != Some(parent) {
            return;
        }
        self.declare_down(parent, LinkCause::ParentConnectFailed, now);
    }

    /// A child's media connection is up. A child the tree no longer lists (it left while we
    /// were answering) is disconnected again.
    pub fn handle_child_connected(&mut self, child: NodeId, _now: Millis) {
        if self.closed {
            return;
        }
        self.timers.cancel(RoomTimer::ChildConnect(child));
        if self.tree.children().any(|c| c == child) {
            self.media_up.insert(child);
        } else {
            self.out.push_back(RoomOutput::Disconnect { peer: child });
        }
    }

    /// The shell verified the broadcaster's end notice (signer, room, session). The root
    /// ignores it (only its own leave ends its broadcast).
    pub fn handle_end_notice(&mut self, now: Millis) {
        if self.closed || self.tree.is_root() {
            return;
        }
        self.end(EndCause::Notice, now);
    }

    /// The answer to [`RoomOutput::CheckRecord`]: `live` unless the record says the broadcast
    /// ended (an unreachable record counts as live: the tree's repair goes on).
    pub fn handle_record_checked(&mut self, live: bool, now: Millis) {
        self.record_check_inflight = false;
        if self.closed || live || self.tree.is_root() {
            return;
        }
        self.end(EndCause::Record, now);
    }

    /// The shell found the broadcaster gone (its media silent and the broadcaster itself
    /// unreachable for a grace period): the room ends as for a notice, with
    /// [`EndCause::BroadcasterLost`]. The root ignores it.
    pub fn handle_broadcaster_lost(&mut self, now: Millis) {
        if self.closed || self.tree.is_root() {
            return;
        }
        self.end(EndCause::BroadcasterLost, now);
    }

    /// Leave: at the root, the end notice goes to the children before the Leave messages.
    pub fn leave(&mut self, now: Millis) {
        if self.closed {
            return;
        }
        if self.tree.is_root() {
            let to: Vec<NodeId> = self.tree.children().collect();
            self.out.push_back(RoomOutput::SendEnd { to });
        }
        self.close(now);
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

    fn is_neighbour(&self, peer: NodeId) -> bool {
        self.tree.parent() == Some(peer) || self.tree.children().any(|c| c == peer)
    }

    fn emit(&mut self, ev: RoomEvent) {
        self.out.push_back(RoomOutput::Emit(ev));
    }

    fn declare_down(&mut self, peer: NodeId, cause: LinkCause, now: Millis) {
        let neighbour = self.is_neighbour(peer);
        if matches!(
            cause,
            LinkCause::NeverConnected | LinkCause::ProbeTimeout | LinkCause::TooSlow
        ) && self.tree.children().any(|c| c == peer)
        {
            // Without proof that it is gone, it may be alive and merely slow (its offer or its
            // answer still on the way): told to go, it repairs, instead of taking us for its
            // parent while we no longer take it for our child. A half-open media session closes.
            self.out.push_back(RoomOutput::SendControl {
                to: peer,
                msg: TreeMsg::Leave { successor: None },
            });
            self.out.push_back(RoomOutput::Disconnect { peer });
        }
        self.media_up.remove(&peer);
        // The tree also gives up a join request pending at `peer` (transport evidence only).
        if neighbour || cause == LinkCause::Transport {
            self.tree.handle_link_down(peer, now);
        }
        if neighbour {
            self.emit(RoomEvent::LinkDown { peer, cause });
        }
        self.pump(now);
    }

    fn end(&mut self, cause: EndCause, now: Millis) {
        self.emit(RoomEvent::BroadcastEnded(cause));
        let to: Vec<NodeId> = self.tree.children().collect();
        if !to.is_empty() {
            self.out.push_back(RoomOutput::SendEnd { to });
        }
        self.close(now);
    }

    fn close(&mut self, now: Millis) {
        self.tree.leave(now);
        self.pump(now);
        self.closed = true;
        self.timers = TimerTable::default();
        self.media_up.clear();
        self.out.push_back(RoomOutput::Close);
    }

    fn check_record(&mut self, now: Millis) {
        if !self.record_check_inflight {
            self.record_check_inflight = true;
            self.out.push_back(RoomOutput::CheckRecord);
        }
        self.timers.set(
            RoomTimer::RecordCheck,
            now.plus(self.timings.record_check_ms),
        );
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

#[cfg(test)]
mod tests {
    use super::super::tree::{Config, JoinKind, SlotAd};
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    fn drain(r: &mut RoomNode) -> Vec<RoomOutput> {
        std::iter::from_fn(|| r.poll_output()).collect()
    }

    fn root() -> RoomNode {
        RoomNode::new(
            TreeNode::new_root(id(1), Config::default(), 1),
            id(1),
            RoomTimings::default(),
        )
    }

    /// A first join request (the joiner is the sender).
    fn join() -> TreeMsg {
        TreeMsg::Join {
            kind: JoinKind::New,
            capacity: 4,
            max_depth: None,
            lost_parent: None,
            joiner: None,
            hops: 0,
            parent_gone: false,
        }
    }

    /// Runs timers up to `until`, returning every output.
    fn run_until(r: &mut RoomNode, until: Millis) -> Vec<RoomOutput> {
        let mut out = drain(r);
        for _ in 0..10_000 {
            match r.poll_timeout() {
                Some(t) if t <= until => {
                    r.handle_timeout(t);
                    out.extend(drain(r));
                }
                _ => break,
            }
        }
        out
    }

    fn downs(out: &[RoomOutput]) -> Vec<(NodeId, LinkCause)> {
        out.iter()
            .filter_map(|o| match o {
                RoomOutput::Emit(RoomEvent::LinkDown { peer, cause }) => Some((*peer, *cause)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_accepted_child_that_never_connects_is_dropped_after_the_deadline() {
        let mut r = root();
        r.handle_message(id(2), join(), Millis(0));
        r.handle_message(id(3), join(), Millis(0));
        let out = drain(&mut r);
        assert!(out.contains(&RoomOutput::AcceptChild { peer: id(2) }));
        assert!(out.contains(&RoomOutput::AcceptChild { peer: id(3) }));
        // Child 3 connects its media; child 2 never does.
        r.handle_child_connected(id(3), Millis(2_000));
        let out = run_until(&mut r, Millis(14_999));
        assert!(downs(&out).is_empty(), "{out:?}");
        assert_eq!(r.tree().child_count(), 2);
        let out = run_until(&mut r, Millis(15_000));
        assert_eq!(downs(&out), vec![(id(2), LinkCause::NeverConnected)]);
        assert!(out.contains(&RoomOutput::SendControl {
            to: id(2),
            msg: TreeMsg::Leave { successor: None }
        }));
        assert!(out.contains(&RoomOutput::Disconnect { peer: id(2) }));
        assert_eq!(r.tree().children().collect::<Vec<_>>(), vec![id(3)]);
        // Its slot is free again: a newcomer is accepted in its place.
        r.handle_message(id(4), join(), Millis(15_001));
        assert!(drain(&mut r).contains(&RoomOutput::AcceptChild { peer: id(4) }));
        // A child cut for being too slow is alive: told to go, and its slot freed.
        r.handle_child_connected(id(4), Millis(15_100));
        drain(&mut r);
        r.handle_child_too_slow(id(4), Millis(15_200));
        let out = drain(&mut r);
        assert_eq!(downs(&out), vec![(id(4), LinkCause::TooSlow)]);
        assert!(out.contains(&RoomOutput::SendControl {
            to: id(4),
            msg: TreeMsg::Leave { successor: None }
        }));
        assert_eq!(r.tree().children().collect::<Vec<_>>(), vec![id(3)]);
        // A late connection of the dropped child is closed again.
        r.handle_child_connected(id(2), Millis(16_000));
        assert_eq!(drain(&mut r), vec![RoomOutput::Disconnect { peer: id(2) }]);
    }

    #[test]
    fn a_closed_connection_is_probed_before_the_link_is_declared_down() {
        let mut r = root();
        for c in [2, 3, 4] {
            r.handle_message(id(c), join(), Millis(0));
            r.handle_child_connected(id(c), Millis(100));
        }
        drain(&mut r);
        // Not a neighbour: nothing to probe.
        r.handle_peer_disconnected(id(9), Millis(1_000));
        assert!(drain(&mut r).is_empty());
        // 2 answers, 3 stays silent, 4 refuses the connection.
        for c in [2, 3, 4] {
            r.handle_peer_disconnected(id(c), Millis(1_000));
        }
        // A second close while probing does not probe twice.
        r.handle_peer_disconnected(id(2), Millis(1_001));
        let probes: Vec<_> = drain(&mut r)
            .into_iter()
            .filter(|o| matches!(o, RoomOutput::Probe { .. }))
            .collect();
        assert_eq!(probes.len(), 3);
        r.handle_probe_answered(id(2), Millis(1_100));
        assert_eq!(
            drain(&mut r),
            vec![RoomOutput::Emit(RoomEvent::ProbeAnswered(id(2)))]
        );
        r.handle_probe_failed(id(4), Millis(1_200));
        let refused = drain(&mut r);
        assert_eq!(downs(&refused), vec![(id(4), LinkCause::ProbeFailed)]);
        assert!(
            !refused
                .iter()
                .any(|o| matches!(o, RoomOutput::SendControl { .. })),
            "a peer that refused the connection is not written to: {refused:?}"
        );
        let out = run_until(&mut r, Millis(2_499));
        assert!(downs(&out).is_empty());
        let out = run_until(&mut r, Millis(2_500));
        assert_eq!(downs(&out), vec![(id(3), LinkCause::ProbeTimeout)]);
        // It may be alive and slow: told to go. The one that refused the connection is gone.
        let leave = |c: u8| RoomOutput::SendControl {
            to: id(c),
            msg: TreeMsg::Leave { successor: None },
        };
        assert!(out.contains(&leave(3)));
        assert_eq!(r.tree().children().collect::<Vec<_>>(), vec![id(2)]);
        // A late answer changes nothing.
        r.handle_probe_answered(id(3), Millis(3_000));
        assert!(drain(&mut r).is_empty());
    }

    fn viewer() -> RoomNode {
        RoomNode::new(
            TreeNode::new(id(5), Config::default(), 5),
            id(1),
            RoomTimings::default(),
        )
    }

    #[test]
    fn one_snapshot_request_in_flight_and_a_deadline_for_it() {
        let mut r = viewer();
        r.start(Millis(0));
        let out = drain(&mut r);
        assert!(out.contains(&RoomOutput::RequestSnapshot { from: id(1) }));
        // The tree retries every join timeout; no second request while one is out.
        let out = run_until(&mut r, Millis(5_999));
        assert!(
            !out.iter()
                .any(|o| matches!(o, RoomOutput::RequestSnapshot { .. })),
            "{out:?}"
        );
        // Unanswered after the deadline: counts as empty, and the next request goes out.
        let out = run_until(&mut r, Millis(7_500));
        assert!(out.contains(&RoomOutput::RequestSnapshot { from: id(1) }));
        // An answer clears it at once.
        r.handle_snapshot(
            Snapshot {
                candidates: vec![SlotAd {
                    peer: id(1),
                    depth: 0,
                    free: 2,
                    capacity: 4,
                }],
            },
            Millis(7_600),
        );
        let out = drain(&mut r);
        assert!(
            out.iter()
                .any(|o| matches!(o, RoomOutput::SendControl { to, .. } if *to == id(1)))
        );
    }

    fn attached_viewer() -> RoomNode {
        let mut r = viewer();
        r.start(Millis(0));
        r.handle_snapshot(
            Snapshot {
                candidates: vec![SlotAd {
                    peer: id(1),
                    depth: 0,
                    free: 2,
                    capacity: 4,
                }],
            },
            Millis(10),
        );
        drain(&mut r);
        let mut parent = TreeNode::new_root(id(1), Config::default(), 1);
        parent.handle_message(id(5), join(), Millis(20));
        let accept = std::iter::from_fn(|| parent.poll_output())
            .find_map(|o| match o {
                Output::Send { to, msg } if to == id(5) => Some(msg),
                _ => None,
            })
            .expect("the root accepts");
        r.handle_message(id(1), accept, Millis(30));
        assert_eq!(r.tree().parent(), Some(id(1)));
        r.handle_message(id(6), join(), Millis(40));
        r.handle_child_connected(id(6), Millis(50));
        drain(&mut r);
        r
    }

    #[test]
    fn the_end_notice_is_forwarded_and_closes_the_room() {
        let mut r = attached_viewer();
        r.handle_end_notice(Millis(100));
        let out = drain(&mut r);
        assert_eq!(
            out[0],
            RoomOutput::Emit(RoomEvent::BroadcastEnded(EndCause::Notice))
        );
        assert_eq!(out[1], RoomOutput::SendEnd { to: vec![id(6)] });
        assert_eq!(out.last(), Some(&RoomOutput::Close));
        assert!(r.is_closed() && r.tree().has_left());
        assert_eq!(r.poll_timeout(), None);
        // Once only.
        r.handle_end_notice(Millis(200));
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn the_root_sends_the_end_notice_before_its_leave() {
        let mut r = root();
        r.handle_message(id(2), join(), Millis(0));
        drain(&mut r);
        r.handle_end_notice(Millis(10));
        assert!(
            drain(&mut r).is_empty(),
            "only the root's own leave ends it"
        );
        r.leave(Millis(20));
        let out = drain(&mut r);
        assert_eq!(out[0], RoomOutput::SendEnd { to: vec![id(2)] });
        let leave = out
            .iter()
            .position(|o| {
                matches!(
                    o,
                    RoomOutput::SendControl {
                        msg: TreeMsg::Leave { .. },
                        ..
                    }
                )
            })
            .expect("a Leave to the child");
        assert!(leave > 0);
        assert_eq!(out.last(), Some(&RoomOutput::Close));
    }

    #[test]
    fn an_orphan_checks_the_record_and_ends_when_it_says_so() {
        let mut r = attached_viewer();
        // The parent (the broadcaster) vanished without a word.
        r.handle_link_down(id(1), Millis(1_000));
        let out = drain(&mut r);
        assert_eq!(
            out.iter()
                .filter(|o| **o == RoomOutput::CheckRecord)
                .count(),
            1
        );
        // Still reachable as far as anyone knows: the repair goes on, checks repeat while
        // detached, one at a time.
        r.handle_record_checked(true, Millis(1_500));
        let out = run_until(&mut r, Millis(6_100));
        assert_eq!(
            out.iter()
                .filter(|o| **o == RoomOutput::CheckRecord)
                .count(),
            1,
            "{out:?}"
        );
        assert!(!r.is_closed());
        r.handle_record_checked(false, Millis(6_200));
        let out = drain(&mut r);
        assert_eq!(
            out[0],
            RoomOutput::Emit(RoomEvent::BroadcastEnded(EndCause::Record))
        );
        assert_eq!(out.last(), Some(&RoomOutput::Close));
    }

    #[test]
    fn replay_window_is_bounded_and_detects_replays() {
        let mut s = ReplayWindow::new(64);
        assert!(s.insert([1; 32]));
        assert!(!s.insert([1; 32]));
        for i in 0..200u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 0xEE;
            assert!(s.insert(k));
        }
        assert_eq!(s.len(), 64);
        assert_eq!(s.set.len(), s.order.len());
        // The oldest fell out of the window; the newest are still there.
        assert!(s.insert([1; 32]));
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&199u32.to_le_bytes());
        k[31] = 0xEE;
        assert!(!s.insert(k));
    }
}
