//! The embedding API: [`NodeBuilder`] -> [`Node`] -> rooms.
//!
//! A [`Node`] is a cheap `Clone` handle over one network actor ([`crate::net`]) and a dispatcher
//! task that routes what the swarm delivers (gossip, requests, peer events) to the rooms this node
//! is in. Each room runs as its own task ([`room`]) that owns the room's state machines (the room
//! layer over the tree, [`crate::proto::room`]) and its media session ([`crate::media`]) and talks
//! to the network only through the node. Inside, a peer is a [`NodeId`]; libp2p's `PeerId` appears
//! only where libp2p is called and in the application's events. Dropping the last `Node` (and
//! every room handle) stops everything.
//!
//! Finding a room: the room record is sealed with the room's seal key, signed by the broadcaster
//! and stored in the waterfall DHT under the room's *locator*, which only someone with the
//! password can compute. A viewer with the right password finds and opens it; with a ticket it can
//! tell a wrong password (the ticket's check does not match) from a room that is gone.

pub(crate) mod addrs;
pub mod datadir;
pub(crate) mod netwatch;
pub mod records;
pub mod room;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use crate::crypto::{CryptoError, Identity, KdfParams, Kind, RoomKeys, now_ms};
use crate::media::MediaConfig;
use crate::media::peer::IceConfigError;
use crate::net::{Net, NetConfig, NetError, NetEvent, RelayMode};
use crate::proto::NodeId;
use crate::wire::{self, Envelope, RoomId, RoomRecord, Ticket, WireError};

pub use addrs::ADDR_REPUBLISH_MIN;
pub use room::{
    Broadcast, RoomConfig, RoomEvent, RoomEvents, RoomStatus, Watch, WatchConfig, WatchTarget,
};

/// How long a room record says the broadcast is live; the broadcaster refreshes it well before.
pub const ROOM_LIVENESS: Duration = Duration::from_secs(120);
/// How often the broadcaster refreshes its room record (and at once, at most every
/// [`ADDR_REPUBLISH_MIN`], when its addresses change).
pub const ROOM_REFRESH: Duration = Duration::from_secs(40);
/// How long the envelope of a room record stays storable in the DHT (after the broadcast ended,
/// so that viewers can still be told "ended" rather than "not found").
pub const ROOM_RECORD_TTL: Duration = Duration::from_secs(3600);
/// How long the broadcaster named by a ticket may take to hand over its record directly.
pub const DIRECT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a lookup of a room record may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(8);
/// Offers this node answers at once (each builds a peer connection and gathers ICE); more are
/// refused as busy and the child tries again or elsewhere.
pub const MAX_CONCURRENT_OFFERS: usize = 16;
/// Rooms whose broadcaster this node remembers (pinned by a ticket or an earlier lookup);
/// the oldest pin is forgotten first.
pub const MAX_PINS: usize = 256;

/// The key every waterfall node provides on the public DHT (`--public`), so that waterfall nodes
/// can find each other among the IPFS peers. Only provider records go there, never values.
pub const PUBLIC_NODES_KEY: &[u8] = b"/waterfall/v1/nodes";
/// The Amino DHT's bootstrap peers (as kubo and helia list them; the `/dnsaddr` ones resolve
/// through DNS), used with `--public` and no `--bootstrap`.
pub const PUBLIC_BOOTSTRAP: &[&str] = &[
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb",
    "/dnsaddr/bootstrap.libp2p.io/p2p/QmcZf59bWwK5XFi76CZX8cbJ4BhTzzA3gU1ZjYZcYW3dwt",
    "/ip4/104.131.131.82/tcp/4001/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ",
    "/ip4/104.131.131.82/udp/4001/quic-v1/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ",
];

