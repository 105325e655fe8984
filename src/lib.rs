//! waterfall: a decentralized live-streaming node.
//!
//! One broadcaster reaches many viewers through a relay tree of peers (fanout ~4). A libp2p swarm
//! (Kademlia DHT, gossipsub, mDNS) replaces the signalling server and the database; WebRTC carries
//! the media, end-to-end encrypted with a key derived from the room password.
//!
//! Layers (see the README's module map):
//! - [`crypto`]: node identity, room keys, sealing, signed envelopes;
//! - [`wire`]: every message on the wire, strict CBOR decoding;
//! - [`proto`]: the sans-IO tree state machine and its simulator;
//! - [`net`]: the libp2p actor (DHT records, gossip, snapshots);
//! - [`media`]: the WebRTC shell (sources, sinks, relay);
//! - [`node`]: the embedding API tying them together.

pub mod crypto;
pub mod demo;
pub mod media;
pub mod net;
pub mod node;
pub mod proto;
pub mod wire;
