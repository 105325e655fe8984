//! The libp2p network actor: DHT records, gossip and direct requests, payload-agnostic.
//!
//! One tokio task (the *actor*, `actor`) owns the libp2p `Swarm` and `select!`s over swarm
//! events, a bounded command channel and a housekeeping tick — the shape of rust-libp2p's
//! `examples/file-sharing` and iroh-gossip's `net.rs`. [`Net`] is a cheap `Clone` handle whose
//! async methods send a command carrying a `oneshot` reply; long operations (DHT queries,
//! requests, dials) are parked in maps keyed by libp2p's ids until their final event arrives.
//! Dropping the last [`Net`] (or calling [`Net::shutdown`]) ends the actor and closes the swarm.
//! Things that happen on their own (gossip, inbound requests, peers) arrive as [`NetEvent`]s on
//! the bounded receiver returned by [`Net::spawn`]; when the application lags, events are dropped
//! (and logged) rather than stalling the swarm.
//!
//! Peers are libp2p `PeerId`s here and [`NodeId`]s everywhere above: [`peer_of`] and [`node_of`]
//! are the one pair of conversions between them.
//!
//! The actor never interprets payloads: records, gossip and requests are bytes, and the caller
//! injects a [`RecordValidator`] and a [`GossipValidator`] (in waterfall: envelope signature and
//! seal checks from `crypto`/`wire`).
//!
//! Protocols (`behaviour`): TCP + QUIC, noise, yamux, identify, ping, AutoNAT v2 (client and
//! server), circuit relay v2 (client, and a bounded server per [`RelayMode`]) + DCUtR, connection
//! limits, a block list, optional mDNS, two Kademlia instances (the waterfall DHT
//! `/waterfall/kad/1.0.0` in server mode with validated inserts, and the opt-in public Amino DHT
//! for provider records only), gossipsub with strict signing and manual validation, and
//! request-response `/waterfall/req/1.0.0` (raw bytes, size-limited, `codec`).
//!
//! Reachability (`actor/reach.rs`): identify's observed addresses are candidates that AutoNAT v2
//! tests by dialling back from a fresh port; only what passes becomes an external address. A
//! node that is not confirmed reachable reserves a slot on relay-capable peers (bootstrap
//! peers first, then any connected peer that serves the relay protocol) and advertises the `/p2p-circuit` address it gets; DCUtR then tries to upgrade relayed
//! connections to direct ones. [`Net::addrs`] is what others can dial, in that order: confirmed
//! direct addresses, relayed ones, then listen addresses (loopback ones only when nothing else
//! exists). What a user must know (bootstrap failures, reachability, relay reservations, hole
//! punching) is broadcast as [`NetNotice`]s ([`Net::notices`]), not only logged.
//!
//! DHT store (`store`): this node's own records apart from those it holds for others, which are
//! bounded per sending peer, per signer and in total, held at most their kind's
//! [`RecordMeta::hold_for`], taken only for keys this node is close to, and swept every few
//! seconds; the node's own records are never crowded out (issue 16).
//!
//! Limits (issue 16): inbound connections per remote IP (`ip_limits`, beside libp2p's
//! connection limits in total and per peer), inbound requests pending per peer
//! ([`MAX_PENDING_INBOUND_PER_PEER`]) and in total; a request the application does not get (its
//! event queue is full) or drops unanswered frees its slot at once.
//!
//! Misbehaviour: a peer that sends an invalid record, an invalid gossip message or an oversized
//! request earns a strike (a record or message that merely expired, or arrives for a topic we
//! left, does not: [`GossipVerdict::Ignore`], `records::Refusal::is_misbehaviour`); at [`MAX_STRIKES`] it is disconnected and blocked for
//! [`NetConfig::ban_duration`]. Gossipsub itself drops messages with bad signatures.

mod actor;
mod behaviour;
mod codec;
mod ip_limits;
pub mod records;
mod relay_guard;
mod store;

use std::{fmt, sync::Arc, time::Duration};

use libp2p::{Multiaddr, PeerId, identity::Keypair};
use tokio::sync::{mpsc, oneshot};

use crate::proto::NodeId;