/// Errors of the node API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The password does not match the room named by the ticket.
    #[error("wrong password for room {room:?}")]
    WrongPassword { room: String },
    /// No record for this room name and password.
    #[error("room {room:?} not found: no live broadcast with this name and password is reachable")]
    RoomNotFound { room: String },
    /// The record exists but the broadcast ended.
    #[error("room {room:?} has ended (its record expired {ago_s} s ago)")]
    RoomExpired { room: String, ago_s: u64 },
    /// A record under the room's locator failed verification (forged or tampered).
    #[error("room record for {room:?} is invalid: {source}")]
    TamperedRecord {
        room: String,
        #[source]
        source: RecordError,
    },
    /// The ticket pins a broadcaster but the record is signed by someone else.
    #[error("room record for {room:?} is signed by {found}, but the ticket names {expected}")]
    WrongBroadcaster {
        room: String,
        expected: String,
        found: String,
    },
    /// A network error.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// The media session failed (creating a broadcast, sending data).
    #[error("media: {0}")]
    Session(#[from] crate::media::SessionError),
    /// A crypto error.
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// A wire error.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// Already in this room.
    #[error("already in room {0:?}")]
    AlreadyJoined(String),
    /// The operation did not finish in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The node or room has stopped.
    #[error("the node has stopped")]
    Closed,
    /// The data directory could not be claimed.
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    /// An unusable STUN/TURN server in the media configuration.
    #[error(transparent)]
    IceConfig(#[from] IceConfigError),
}

/// Builds a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    mdns: bool,
    public: bool,
    data_dir: Option<PathBuf>,
    identity: Option<Identity>,
    kdf: KdfParams,
    media: MediaConfig,
    max_children: Option<u16>,
    inline_signalling: bool,
    max_connections: Option<u32>,
    max_connections_per_ip: Option<u32>,
    relay: RelayMode,
    external_addrs: Vec<Multiaddr>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".parse().expect("literal multiaddr"),
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("literal multiaddr"),
            ],
            bootstrap: Vec::new(),
            mdns: false,
            public: false,
            data_dir: None,
            identity: None,
            kdf: KdfParams::STRONG,
            media: MediaConfig::default(),
            max_children: None,
            inline_signalling: true,
            max_connections: None,
            max_connections_per_ip: None,
            relay: RelayMode::Off,
            external_addrs: Vec::new(),
        }
    }
}

