//! The messages of the tree: what peers say to each other ([`TreeMsg`]), what a peer announces
//! about itself ([`TreeUpdate`]), what a newcomer is handed ([`Snapshot`]), and their sizes on
//! the wire.
//!
//! These types are serde values encoded as CBOR (ciborium: structs as maps keyed by field name,
//! enums externally tagged), so adding a field with a default keeps old encodings valid; the
//! golden vectors under `proto/vectors/` pin them. Everything here can arrive from the network,
//! so the state machine bounds what it keeps of it ([`MAX_ANCESTORS`], `MAX_SLOTS_IN`): a longer
//! path means a loop or an attack, a longer slot list is cut rather than stored.
//!
//! `wire_len()` is the exact encoded length, used where bytes are budgeted (a child's summaries
//! share its parent's byte budget) and by the simulator's traffic accounting.

use serde::{Deserialize, Serialize};

use super::super::NodeId;

/// Depth advertised by a node that currently has no path to the root.
pub const DEPTH_DETACHED: u16 = u16::MAX;

/// Longest ancestor path accepted from the network (longer means a loop or an attack).
pub const MAX_ANCESTORS: usize = 64;

/// Longest slot list accepted from the network.
pub(super) const MAX_SLOTS_IN: usize = 32;

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

/// `skip_serializing_if` for a flag that is left out of the encoding when false.
fn is_false(b: &bool) -> bool {
    !*b
}

/// Counts the bytes written to it: the encoded length without keeping the encoding.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The exact length of `value` encoded as CBOR, as it goes on the wire: the encoder's own
/// output, counted, so the figure cannot drift from the encoding when a field is added.
fn encoded_len<T: Serialize>(value: &T) -> usize {
    let mut count = ByteCount(0);
    ciborium::into_writer(value, &mut count).expect(
        "tree messages are plain data (serde never fails on them) and counting never fails",
    );
    count.0
}

impl SlotAd {
    /// Encoded size in bytes (CBOR).
    pub fn wire_len(&self) -> usize {
        encoded_len(self)
    }
}

impl TreeUpdate {
    /// Encoded size in bytes (CBOR), before signing.
    pub fn wire_len(&self) -> usize {
        encoded_len(self)
    }
}

impl Snapshot {
    /// Encoded size in bytes (CBOR).
    pub fn wire_len(&self) -> usize {
        encoded_len(self)
    }
}

impl TreeMsg {
    /// Encoded size in bytes (CBOR), for traffic accounting and byte budgets.
    pub fn wire_len(&self) -> usize {
        encoded_len(self)
    }
}