pub use records::{CLOCK_SKEW, MAX_RECORD_BYTES, MAX_RECORD_LIFETIME};
pub use store::{MAX_FOREIGN, MAX_OWN_RECORDS, MAX_PER_SIGNER, MAX_PER_SOURCE};

/// Notices kept for a lagging [`Net::notices`] receiver (older ones are dropped).
pub const NOTICE_CAPACITY: usize = 64;

/// Whether a node serves circuit relay v2 for others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Never.
    #[default]
    Off,
    /// Once AutoNAT v2 confirmed a direct external address: only a reachable node is a useful
    /// relay.
    Auto,
    /// Always (a host known to be public).
    On,
}

/// What this node knows about how others can reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Reachability {
    /// Nothing tested yet (no AutoNAT server among the peers, or too early).
    #[default]
    Unknown,
    /// A direct address passed an AutoNAT dial-back.
    Public,
    /// Dial-backs failed and no relay holds a slot for us: only peers we dial reach us.
    BehindNat,
    /// Not directly reachable, but reachable through a relay.
    Relayed,
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::BehindNat => "behind NAT",
            Reachability::Relayed => "relayed",
        })
    }
}

/// Something about connectivity a user should see (an embedder prints or shows these; the
/// CLI prints each as a message and a `--json` event).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetNotice {
    /// Connected to a bootstrap peer.
    BootstrapConnected { peer: PeerId, addr: Multiaddr },
    /// Dialling a bootstrap address failed (retried with backoff).
    BootstrapFailed { addr: Multiaddr, error: String },
    /// Reachability changed.
    Reachability(Reachability),
    /// An address was confirmed as dialable by others (AutoNAT v2 or a relay reservation).
    AddressConfirmed(Multiaddr),
    /// A confirmed address is no longer valid.
    AddressExpired(Multiaddr),
    /// A relay holds a slot for us: we are reachable at `addr`.
    RelayReserved { relay: PeerId, addr: Multiaddr },
    /// A relay refused or lost our reservation (retried with backoff).
    RelayFailed { relay: PeerId, error: String },
    /// Not directly reachable and no relay-capable peer is known: peers outside this network
    /// cannot reach this node.
    NoRelay,
    /// A relayed connection was upgraded to a direct one (DCUtR).
    HolePunched { peer: PeerId },
    /// Hole punching with a peer failed: the connection stays relayed.
    HolePunchFailed { peer: PeerId, error: String },
    /// A public DHT operation failed (bootstrap, provide or lookup).
    PublicDhtFailed { what: &'static str, error: String },
}

impl fmt::Display for NetNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetNotice::BootstrapConnected { peer, addr } => {
                write!(f, "connected to bootstrap peer {peer} at {addr}")
            }
            NetNotice::BootstrapFailed { addr, error } => {
                write!(f, "bootstrap peer {addr} unreachable: {error}")
            }
            NetNotice::Reachability(r) => write!(f, "reachability: {r}"),
            NetNotice::AddressConfirmed(a) => write!(f, "reachable at {a}"),
            NetNotice::AddressExpired(a) => write!(f, "no longer reachable at {a}"),
            NetNotice::RelayReserved { relay, addr } => {
                write!(f, "relay {relay} holds a slot for us: reachable at {addr}")
            }
            NetNotice::RelayFailed { relay, error } => {
                write!(f, "relay {relay} refused or lost our reservation: {error}")
            }
            NetNotice::NoRelay => f.write_str(
                "behind a NAT and no relay is known: peers outside this network cannot reach \
                 this node (give --bootstrap a public waterfall node)",
            ),
            NetNotice::HolePunched { peer } => {
                write!(f, "hole punched: direct connection to {peer}")
            }
            NetNotice::HolePunchFailed { peer, error } => {
                write!(
                    f,
                    "hole punching to {peer} failed ({error}): staying relayed"
                )
            }
            NetNotice::PublicDhtFailed { what, error } => {
                write!(f, "public DHT {what} failed: {error}")
            }
        }
    }
}