impl NodeBuilder {
    /// Listen addresses (default: loopback TCP and QUIC on random ports).
    pub fn listen(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.listen = addrs;
        self
    }
    /// Peers to dial at start.
    pub fn bootstrap(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.bootstrap = addrs;
        self
    }
    /// LAN discovery by mDNS.
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }
    /// Join the public DHT (opt-in; never in tests).
    pub fn public(mut self, on: bool) -> Self {
        self.public = on;
        self
    }
    /// Data directory (identity key), locked for the node's lifetime ([`datadir`]): when another
    /// process holds it, the node runs with a fresh random identity (and logs a warning).
    /// Without one, and without [`NodeBuilder::identity`], the node has a fresh random identity.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }
    /// A given identity.
    pub fn identity(mut self, id: Identity) -> Self {
        self.identity = Some(id);
        self
    }
    /// Room key derivation cost (default [`KdfParams::STRONG`]).
    pub fn kdf(mut self, params: KdfParams) -> Self {
        self.kdf = params;
        self
    }
    /// WebRTC settings.
    pub fn media(mut self, config: MediaConfig) -> Self {
        self.media = config;
        self
    }
    /// Children this node relays to at most (default: the room's fanout).
    pub fn max_children(mut self, n: u16) -> Self {
        self.max_children = Some(n);
        self
    }

    /// Carry WebRTC offers and answers in direct requests (the fast path; default). When off,
    /// they travel only through the DHT with a notice on the room topic — the path a node uses
    /// when it cannot reach its parent directly.
    pub fn inline_signalling(mut self, on: bool) -> Self {
        self.inline_signalling = on;
        self
    }

    /// Serve circuit relay v2 for peers behind NATs (default off; `Auto` serves once this
    /// node is confirmed reachable).
    pub fn relay(mut self, mode: RelayMode) -> Self {
        self.relay = mode;
        self
    }

    /// Addresses known to be reachable from outside (port forwarding, a public IP): advertised
    /// at once, without waiting for AutoNAT.
    pub fn external_addrs(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.external_addrs = addrs;
        self
    }

    /// Established connections at most (default 1024).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Inbound connections from one IP address at most (default 128; see
    /// [`NetConfig::max_connections_per_ip`]).
    pub fn max_connections_per_ip(mut self, n: u32) -> Self {
        self.max_connections_per_ip = Some(n);
        self
    }

    /// Start the node.
    pub async fn spawn(self) -> Result<Node, NodeError> {
        self.media.validate()?;
        let mut held_dir = None;
        let identity = match (self.identity, &self.data_dir) {
            (Some(id), _) => id,
            (None, Some(dir)) => match datadir::DataDir::claim(dir)? {
                datadir::Claim::Held(d) => held_dir.insert(d).identity()?,
                datadir::Claim::InUse { path, holder } => {
                    tracing::warn!(
                        "data directory {} is in use by another process ({holder:?}); \
                         this node runs with a temporary identity",
                        path.display()
                    );
                    Identity::generate()
                }
            },
            (None, None) => Identity::generate(),
        };
        let topics = records::TopicKeys::default();
        let mut config = NetConfig::new(
            identity.to_libp2p(),
            Arc::new(records::validate_record),
            topics.validator(),
        );
        config.listen = self.listen;
        config.bootstrap = self.bootstrap;
        if self.public && config.bootstrap.is_empty() {
            config.bootstrap = PUBLIC_BOOTSTRAP
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
        }
        config.mdns = self.mdns;
        config.public = self.public;
        config.relay = self.relay;
        config.external_addrs = self.external_addrs;
        if let Some(n) = self.max_connections {
            config.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_ip {
            config.max_connections_per_ip = n;
        }
        let (net, events) = Net::spawn(config).await?;
        let rooms = room::Rooms::default();
        let interfaces = netwatch::Interfaces::watch(self.media.bind_ip());
        let inner = Arc::new(Inner {
            interfaces,
            net: net.clone(),
            identity,
            topics,
            rooms: rooms.clone(),
            kdf: self.kdf,
            media: self.media,
            max_children: self.max_children,
            public: self.public,
            inline_signalling: self.inline_signalling,
            dispatcher: Mutex::new(None),
            offer_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_OFFERS),
            pins: Mutex::new(Vec::new()),
            last_seq: std::sync::atomic::AtomicU64::new(0),
            _data_dir: held_dir,
        });
        if self.public {
            let net = net.clone();
            tokio::spawn(async move {
                if let Err(e) = net.provide_public(PUBLIC_NODES_KEY.to_vec()).await {
                    tracing::warn!("providing on the public DHT failed: {e}");
                }
            });
        }
        let task = tokio::spawn(dispatch(events, rooms));
        *inner.dispatcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(Node { inner })
    }
}

pub(crate) struct Inner {
    pub(crate) net: Net,
    /// This host's addresses: a change restarts ICE on the rooms' media connections.
    pub(crate) interfaces: netwatch::Interfaces,
    pub(crate) identity: Identity,
    pub(crate) topics: records::TopicKeys,
    pub(crate) rooms: room::Rooms,
    pub(crate) kdf: KdfParams,
    pub(crate) media: MediaConfig,
    pub(crate) max_children: Option<u16>,
    pub(crate) public: bool,
    pub(crate) inline_signalling: bool,
    dispatcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Slots for offers being answered ([`MAX_CONCURRENT_OFFERS`]).
    pub(crate) offer_slots: tokio::sync::Semaphore,
    /// Broadcaster pinned per room locator, oldest first (see [`Node::lookup_room_claims`]).
    pins: Mutex<Vec<([u8; 32], NodeId)>>,
    /// The last sequence number this node signed a room record with (see [`next_seq`]).
    last_seq: std::sync::atomic::AtomicU64,
    /// The locked data directory, released when the node stops.
    _data_dir: Option<datadir::DataDir>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self
            .dispatcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// A running waterfall node. Clone it freely; the last drop stops it.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.peer_id())
    }
}

/// Routes swarm events to rooms. Runs until the network actor's event channel closes.
async fn dispatch(mut events: mpsc::Receiver<NetEvent>, rooms: room::Rooms) {
    while let Some(ev) = events.recv().await {
        match ev {
            NetEvent::Gossip { topic, from, data } => rooms.gossip(&topic, from, data),
            NetEvent::Request { from, data, reply } => rooms.request(from, data, reply).await,
            NetEvent::PeerDisconnected(peer) => rooms.peer_gone(peer),
            NetEvent::Discovered(peer, addrs) => {
                tracing::debug!(%peer, ?addrs, "discovered");
            }
            _ => {}
        }
    }
}

