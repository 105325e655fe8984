//! Sans-IO core: the relay-tree state machine ([`tree`]), the room layer around it ([`room`]:
//! deadlines, probes, the replay window, the end of a broadcast) and their deterministic simulator
//! ([`sim`]).
//!
//! Nothing here touches a socket, a clock or a runtime. Time is a [`Millis`] passed in by the caller,
//! randomness comes from a seeded [`SplitMix64`] owned by each state machine, collections are BTree
//! based, so the same inputs always give the same outputs: the simulator runs exactly the code the
//! node runs, for thousands of peers in virtual time (the approach of quinn-proto and iroh-gossip's
//! `proto`).
//!
//! # How the tree is built and kept healthy
//!
//! The algorithm itself is documented on [`tree`], one file per role of a peer (joiner, parent,
//! orphan, mover, slot directory) under a small [`TreeNode`] that orchestrates them and shows the
//! order of calls; in one paragraph: a newcomer fetches a [`Snapshot`] (a short list of free slots
//! near the top) from any member by request-response, asks the shallowest candidate to adopt it,
//! and retries elsewhere with jitter when refused. Knowledge of free slots flows *along tree
//! edges*: every node sends its parent a rate-limited summary of the best free slots in its
//! subtree, the root turns those into a directory of the best slots of the whole tree, and the
//! directory flows back down the tree, again rate-limited. Signed [`TreeUpdate`]s are delivered to
//! tree neighbours only (parent and children), never to the whole room, so what a node receives per
//! second does not grow with the room's size.

pub mod room;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tree;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use room::{RoomNode, RoomOutput, RoomTimings};
pub use tree::{
    Config, DEPTH_DETACHED, JoinKind, Output, RefuseReason, SlotAd, Snapshot, TreeEvent, TreeMsg,
    TreeNode, TreeUpdate,
};

/// Identity of a peer: the bytes of its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short hex is enough to tell peers apart in logs and test failures.
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // As a CBOR byte string (34 bytes), not an array of 32 integers.
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NodeId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<NodeId, E> {
                let arr: [u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(NodeId(arr))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<NodeId, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A point in time, in milliseconds since an epoch chosen by the caller (the simulator starts at 0;
/// the node uses the time since it started).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + ms`, saturating.
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
    /// `self - earlier`, or 0 if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A tiny seeded generator (SplitMix64): deterministic, dependency free, good enough for jitter and
/// tie-breaks. Not for cryptography.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            // Multiply-shift: unbiased enough for simulation purposes and branch free.
            ((self.next_u64() as u128 * n as u128) >> 64) as u64
        }
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