/// Protocol of the waterfall DHT.
pub const WATERFALL_KAD_PROTOCOL: &str = "/waterfall/kad/1.0.0";
/// Protocol of the public Amino DHT (opt-in, provider records only).
pub const PUBLIC_KAD_PROTOCOL: &str = "/ipfs/kad/1.0.0";
/// Request-response protocol carrying opaque bytes (snapshots, tree control, signalling).
pub const REQUEST_PROTOCOL: &str = "/waterfall/req/1.0.0";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/waterfall/1.0.0";
/// Strikes after which a peer is disconnected and blocked.
pub const MAX_STRIKES: u32 = 3;
/// Capacity of the command channel from handles to the actor.
pub const COMMAND_CAPACITY: usize = 256;
/// Messages queued per topic while no subscribed peer is known.
pub const PENDING_PUBLISH_PER_TOPIC: usize = 16;
/// Topics that may hold queued messages at once.
pub const PENDING_PUBLISH_TOPICS: usize = 64;
/// How long a queued gossip message waits for a subscriber before it is dropped.
pub const PENDING_PUBLISH_TTL: Duration = Duration::from_secs(10);
/// Inbound requests awaiting the application's response at once; more are refused.
pub const MAX_PENDING_INBOUND: usize = 256;
/// Inbound requests of one peer awaiting the application's response at once: one peer cannot
/// take every slot (a tree neighbour has a few requests in flight).
pub const MAX_PENDING_INBOUND_PER_PEER: usize = 32;
/// Concurrent DHT queries and outbound requests started through the handle.
pub const MAX_PENDING_QUERIES: usize = 1024;
/// Largest gossip message (the room's tree updates and notices are small).
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// The libp2p peer id of a node: inside waterfall a peer is its [`NodeId`] (the ed25519 public
/// key); this and [`node_of`] are the only conversions, made where libp2p is called. `None` if the
/// bytes are not a valid ed25519 point.
pub fn peer_of(node: NodeId) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(&node.0).ok()?;
    Some(libp2p::identity::PublicKey::from(pk).to_peer_id())
}

/// The node inside a libp2p peer id: `None` unless the peer id inlines an ed25519 key (waterfall
/// nodes always do).
pub fn node_of(peer: &PeerId) -> Option<NodeId> {
    // Ed25519 peer ids are identity multihashes of the protobuf-encoded public key.
    let mh = libp2p::multihash::Multihash::<64>::from_bytes(&peer.to_bytes()).ok()?;
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    Some(NodeId(pk.try_into_ed25519().ok()?.to_bytes()))
}

/// What the caller's record validator extracts from a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// Identity of the signer (e.g. an ed25519 public key); only it may replace a live record.
    pub signer: Vec<u8>,
    /// Absolute expiry, unix milliseconds.
    pub expires_unix_ms: u64,
    /// Sequence number; a higher one from the same signer replaces the stored record.
    pub seq: u64,
    /// How long a node holds this record for others at most, from its arrival, whatever its
    /// signed expiry says (per kind: a signalling blob a minute, a room record a few minutes;
    /// the publisher republishes before). Bounds what a flood of long-lived records costs.
    pub hold_for: Duration,
}

/// Validates a record `(key, value)`; `Err` carries the reason it is invalid.
pub type RecordValidator = Arc<dyn Fn(&[u8], &[u8]) -> Result<RecordMeta, String> + Send + Sync>;
/// What a [`GossipValidator`] says of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GossipVerdict {
    /// Valid: delivered and forwarded.
    Accept,
    /// Not ours to judge, or late: dropped and not forwarded, but no fault of the sender (a
    /// topic we just left, a message that expired on the way or under clock skew).
    Ignore,
    /// Invalid (forged, malformed, misattributed): dropped, and the forwarder earns a strike.
    Reject,
}

/// Validates a gossip message `(topic, author, data)`.
pub type GossipValidator = Arc<dyn Fn(&str, &PeerId, &[u8]) -> GossipVerdict + Send + Sync>;