impl Node {
    /// A builder with loopback defaults.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.net.local_peer_id()
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The network handle (for status and advanced use).
    pub fn net(&self) -> &Net {
        &self.inner.net
    }

    /// Addresses others can dial, best first (confirmed external, relayed, then listen
    /// addresses; see [`Net::addrs`]), with `/p2p/<peer id>` appended. Room records and tickets
    /// carry these.
    pub async fn addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        let me = self.peer_id();
        Ok(self
            .inner
            .net
            .addrs()
            .await?
            .into_iter()
            .map(|a| a.with_p2p(me).unwrap_or_else(|a| a))
            .collect())
    }

    /// The ticket of a room this node broadcasts, with its current addresses (the ticket a
    /// [`Broadcast`] was created with carries the addresses of that moment;
    /// [`RoomEvent::TicketChanged`] tells when they changed).
    pub async fn ticket(&self, keys: &RoomKeys) -> Result<Ticket, NodeError> {
        Ok(Ticket {
            v: wire::VERSION,
            room: keys.name().to_owned(),
            broadcaster: self.inner.identity.node_id(),
            addrs: self.addrs().await?.iter().map(|a| a.to_string()).collect(),
            check: ticket_check(keys),
        })
    }

    /// Dial a peer.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NodeError> {
        Ok(self.inner.net.dial(addr).await?)
    }

    /// Derive a room's keys (Argon2id runs on a blocking thread).
    pub async fn room_keys(
        &self,
        room: &str,
        password: Option<&str>,
    ) -> Result<RoomKeys, NodeError> {
        let (room, password, kdf) = (room.to_owned(), password.map(str::to_owned), self.inner.kdf);
        tokio::task::spawn_blocking(move || RoomKeys::derive(&room, password.as_deref(), kdf))
            .await
            .map_err(|_| NodeError::Closed)?
            .map_err(NodeError::from)
    }

    /// Seal and sign a room record, store it under the room's locator; returns the envelope.
    pub(crate) async fn publish_record(
        &self,
        keys: &RoomKeys,
        record: &RoomRecord,
    ) -> Result<Envelope, NodeError> {
        // Our addresses change as AutoNAT confirms them or relays take us in: every refresh
        // carries the current ones.
        let mut record = record.clone();
        if record.broadcaster == self.inner.identity.node_id() {
            record.addrs = self.addrs().await?.iter().map(|a| a.to_string()).collect();
        }
        if self.inner.public {
            // Room members find the broadcaster among the providers of the room's key while
            // the room lives (see `lookup_room`).
            let key = public_room_key(keys);
            let r = if record.expires_ms > now_ms() {
                self.inner.net.provide_public(key).await
            } else {
                self.inner.net.stop_providing_public(key).await.map(|_| ())
            };
            if let Err(e) = r {
                tracing::warn!("public DHT: providing the room failed: {e}");
            }
        }
        // The sequence follows the wall clock, so a restarted broadcaster's record replaces the
        // one it signed in an earlier run (a counter would restart at 1 and be refused as stale).
        record.seq = next_seq(&self.inner.last_seq, now_ms());
        if record.broadcaster == self.inner.identity.node_id() {
            self.pin(keys, record.broadcaster);
        }
        let record = &record;
        let sealed = keys.seal(Kind::RoomRecord, &wire::encode(record));
        let env = self.inner.identity.seal_envelope(
            Kind::RoomRecord,
            record.seq,
            now_ms() + ROOM_RECORD_TTL.as_millis() as u64,
            sealed,
        );
        match self
            .inner
            .net
            .put_record(keys.locator().to_vec(), wire::encode(&env))
            .await
        {
            // Alone on the network is fine for a broadcaster: the record is served from here
            // and replicated when peers arrive.
            Ok(()) | Err(NetError::NotReplicated) => Ok(env),
            Err(e) => Err(e.into()),
        }
    }

    /// Ask a broadcaster for its room record directly (the request proves we hold the room key;
    /// the answer is the same signed, sealed envelope the DHT stores).
    async fn fetch_record_direct(&self, keys: &RoomKeys, broadcaster: NodeId) -> Option<Vec<u8>> {
        let peer = crate::net::peer_of(broadcaster)?;
        self.fetch_record_from(keys, peer).await
    }

    /// The public DHT path of a lookup by name: the providers of the room's key, asked for the
    /// record directly (they are dialled as the lookup finds them). Every candidate is
    /// returned; `lookup_room` verifies them like DHT copies.
    async fn lookup_via_providers(&self, keys: &RoomKeys) -> Result<Vec<Vec<u8>>, NetError> {
        let providers = self
            .inner
            .net
            .find_providers_public(public_room_key(keys), LOOKUP_TIMEOUT)
            .await?;
        let mut found = Vec::new();
        for peer in providers {
            if let Some(v) = self.fetch_record_from(keys, peer).await {
                found.push(v);
            }
        }
        if found.is_empty() {
            Err(NetError::NotFound)
        } else {
            Ok(found)
        }
    }

    async fn fetch_record_from(&self, keys: &RoomKeys, peer: PeerId) -> Option<Vec<u8>> {
        let env = self.inner.identity.seal_envelope(
            Kind::RoomRecord,
            now_ms(),
            now_ms() + 30_000,
            keys.seal(Kind::RoomRecord, b"record?"),
        );
        let req = wire::encode(&wire::RoomRequest {
            v: wire::VERSION,
            room: RoomId(*keys.locator()),
            env,
        });
        let resp = self
            .inner
            .net
            .request(peer, req, DIRECT_LOOKUP_TIMEOUT)
            .await
            .ok()?;
        let resp: wire::RoomResponse = wire::decode(&resp).ok()?;
        resp.env.map(|e| wire::encode(&e))
    }

    /// Find and open a room record. `ticket` pins the broadcaster and tells a wrong password
    /// from an unknown room. See [`Node::lookup_room_claims`]; a contested name is logged.
    pub async fn lookup_room(
        &self,
        keys: &RoomKeys,
        ticket: Option<&Ticket>,
    ) -> Result<RoomRecord, NodeError> {
        let found = self.lookup_room_claims(keys, ticket).await?;
        if let Some(c) = &found.contest {
            tracing::warn!("{c}");
        }
        Ok(found.record)
    }

    /// Find and open a room record, telling whether several signers claim the name.
    ///
    /// Anyone with the password can sign a record under the room's locator, so a lookup by
    /// name may find several claimants. The choice: the broadcaster `ticket` names (others'
    /// records are refused), else the one this node pinned earlier (a ticket it used, a
    /// broadcast of its own, or the only claimant of an earlier lookup), else the freshest
    /// record (highest sequence, which follows the signer's clock). The chosen broadcaster is
    /// pinned for later lookups by name. [`RoomLookup::contest`] names every claimant when
    /// there was more than one.
    pub async fn lookup_room_claims(
        &self,
        keys: &RoomKeys,
        ticket: Option<&Ticket>,
    ) -> Result<RoomLookup, NodeError> {
        let room = keys.name().to_owned();
        if let Some(t) = ticket {
            if t.check != ticket_check(keys) {
                return Err(NodeError::WrongPassword { room });
            }
            // Best effort: the DHT lookup below tells whether it mattered. Concurrent and
            // bounded, and only addresses of the broadcaster the ticket names.
            if let Some(peer) = crate::net::peer_of(t.broadcaster) {
                addrs::dial_all(&self.inner.net, &t.addrs, peer).await;
            }
        }
        // A ticket holder asks the pinned broadcaster first; the DHT is the general path.
        let direct = match ticket {
            Some(t) => self.fetch_record_direct(keys, t.broadcaster).await,
            None => None,
        };
        let looked_up = match direct {
            Some(v) => Ok(vec![v]),
            None => {
                self.inner
                    .net
                    .get_record(keys.locator().to_vec(), LOOKUP_TIMEOUT)
                    .await
            }
        };
        // Nodes that share only public DHT peers have no waterfall DHT in common: look for the
        // broadcaster among the providers of the room's key.
        let looked_up = match looked_up {
            Err(NetError::NotFound | NetError::Timeout) if self.inner.public => {
                self.lookup_via_providers(keys).await
            }
            other => other,
        };
        let values = match looked_up {
            Ok(v) => v,
            Err(NetError::NotFound) | Err(NetError::Timeout) => {
                return Err(NodeError::RoomNotFound { room });
            }
            Err(e) => return Err(e.into()),
        };
        let now = now_ms();
        // The freshest record of each claimant.
        let mut claims: Vec<(Envelope, RoomRecord)> = Vec::new();
        let mut last_err = None;
        for v in values {
            match open_record(keys, &v, now) {
                Ok((env, rec)) => {
                    if let Some(t) = ticket
                        && rec.broadcaster != t.broadcaster
                    {
                        last_err = Some(NodeError::WrongBroadcaster {
                            room: room.clone(),
                            expected: short(&t.broadcaster),
                            found: short(&rec.broadcaster),
                        });
                        continue;
                    }
                    match claims.iter_mut().find(|(e, _)| e.signer == env.signer) {
                        Some(c) if env.seq > c.0.seq => *c = (env, rec),
                        Some(_) => {}
                        None => claims.push((env, rec)),
                    }
                }
                Err(source) => {
                    last_err = Some(NodeError::TamperedRecord {
                        room: room.clone(),
                        source,
                    })
                }
            }
        }
        let pinned = ticket.map(|t| t.broadcaster).or_else(|| self.pinned(keys));
        let chosen = pinned
            .and_then(|p| claims.iter().position(|(e, _)| e.signer == p))
            .or_else(|| (0..claims.len()).max_by_key(|&i| claims[i].0.seq));
        let Some(i) = chosen else {
            return Err(last_err.unwrap_or(NodeError::RoomNotFound { room }));
        };
        let rec = claims[i].1.clone();
        let contest = (claims.len() > 1).then(|| NameContest {
            room: room.clone(),
            claimants: claims
                .iter()
                .filter_map(|(e, _)| crate::net::peer_of(e.signer))
                .collect(),
            chosen: crate::net::peer_of(rec.broadcaster),
            pinned: pinned == Some(rec.broadcaster),
        });
        if rec.expires_ms <= now {
            return Err(NodeError::RoomExpired {
                room,
                ago_s: (now - rec.expires_ms) / 1000,
            });
        }
        // Trust on first use: a name looked up with a ticket, or with one claimant, keeps
        // that broadcaster for later lookups; a contested name keeps an existing pin only.
        if ticket.is_some() || claims.len() == 1 {
            self.pin(keys, rec.broadcaster);
        }
        Ok(RoomLookup {
            record: rec,
            contest,
        })
    }

    /// The broadcaster pinned for this room, if any.
    fn pinned(&self, keys: &RoomKeys) -> Option<NodeId> {
        let pins = self.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.iter()
            .find(|(l, _)| l == keys.locator())
            .map(|(_, b)| *b)
    }

    /// Pin `broadcaster` for this room (the newest pin of a room replaces its older one).
    fn pin(&self, keys: &RoomKeys, broadcaster: NodeId) {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.retain(|(l, _)| l != keys.locator());
        if pins.len() >= MAX_PINS {
            pins.remove(0);
        }
        pins.push((*keys.locator(), broadcaster));
    }

    /// Whether the broadcast `session` (its record's creation time) of `broadcaster` is still
    /// live, as far as its record tells: a reachable broadcaster answers with its current record;
    /// only when it does not, the DHT's copy counts. Ended means the record says so (it expired:
    /// a leaving broadcaster republishes it expired) or a newer broadcast replaced it; a record
    /// nobody can find counts as live (the tree's repair goes on).
    pub(crate) async fn broadcast_live(
        &self,
        keys: &RoomKeys,
        broadcaster: NodeId,
        session: u64,
    ) -> bool {
        let now = now_ms();
        if let Some(bytes) = self.fetch_record_direct(keys, broadcaster).await
            && let Ok((_, rec)) = open_record(keys, &bytes, now)
            && rec.broadcaster == broadcaster
        {
            return rec.created_ms == session && rec.expires_ms > now;
        }
        match self.lookup_room(keys, None).await {
            Ok(rec) => rec.broadcaster != broadcaster || rec.created_ms <= session,
            Err(NodeError::RoomExpired { .. }) => false,
            Err(e) => {
                tracing::debug!("room record check: {e}");
                true
            }
        }
    }

    /// Stop abruptly, telling no peer: for tests of crash repair. Room tasks are aborted (their
    /// WebRTC connections dropped) and the swarm is closed without any leave message.
    #[doc(hidden)]
    pub async fn crash(&self) {
        self.inner.rooms.abort_all();
        self.inner.net.shutdown().await;
    }

    /// Stop the node: leave every room, close the swarm.
    pub async fn shutdown(&self) {
        self.inner.rooms.shutdown_all().await;
        self.inner.net.shutdown().await;
    }
}

