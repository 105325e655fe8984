//! waterfall: a decentralized live-streaming node.
//!
//! One broadcaster reaches many viewers through a relay tree of peers (fanout ~4). A libp2p swarm
//! (Kademlia DHT, gossipsub, mDNS) replaces the signalling server and the database; WebRTC carries
//! the media, end-to-end encrypted with a key derived from the room password.
//!
//! # Embedding
//!
//! A [`Node`] is built once; each room it broadcasts into or watches has its own handle
//! ([`Broadcast`], [`Watch`]) and a [`RoomEvents`] stream handed out with it:
//!
//! ```no_run
//! use futures::StreamExt;
//! use waterfall::{FileSource, Node, RoomConfig, RoomEvent, SourceOptions, WatchConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder().spawn().await?;
//! let clip = FileSource::open("talk.ivf", SourceOptions::default()).await?;
//! let (room, _events) = node
//!     .broadcast(RoomConfig::new("standup").password("secret").source(Box::new(clip)))
//!     .await?;
//! println!("ticket: {}", room.ticket());
//!
//! // Elsewhere (another node, usually on another machine):
//! let viewer = Node::builder().bootstrap(node.addrs().await?).spawn().await?;
//! let (watch, mut events) = viewer
//!     .watch(room.ticket().clone(), WatchConfig::new().password("secret"))
//!     .await?;
//! while let Some(ev) = events.next().await {
//!     if matches!(ev, RoomEvent::BroadcastEnded) {
//!         break;
//!     }
//! }
//! watch.leave().await;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/hello.rs` runs the two halves as two processes: `hello FILE.ivf` broadcasts and
//! prints the ticket, `hello TICKET OUT.ivf` watches it into a file.
//!
//! # Layers
//!
//! (see the README's module map)
//! - [`crypto`]: node identity, room keys, sealing, signed envelopes;
//! - [`wire`]: every message on the wire, strict CBOR decoding;
//! - [`proto`]: the sans-IO room and tree state machines (and, with the `sim` feature, their
//!   simulator);
//! - [`net`]: the libp2p actor (DHT records, gossip, snapshots);
//! - [`media`]: the WebRTC shell (sources, sinks, relay);
//! - [`node`]: the embedding API tying them together;
//! - `http` (feature `http`, on with the CLI): the node's HTTP door — WHIP ingest, WHEP
//!   playback, a page that plays, publishes and draws the tree, `/api/status` and `/metrics`.

pub mod crypto;
#[cfg(feature = "http")]
pub mod http;
pub mod media;
pub mod net;
pub mod node;
pub mod proto;
pub mod wire;

pub use crypto::{Identity, KdfParams, RoomKeys};
pub use media::{
    FileSource, MediaConfig, MediaEvent, MediaSource, MediaStats, SinkTarget, Sinks, SourceOptions,
};
pub use node::{
    Broadcast, Node, NodeBuilder, NodeError, RoomConfig, RoomEvent, RoomEvents, RoomStatus, Watch,
    WatchConfig, WatchTarget,
};
pub use wire::Ticket;