/// Configuration of one network actor.
#[derive(Clone)]
pub struct NetConfig {
    /// Node identity (an ed25519 key in waterfall; it also signs gossip).
    pub keypair: Keypair,
    /// Addresses to listen on (`/ip4/127.0.0.1/tcp/0`, `/ip4/127.0.0.1/udp/0/quic-v1` in tests).
    pub listen: Vec<Multiaddr>,
    /// Peers dialled at start (with `/p2p/<id>` they also seed the DHT routing table).
    pub bootstrap: Vec<Multiaddr>,
    /// LAN discovery by mDNS.
    pub mdns: bool,
    /// Join the public Amino DHT (`/ipfs/kad/1.0.0`) for provider records. Never in tests.
    pub public: bool,
    /// Maximum established connections.
    pub max_connections: u32,
    /// Inbound connections (pending and established) from one IP address at most: one host
    /// cannot take every slot. Generous, since a NAT puts many honest peers behind one
    /// address.
    pub max_connections_per_ip: u32,
    /// Record validator, applied to every record stored or returned.
    pub record_validator: RecordValidator,
    /// Gossip validator, applied to every received message.
    pub gossip_validator: GossipValidator,
    /// Largest inbound request accepted (larger ones fail and earn the sender a strike).
    pub max_request_bytes: usize,
    /// Largest response accepted.
    pub max_response_bytes: usize,
    /// Interval at which this node re-puts its own live records.
    pub republish_interval: Duration,
    /// How long a misbehaving peer stays blocked.
    pub ban_duration: Duration,
    /// Capacity of the [`NetEvent`] channel.
    pub event_capacity: usize,
    /// Gossipsub heartbeat (mesh maintenance) interval.
    pub gossip_heartbeat: Duration,
    /// Whether to serve circuit relay v2 for others.
    pub relay: RelayMode,
    /// Reserve a slot on relay-capable peers (bootstrap peers first) while not directly
    /// reachable.
    pub use_relays: bool,
    /// How often AutoNAT v2 tests untested address candidates.
    pub autonat_interval: Duration,
    /// Addresses known to be reachable from outside (an operator's port forwarding or public
    /// IP), confirmed at start without a test. AutoNAT v2 only asks peers this node dialled,
    /// so a public node that never dials out would otherwise stay unconfirmed.
    pub external_addrs: Vec<Multiaddr>,
}

impl NetConfig {
    /// Defaults: loopback TCP + QUIC listeners, no bootstrap, no mDNS, private DHT only.
    pub fn new(
        keypair: Keypair,
        record_validator: RecordValidator,
        gossip_validator: GossipValidator,
    ) -> Self {
        Self {
            keypair,
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .expect("valid literal multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("valid literal multiaddr"),
            ],
            bootstrap: Vec::new(),
            mdns: false,
            public: false,
            // A broadcaster is everyone's first contact in small setups: room for a crowd.
            max_connections: 1024,
            max_connections_per_ip: 128,
            record_validator,
            gossip_validator,
            max_request_bytes: 256 * 1024,
            max_response_bytes: 4 * 1024 * 1024,
            republish_interval: Duration::from_secs(10 * 60),
            ban_duration: Duration::from_secs(10 * 60),
            event_capacity: 1024,
            gossip_heartbeat: Duration::from_millis(500),
            relay: RelayMode::Off,
            use_relays: true,
            autonat_interval: Duration::from_secs(5),
            external_addrs: Vec::new(),
        }
    }
}

impl fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetConfig")
            .field("peer_id", &self.keypair.public().to_peer_id())
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("mdns", &self.mdns)
            .field("public", &self.public)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("relay", &self.relay)
            .field("use_relays", &self.use_relays)
            .finish_non_exhaustive()
    }
}

/// Errors of the network actor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("building the swarm failed: {0}")]
    Build(String),
    #[error("listening on {addr} failed: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("dial failed: {0}")]
    Dial(String),
    #[error("the network actor has stopped")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("no valid record found")]
    NotFound,
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("record of {size} bytes exceeds the limit of {max}")]
    RecordTooLarge { size: usize, max: usize },
    #[error("record expired or lifetime too long")]
    BadLifetime,
    #[error("a live record of another signer holds this key")]
    NotOwner,
    #[error("a record with the same or a higher sequence number is stored")]
    StaleRecord,
    /// The record is stored locally (and republished) but no peer acknowledged it yet.
    #[error("record stored locally only: no peer acknowledged it")]
    NotReplicated,
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("too many pending operations")]
    Busy,
    #[error("subscribe failed: {0}")]
    Subscribe(String),
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("the request to respond to is gone (timed out or peer disconnected)")]
    UnknownRequest,
    #[error("the public DHT is not enabled")]
    PublicDhtDisabled,
    #[error("providing failed: {0}")]
    Provide(String),
}