/// The next sequence number of a room record: the wall clock in ms, and always above the last
/// one this node used (two records within a millisecond, or a clock stepped back).
fn next_seq(last: &std::sync::atomic::AtomicU64, now_ms: u64) -> u64 {
    use std::sync::atomic::Ordering;
    let prev = last
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
            Some(now_ms.max(l.saturating_add(1)))
        })
        .unwrap_or_else(|l| l);
    now_ms.max(prev.saturating_add(1))
}

/// What [`Node::lookup_room_claims`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RoomLookup {
    /// The chosen record.
    pub record: RoomRecord,
    /// Set when several signers claim the room's name.
    pub contest: Option<NameContest>,
}

/// Several signers hold valid records under one room name and password: a member squatting
/// the name, or two broadcasts sharing name and password.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NameContest {
    /// The room's name.
    pub room: String,
    /// Every signer with a valid record, the chosen one included.
    pub claimants: Vec<PeerId>,
    /// The broadcaster chosen (`None` only if its key is not a valid peer id).
    pub chosen: Option<PeerId>,
    /// Whether it was chosen because a ticket or an earlier session pinned it (else: the
    /// freshest record won, which a squatter can also claim).
    pub pinned: bool,
}

impl std::fmt::Display for NameContest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} signers claim room {:?}; chose {} ({})",
            self.claimants.len(),
            self.room,
            self.chosen
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into()),
            if self.pinned {
                "pinned by a ticket or an earlier session"
            } else {
                "freshest record, nothing pinned: use a ticket to be sure"
            }
        )
    }
}

