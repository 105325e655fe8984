//! What the room layer tells its shell: [`RoomOutput`] (instructions, drained with
//! [`RoomNode::poll_output`](super::RoomNode::poll_output)) and [`RoomEvent`] (what happened, for
//! the application), with the causes they carry.

use super::super::NodeId;
#[cfg(doc)]
use super::RoomNode;
use crate::proto::tree::{RefuseReason, TreeEvent, TreeMsg, TreeUpdate};

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
    /// Connecting the media to a new parent failed (ICE failed; signalling refused).
    ParentConnectFailed,
    /// The media to a new parent was not up within
    /// [`RoomTimings::parent_connect_ms`](super::RoomTimings::parent_connect_ms).
    ParentNeverConnected,
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
    /// [`RoomNode::handle_broadcaster_lost`](super::RoomNode::handle_broadcaster_lost)).
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