/// Result alias of this module.
pub type Result<T, E = NetError> = std::result::Result<T, E>;

/// Outcome of a successful [`Net::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Published {
    /// Handed to gossipsub for at least one peer.
    Sent,
    /// No subscribed peer yet: queued briefly ([`PENDING_PUBLISH_TTL`]) and retried when one
    /// subscribes.
    Queued,
}

/// A snapshot of the actor's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetStatus {
    /// Connected peers.
    pub peers: usize,
    /// Peers in the waterfall DHT routing table.
    pub dht_peers: usize,
    /// Records in the local DHT store (own and others').
    pub dht_records: usize,
    /// Subscribed gossip topics.
    pub topics: Vec<String>,
    /// How others can reach this node.
    pub reachability: Reachability,
    /// Confirmed external addresses (direct and relayed).
    pub external_addrs: Vec<Multiaddr>,
    /// Relays holding a slot for us.
    pub relays: Vec<PeerId>,
    /// Whether this node currently accepts relay reservations.
    pub relay_serving: bool,
}

/// What happens on the network, delivered on the receiver returned by [`Net::spawn`].
#[derive(Debug)]
#[non_exhaustive]
pub enum NetEvent {
    /// A validated gossip message (never our own).
    Gossip {
        topic: String,
        from: PeerId,
        data: Vec<u8>,
    },
    /// An inbound request; answer with [`ResponseHandle::respond`] or [`Net::respond`].
    Request {
        from: PeerId,
        data: Vec<u8>,
        reply: ResponseHandle,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
    /// Peers found by mDNS.
    Discovered(PeerId, Vec<Multiaddr>),
    Listening(Multiaddr),
}

/// The way to answer one inbound request. Dropping it unanswered frees the request's slot at
/// once and the request fails at the requester; the handle does not keep the actor alive.
pub struct ResponseHandle {
    id: u64,
    peer: PeerId,
    cmd: mpsc::WeakSender<actor::Command>,
    /// Answered (or handed to [`Net::respond`]): nothing to release on drop.
    done: bool,
}

impl Drop for ResponseHandle {
    fn drop(&mut self) {
        if !self.done
            && let Some(cmd) = self.cmd.upgrade()
        {
            // Best effort: when the queue is full the slot is freed by the actor's timeout.
            let _ = cmd.try_send(actor::Command::Forget { id: self.id });
        }
    }
}

impl fmt::Debug for ResponseHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseHandle")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .finish()
    }
}

impl ResponseHandle {
    /// The peer that sent the request.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Send `data` as the response.
    pub async fn respond(mut self, data: Vec<u8>) -> Result<()> {
        self.done = true;
        let cmd = self.cmd.upgrade().ok_or(NetError::Closed)?;
        let (tx, rx) = oneshot::channel();
        cmd.send(actor::Command::Respond {
            id: self.id,
            data,
            reply: tx,
        })
        .await
        .map_err(|_| NetError::Closed)?;
        rx.await.map_err(|_| NetError::Closed)?
    }
}

/// Cheap, cloneable handle to the network actor.
#[derive(Clone, Debug)]
pub struct Net {
    cmd: mpsc::Sender<actor::Command>,
    local_peer_id: PeerId,
    notices: tokio::sync::broadcast::Sender<NetNotice>,
    /// A receiver subscribed at spawn, handed to the first caller of [`Net::notices`]: what
    /// happens while the node starts (a bootstrap failure) must not be lost.
    first_notices: Arc<std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<NetNotice>>>>,
    /// The actor's [`Net::addrs`], kept current (see [`Net::addrs_watch`]).
    addrs: tokio::sync::watch::Receiver<Vec<Multiaddr>>,
}