fn short(id: &NodeId) -> String {
    crate::net::peer_of(*id)
        .map(|p| p.to_string())
        .unwrap_or_else(|| hex::encode(id.0))
}

/// Why a room record did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The envelope or the record inside does not decode.
    #[error("malformed: {0}")]
    Malformed(#[from] WireError),
    /// The signature, kind or expiry of the envelope is wrong, or the seal does not open.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// The envelope's signer is not the broadcaster the record names.
    #[error("signed by someone other than its broadcaster")]
    WrongSigner,
}

/// Verify and open one room-record envelope.
fn open_record(
    keys: &RoomKeys,
    bytes: &[u8],
    now: u64,
) -> Result<(Envelope, RoomRecord), RecordError> {
    let env: Envelope = wire::decode(bytes)?;
    env.verify_kind(Kind::RoomRecord, now)?;
    let plain = keys.open(Kind::RoomRecord, &env.payload)?;
    let rec: RoomRecord = wire::decode(&plain)?;
    if rec.broadcaster != env.signer {
        return Err(RecordError::WrongSigner);
    }
    Ok((env, rec))
}

/// What a broadcaster provides on the public DHT for its room (the net layer announces its
/// sha2-256 multihash). Derived from the locator: only who knows name and password can
/// compute it, and it says nothing more about the room than the locator does.
fn public_room_key(keys: &RoomKeys) -> Vec<u8> {
    let mut k = b"/waterfall/v1/room/".to_vec();
    k.extend_from_slice(keys.locator());
    k
}

/// The 8-byte password check a ticket carries.
pub fn ticket_check(keys: &RoomKeys) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(keys.locator())[..8].to_vec()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::next_seq;

    #[test]
    fn record_sequence_follows_the_clock_and_never_goes_back() {
        let last = AtomicU64::new(0);
        assert_eq!(next_seq(&last, 1_000), 1_000);
        // Two records in one millisecond, then a clock stepped back.
        assert_eq!(next_seq(&last, 1_000), 1_001);
        assert_eq!(next_seq(&last, 500), 1_002);
        assert_eq!(next_seq(&last, 5_000), 5_000);
    }
}
