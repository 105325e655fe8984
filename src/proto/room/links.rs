//! Links to tree neighbours: the probe before a link is declared down, the child-connect
//! deadline, and what declaring a link down does (see the module docs of [`super`]).
//!
//! A closed control connection is not proof that a neighbour is gone (an idle connection closes
//! and reopens on the next message), so it is probed first; a failed media transport is proof.
//! A child dropped without proof that it is gone is told to go, so it repairs instead of keeping
//! us for its parent.

use super::super::{Millis, NodeId};
use super::timer::RoomTimer;
use super::{LinkCause, RoomEvent, RoomNode, RoomOutput};
use crate::proto::tree::TreeMsg;

impl RoomNode {
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
    /// A parent whose media never came up was not lost: the path to it failed (ICE), see
    /// [`RoomNode::handle_parent_connect_failed`].
    pub fn handle_link_down(&mut self, peer: NodeId, now: Millis) {
        if self.closed {
            return;
        }
        if self.connecting_parent == Some(peer) {
            self.parent_unreachable(peer, LinkCause::ParentConnectFailed, now);
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

    /// The media connection to `parent` could not be set up (ICE failed, signalling refused).
    pub fn handle_parent_connect_failed(&mut self, parent: NodeId, now: Millis) {
        self.parent_unreachable(parent, LinkCause::ParentConnectFailed, now);
    }

    /// The media connection to our parent is up: its connect deadline is met.
    pub fn handle_parent_connected(&mut self, parent: NodeId, _now: Millis) {
        if self.connecting_parent == Some(parent) {
            self.connecting_parent = None;
            self.timers.cancel(RoomTimer::ParentConnect(parent));
        }
    }

    /// Our media cannot reach `parent`: the path fails, not (as far as we know) the parent. We
    /// tell it we go (it frees our slot now rather than at its own connect deadline), and the
    /// tree repairs elsewhere without accusing it and avoids it for
    /// [`RoomTimings::unreachable_memory_ms`](super::RoomTimings::unreachable_memory_ms).
    pub(super) fn parent_unreachable(&mut self, parent: NodeId, cause: LinkCause, now: Millis) {
        if self.connecting_parent == Some(parent) {
            self.connecting_parent = None;
            self.timers.cancel(RoomTimer::ParentConnect(parent));
        }
        if self.closed || self.tree.parent() != Some(parent) {
            return;
        }
        self.out.push_back(RoomOutput::SendControl {
            to: parent,
            msg: TreeMsg::Leave { successor: None },
        });
        let until = now.plus(self.timings.unreachable_memory_ms);
        self.tree.handle_parent_unreachable(parent, until, now);
        self.emit(RoomEvent::LinkDown {
            peer: parent,
            cause,
        });
        self.pump(now);
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

    fn is_neighbour(&self, peer: NodeId) -> bool {
        self.tree.parent() == Some(peer) || self.tree.children().any(|c| c == peer)
    }

    pub(super) fn declare_down(&mut self, peer: NodeId, cause: LinkCause, now: Millis) {
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
        if self.connecting_parent == Some(peer) {
            self.connecting_parent = None;
            self.timers.cancel(RoomTimer::ParentConnect(peer));
        }
        // The tree also gives up a join request pending at `peer` (transport evidence only).
        if neighbour || cause == LinkCause::Transport {
            self.tree.handle_link_down(peer, now);
        }
        if neighbour {
            self.emit(RoomEvent::LinkDown { peer, cause });
        }
        self.pump(now);
    }
}