/// How long [`Net::spawn`] waits for the listeners to report their addresses.
const LISTEN_WAIT: Duration = Duration::from_secs(5);

impl Net {
    /// Build the swarm, start listening and dialling the bootstrap peers, and spawn the actor on
    /// the current tokio runtime. Returns once every listener reported an address (or after
    /// a few seconds).
    pub async fn spawn(config: NetConfig) -> Result<(Net, mpsc::Receiver<NetEvent>)> {
        let local_peer_id = config.keypair.public().to_peer_id();
        let listeners = config.listen.len();
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (ev_tx, ev_rx) = mpsc::channel(config.event_capacity.max(1));
        let (notices, first_notices) = tokio::sync::broadcast::channel(NOTICE_CAPACITY);
        let actor = actor::Actor::new(config, cmd_rx, cmd_tx.downgrade(), ev_tx, notices.clone())?;
        let addrs = actor.addrs_watch();
        // Instrumented, not entered: a span guard held across awaits would tag other tasks
        // running on the same worker thread with this node's span.
        let span = actor.span();
        tokio::spawn(tracing::Instrument::instrument(actor.run(), span));
        let net = Net {
            cmd: cmd_tx,
            local_peer_id,
            notices,
            first_notices: Arc::new(std::sync::Mutex::new(Some(first_notices))),
            addrs,
        };
        let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
        while net.listen_addrs().await?.len() < listeners && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((net, ev_rx))
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> actor::Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(make(tx))
            .await
            .map_err(|_| NetError::Closed)?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// A DHT lookup: the actor hands back at once a receiver that is answered when the query
    /// ends. The actor enforces `timeout` (with its tick's granularity); the margin here only
    /// guards against a wedged actor.
    async fn lookup<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(oneshot::Sender<oneshot::Receiver<Result<T>>>) -> actor::Command,
    ) -> Result<T> {
        let rx = self.call(make).await?;
        match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
            Ok(r) => r.map_err(|_| NetError::Closed)?,
            Err(_) => Err(NetError::Timeout),
        }
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Addresses the listeners are bound to.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.call(actor::Command::ListenAddrs).await
    }

    /// Addresses others can dial, best first: confirmed direct external addresses, relayed
    /// `/p2p-circuit` addresses, then listen addresses (loopback ones only when there is
    /// nothing else). Without `/p2p/<own id>`.
    pub async fn addrs(&self) -> Result<Vec<Multiaddr>> {
        self.call(actor::Command::Addrs).await
    }

    /// [`Net::addrs`] as a watch: `changed()` fires when the addresses others can dial change
    /// (an address confirmed or expired, a relay reservation made or lost, a listener opened
    /// or closed). A broadcaster republishes its room record and ticket on it.
    pub fn addrs_watch(&self) -> tokio::sync::watch::Receiver<Vec<Multiaddr>> {
        self.addrs.clone()
    }

    /// Connectivity notices (see [`NetNotice`]): the first caller gets them from the node's
    /// start, later callers from now on; a lagging receiver loses the oldest.
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<NetNotice> {
        self.first_notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| self.notices.subscribe())
    }

    /// Wait until this node knows how it is reachable (publicly, or through a relay), at most
    /// `timeout`; returns the reachability then. A broadcaster waits before printing its
    /// ticket, so that the ticket carries addresses a remote viewer can dial.
    pub async fn settle(&self, timeout: Duration) -> Result<Reachability> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.status().await?.reachability;
            if matches!(r, Reachability::Public | Reachability::Relayed)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Dial `addr` and wait until the connection is established; returns the remote peer id.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId> {
        self.call(|reply| actor::Command::Dial { addr, reply })
            .await?
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        self.call(actor::Command::ConnectedPeers).await
    }

    /// Validate and store a record locally, then put it to the DHT (quorum one) and republish it
    /// every [`NetConfig::republish_interval`] while it is live.
    ///
    /// Returns [`NetError::NotReplicated`] when no peer acknowledged the put (e.g. no peers yet):
    /// the record is then kept locally, served to peers that ask and republished later. Note that
    /// a remote acknowledgement only means the peer received it: waterfall peers validate before
    /// storing and silently drop what they refuse.
    pub async fn put_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.call(|reply| actor::Command::PutRecord { key, value, reply })
            .await?
    }

    /// Fetch every valid copy of the record under `key` (local store and network), distinct
    /// values sorted by descending sequence number. When this node published a live copy of
    /// its own, copies by other signers are dropped (it owns the key); otherwise all valid
    /// copies are returned, whoever signed them (a copy this node holds for others may be a
    /// squatter's), and the caller must pin the signer it expects. After the first valid
    /// copy arrives the lookup collects for at most one more second (an unreachable peer would
    /// otherwise hold the query until Kademlia's own timeout). [`NetError::NotFound`] when the lookup
    /// finished without a valid record, [`NetError::Timeout`] when `timeout` passed first.
    pub async fn get_record(&self, key: Vec<u8>, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        self.lookup(timeout, |reply| actor::Command::GetRecord {
            key,
            timeout,
            reply,
        })
        .await
    }

    /// Remove one of our own records locally and stop republishing it (copies elsewhere expire).
    /// Returns whether a record was removed.
    pub async fn remove_record(&self, key: Vec<u8>) -> Result<bool> {
        self.call(|reply| actor::Command::RemoveRecord { key, reply })
            .await
    }

    /// Join a gossip topic. Returns false if already subscribed.
    pub async fn subscribe(&self, topic: String) -> Result<bool> {
        self.call(|reply| actor::Command::Subscribe { topic, reply })
            .await?
    }

    /// Leave a gossip topic. Returns false if not subscribed.
    pub async fn unsubscribe(&self, topic: String) -> Result<bool> {
        self.call(|reply| actor::Command::Unsubscribe { topic, reply })
            .await
    }

    /// Publish `data` on `topic` (signed with the node key). Queued briefly when no subscribed
    /// peer is known yet.
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<Published> {
        self.call(|reply| actor::Command::Publish { topic, data, reply })
            .await?
    }

    /// Send a request to `peer` and wait for its response.
    pub async fn request(&self, peer: PeerId, data: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
        let rx = self
            .call(|reply| actor::Command::Request { peer, data, reply })
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(r) => r.map_err(|_| NetError::Closed)?,
            Err(_) => Err(NetError::Timeout),
        }
    }

    /// Answer an inbound request (same as [`ResponseHandle::respond`]).
    pub async fn respond(&self, mut reply: ResponseHandle, data: Vec<u8>) -> Result<()> {
        reply.done = true;
        let id = reply.id;
        self.call(|reply| actor::Command::Respond { id, data, reply })
            .await?
    }

    /// Keep announcing this node as a provider of `key` on the public DHT (needs
    /// [`NetConfig::public`]), under the sha2-256 multihash of `key` as Amino nodes expect:
    /// once the routing table has peers, again when our confirmed addresses change (provider
    /// records carry them), and every few minutes, until [`Net::stop_providing_public`].
    /// Returns once registered; failures of the announcements are [`NetNotice`]s.
    pub async fn provide_public(&self, key: Vec<u8>) -> Result<()> {
        self.call(|reply| actor::Command::ProvidePublic { key, reply })
            .await?
    }

    /// Stop announcing `key`; returns whether it was provided.
    pub async fn stop_providing_public(&self, key: Vec<u8>) -> Result<bool> {
        self.call(|reply| actor::Command::StopProvidingPublic { key, reply })
            .await
    }

    /// Find providers of `key` on the public DHT and start dialling them (their records'
    /// addresses are usable only while the lookup runs). [`NetError::NotFound`] when none.
    pub async fn find_providers_public(
        &self,
        key: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<PeerId>> {
        self.lookup(timeout, |reply| actor::Command::FindProviders {
            key,
            timeout,
            reply,
        })
        .await
    }

    pub async fn status(&self) -> Result<NetStatus> {
        self.call(actor::Command::Status).await
    }

    /// Stop the actor now (other handles then get [`NetError::Closed`]).
    pub async fn shutdown(&self) {
        let _ = self.cmd.send(actor::Command::Shutdown).await;
    }
}
