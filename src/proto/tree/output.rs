//! What the state machine asks of its shell ([`Output`]) and tells the application
//! ([`TreeEvent`]).
//!
//! The tree never sends, connects or sleeps itself: each decision becomes an [`Output`] queued
//! in order, and the shell (the node's room task, or the simulator) executes them. Events are
//! outputs too, so the application sees them in the order the decisions were taken.

use std::collections::VecDeque;

use super::super::{Millis, NodeId};
use super::msg::{RefuseReason, TreeMsg, TreeUpdate};

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
    ///
    /// [`Snapshot`]: super::Snapshot
    /// [`TreeNode::handle_snapshot`]: super::TreeNode::handle_snapshot
    RequestSnapshot,
    /// The earliest deadline is now this instant: call [`TreeNode::handle_timeout`] then
    /// (replaces earlier requests).
    ///
    /// Emitted after an input whenever the earliest deadline moved, so a shell may drive the
    /// timers from these outputs alone. It may instead ask [`TreeNode::poll_timeout`] once it
    /// has drained the outputs, which gives the same instant; both shells of this crate (the
    /// room task and the simulator) do that, as str0m and quinn-proto shells do, and skip
    /// this output. Nothing is emitted when every deadline is cleared: a wake-up at a stale
    /// instant finds nothing expired and does nothing. After [`TreeNode::leave`] there are
    /// no more timers to serve.
    ///
    /// [`TreeNode::handle_timeout`]: super::TreeNode::handle_timeout
    /// [`TreeNode::poll_timeout`]: super::TreeNode::poll_timeout
    /// [`TreeNode::leave`]: super::TreeNode::leave
    Timer(Millis),
    /// For the application.
    Event(TreeEvent),
}

/// The queue of outputs for the shell.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    queue: VecDeque<Output>,
    /// The last deadline announced with [`Output::Timer`].
    pub(super) last_timer: Option<Millis>,
}

impl Outbox {
    /// Queue an output.
    pub(super) fn push(&mut self, o: Output) {
        self.queue.push_back(o);
    }

    /// The oldest output.
    pub(super) fn pop(&mut self) -> Option<Output> {
        self.queue.pop_front()
    }
}
