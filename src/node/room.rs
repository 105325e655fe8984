//! One room on one node: the task that drives the tree state machine and the media session.
//!
//! The room task owns a [`TreeNode`] and a media session (a [`Broadcaster`] at the root, a
//! [`Viewer`] elsewhere) and turns the state machine's outputs into network actions:
//!
//! | output | action |
//! |---|---|
//! | `Send{to, msg}` | a sealed, signed [`Control`] in a direct request, queued per peer (in order) |
//! | `Publish{update, to}` | the signed [`wire::TreeUpdate`] to each tree neighbour |
//! | `RequestSnapshot` | a snapshot request to the broadcaster (or a known member) |
//! | `ConnectParent{peer}` | WebRTC offer -> signalling -> answer (see below) |
//! | `AcceptChild{peer}` | the child's offer will be answered when it arrives |
//! | `Disconnect{peer}` | close that child's media connection |
//! | `Timer(t)` | wake the loop at `t` |
//!
//! Signalling: the child seals its offer in a [`Signal`], signs it, stores it in the waterfall DHT
//! under `H(room, child, parent, nonce)` with a short expiry, and sends the same envelope to the
//! parent in a direct request (the fast path). The parent answers inline and stores its answer
//! under the matching key. When the direct request cannot be delivered, the child publishes a
//! [`Notice`] on the room topic and the parent fetches the offer from the DHT and answers the same
//! way. Signals older than [`SIGNAL_MAX_AGE`] and nonces already used are rejected.
//!
//! Liveness runs along tree edges: the media session reports a lost parent or a cut child, and a
//! libp2p disconnection of a tree neighbour counts as link loss too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::{Node, NodeError, ROOM_LIVENESS, ROOM_REFRESH, ticket_check};
use crate::crypto::{Kind, RoomKeys, now_ms, random_bytes};
use crate::media::{
    Broadcaster, ChildId, MediaEvent, MediaKey, MediaSource, SdpKind as MediaSdpKind, SignalBlob,
    Sinks, Viewer,
};
use crate::net::{Net, ResponseHandle, node_of, peer_of};
use crate::proto::{self, Millis, NodeId, Output, TreeEvent, TreeNode};
use crate::wire::{
    self, Control, Envelope, Nonce16, Notice, RoomId, RoomRecord, RoomRequest, RoomResponse,
    SdpKind, Signal, SnapshotRequest, SnapshotResponse, Ticket, TrackInfo, TrackKind, Versioned,
};

/// Inputs queued per room.
const ROOM_INPUT_QUEUE: usize = 512;
/// Events queued for the application; the oldest are dropped when it does not read.
const ROOM_EVENT_QUEUE: usize = 256;
/// Control messages queued per peer.
const PEER_SEND_QUEUE: usize = 64;
/// Time allowed for a control message request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the offer/answer round trip (the answerer gathers ICE first).
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Signals older than this are stale.
pub const SIGNAL_MAX_AGE: Duration = Duration::from_secs(30);
/// How long DHT signalling blobs live.
const SIGNAL_TTL: Duration = Duration::from_secs(60);
/// Control envelopes expire after this (bounds the replay window).
const CONTROL_TTL: Duration = Duration::from_secs(30);
/// Remembered envelope signatures and nonces (replay protection), per room.
const SEEN_CAPACITY: usize = 4096;
/// A tree neighbour whose libp2p connection closed must answer a probe within this.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A child we accepted that has not connected its media after this is dropped: it went
/// elsewhere and its word (a Leave) was lost, or it vanished before it offered. Without this
/// its slot stays taken and the tree lists a child that is not there.
const CHILD_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Candidates in a snapshot.
const SNAPSHOT_MAX: usize = 16;

/// Broadcaster or viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRole {
    /// The root of the tree.
    Broadcaster,
    /// Everyone else.
    Viewer,
}

/// What to broadcast.
pub struct RoomConfig {
    /// Room name.
    pub name: String,
    /// Password; `None` makes a public room.
    pub password: Option<String>,
    /// Media sources (at most one video and one audio).
    pub sources: Vec<Box<dyn MediaSource>>,
    /// Whether a data channel runs beside the media.
    pub data: bool,
    /// Children per relay the room aims for.
    pub fanout: u16,
    /// Stream bitrate, kbit/s (capacity = uplink / bitrate when no max is set).
    pub bitrate_kbps: u32,
    /// Tree tunables (defaults are right for real use; tests shorten them).
    pub tree: proto::Config,
    /// Start reading the sources at once (else call [`RoomHandle::start`], e.g. once the first
    /// viewers are attached so that they get every frame from the first).
    pub autostart: bool,
}

impl RoomConfig {
    /// A room with defaults: fanout 4, 1 Mbit/s.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            password: None,
            sources: Vec::new(),
            data: true,
            fanout: 4,
            bitrate_kbps: 1000,
            tree: proto::Config::default(),
            autostart: true,
        }
    }
    /// Set the password.
    pub fn password(mut self, pw: impl Into<String>) -> Self {
        self.password = Some(pw.into());
        self
    }
    /// Add a media source.
    pub fn source(mut self, s: Box<dyn MediaSource>) -> Self {
        self.sources.push(s);
        self
    }
    /// Set the fanout.
    pub fn fanout(mut self, k: u16) -> Self {
        self.fanout = k;
        self
    }
}

impl std::fmt::Debug for RoomConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomConfig")
            .field("name", &self.name)
            .field("sources", &self.sources.len())
            .field("fanout", &self.fanout)
            .finish_non_exhaustive()
    }
}

/// How to find a room to watch.
#[derive(Debug, Clone)]
pub enum WatchTarget {
    /// A ticket printed by the broadcaster.
    Ticket(Ticket),
    /// A room name, looked up in the DHT.
    Name(String),
}

/// Options of a viewer.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Where to write what arrives.
    pub sinks: Sinks,
    /// Tree tunables.
    pub tree: Option<proto::Config>,
}

/// What happens in a room, for the application.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RoomEvent {
    /// Attached to the tree for the first time.
    Joined { parent: PeerId, depth: u16 },
    /// The parent changed (repair or rebalancing).
    ParentChanged { old: Option<PeerId>, new: PeerId },
    /// Our depth changed (`None`: no path to the root right now).
    DepthChanged { depth: Option<u16> },
    /// The parent was lost; repair under way.
    Orphaned { lost: PeerId },
    /// Attached again after an outage.
    Rejoined { parent: PeerId, outage_ms: u64 },
    /// A child was accepted.
    ChildAdded(PeerId),
    /// A child left or was lost.
    ChildRemoved(PeerId),
    /// Something from the media session (first frame, stats, decrypt failures...).
    Media(MediaEvent),
    /// The room ended (we left, or the broadcast is over).
    Ended,
}

/// A snapshot of a room's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomStatus {
    /// Parent, if attached.
    pub parent: Option<PeerId>,
    /// Depth, if attached.
    pub depth: Option<u16>,
    /// Children.
    pub children: Vec<PeerId>,
    /// Capacity.
    pub capacity: u16,
}

enum Input {
    Gossip {
        from: PeerId,
        data: Vec<u8>,
    },
    Request {
        from: PeerId,
        req: Box<RoomRequest>,
        reply: ResponseHandle,
    },
    PeerGone(PeerId),
    Snapshot(proto::Snapshot),
    ParentSignalled {
        parent: NodeId,
        ok: Result<(), String>,
    },
    ChildAttached {
        child: NodeId,
        id: ChildId,
    },
    LinkDown(NodeId),
    Status(oneshot::Sender<RoomStatus>),
    Leave(oneshot::Sender<()>),
}

/// The rooms of one node, by room id (locator) and by topic.
#[derive(Clone, Default)]
pub(crate) struct Rooms {
    inner: Arc<Mutex<RoomsInner>>,
}

#[derive(Default)]
struct RoomsInner {
    by_id: HashMap<RoomId, mpsc::Sender<Input>>,
    by_topic: HashMap<String, RoomId>,
    tasks: HashMap<RoomId, tokio::task::AbortHandle>,
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoomsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: RoomId, topic: String, tx: mpsc::Sender<Input>) -> bool {
        let mut g = self.lock();
        if g.by_id.contains_key(&id) {
            return false;
        }
        g.by_id.insert(id, tx);
        g.by_topic.insert(topic, id);
        true
    }

    fn remove(&self, id: &RoomId) {
        let mut g = self.lock();
        g.by_id.remove(id);
        g.tasks.remove(id);
        g.by_topic.retain(|_, v| v != id);
    }

    pub(crate) fn gossip(&self, topic: &str, from: PeerId, data: Vec<u8>) {
        let tx = {
            let g = self.lock();
            g.by_topic
                .get(topic)
                .and_then(|id| g.by_id.get(id))
                .cloned()
        };
        if let Some(tx) = tx
            && tx.try_send(Input::Gossip { from, data }).is_err()
        {
            tracing::debug!("room input full: gossip dropped");
        }
    }

    pub(crate) async fn request(&self, from: PeerId, data: Vec<u8>, reply: ResponseHandle) {
        let req: RoomRequest = match wire::decode(&data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%from, "bad request: {e}");
                let _ = reply.respond(refusal(&format!("bad request: {e}"))).await;
                return;
            }
        };
        let tx = self.lock().by_id.get(&req.room).cloned();
        match tx {
            Some(tx) => {
                if let Err(mpsc::error::TrySendError::Full(Input::Request { reply, .. })) = tx
                    .try_send(Input::Request {
                        from,
                        req: Box::new(req),
                        reply,
                    })
                {
                    let _ = reply.respond(refusal("busy")).await;
                }
            }
            None => {
                let _ = reply.respond(refusal("not in this room")).await;
            }
        }
    }

    pub(crate) fn peer_gone(&self, peer: PeerId) {
        let txs: Vec<_> = self.lock().by_id.values().cloned().collect();
        for tx in txs {
            let _ = tx.try_send(Input::PeerGone(peer));
        }
    }

    /// Stop every room task at once, telling nobody (crash simulation).
    pub(crate) fn abort_all(&self) {
        let mut g = self.lock();
        for (_, t) in g.tasks.drain() {
            t.abort();
        }
        g.by_id.clear();
        g.by_topic.clear();
    }

    pub(crate) async fn shutdown_all(&self) {
        let txs: Vec<_> = self.lock().by_id.values().cloned().collect();
        for tx in txs {
            let (done, rx) = oneshot::channel();
            if tx.send(Input::Leave(done)).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
        }
    }
}

fn refusal(reason: &str) -> Vec<u8> {
    wire::encode(&RoomResponse {
        v: wire::VERSION,
        env: None,
        error: Some(reason.to_owned()),
    })
}

/// A joined room. Dropping it leaves the room.
pub struct RoomHandle {
    tx: mpsc::Sender<Input>,
    events: Option<mpsc::Receiver<RoomEvent>>,
    ticket: Option<Ticket>,
    role: RoomRole,
    broadcaster: Option<Arc<Broadcaster>>,
    keys: RoomKeys,
    _node: Node,
}

impl std::fmt::Debug for RoomHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomHandle")
            .field("room", &self.keys.name())
            .field("role", &self.role)
            .finish()
    }
}

impl RoomHandle {
    /// The ticket viewers use (broadcaster only).
    pub fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// Broadcaster or viewer.
    pub fn role(&self) -> RoomRole {
        self.role
    }

    /// The room's keys.
    pub fn keys(&self) -> &RoomKeys {
        &self.keys
    }

    /// The event stream (once).
    pub fn events(&mut self) -> Option<mpsc::Receiver<RoomEvent>> {
        self.events.take()
    }

    /// Send an application message down the tree (broadcaster only).
    pub fn send_data(&self, msg: &[u8]) -> Result<(), NodeError> {
        match &self.broadcaster {
            Some(b) => b
                .send_data(msg)
                .map_err(|e| NodeError::Media(e.to_string())),
            None => Err(NodeError::Invalid("only the broadcaster sends data".into())),
        }
    }

    /// Start the media sources (broadcaster only; once).
    pub fn start(&self) {
        if let Some(b) = &self.broadcaster {
            b.start();
        }
    }

    /// Current tree position.
    pub async fn status(&self) -> Result<RoomStatus, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Status(tx))
            .await
            .map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| NodeError::Closed)
    }

    /// Leave gracefully: children and parent are told, files are closed.
    pub async fn leave(self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Input::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}

impl Drop for RoomHandle {
    /// Dropping the handle leaves the room (gracefully, in the background); once every room
    /// handle and every `Node` clone is gone, the node stops.
    fn drop(&mut self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.tx.try_send(Input::Leave(tx));
    }
}

enum Media {
    Root(Arc<Broadcaster>),
    Viewer(Arc<Viewer>),
}

impl Node {
    /// Create a room and broadcast into it.
    pub async fn broadcast(&self, cfg: RoomConfig) -> Result<RoomHandle, NodeError> {
        let keys = self.room_keys(&cfg.name, cfg.password.as_deref()).await?;
        let tracks: Vec<TrackInfo> = cfg
            .sources
            .iter()
            .map(|s| {
                let c = s.codec();
                TrackInfo {
                    kind: match c.kind() {
                        crate::media::MediaKind::Video => TrackKind::Video,
                        crate::media::MediaKind::Audio => TrackKind::Audio,
                    },
                    codec: c.mime_type().to_owned(),
                    clock_rate: c.clock_rate(),
                }
            })
            .collect();
        let (bc, media_events) = Broadcaster::new(
            cfg.sources,
            MediaKey::new(*keys.media_key().expose()),
            self.inner.media.clone(),
        )
        .map_err(|e| NodeError::Media(e.to_string()))?;
        let bc = Arc::new(bc);
        let addrs: Vec<String> = self.addrs().await?.iter().map(|a| a.to_string()).collect();
        let me = self.inner.identity.node_id();
        let record = RoomRecord {
            v: wire::VERSION,
            broadcaster: me,
            addrs: addrs.clone(),
            tracks,
            data: cfg.data,
            fanout: cfg.fanout,
            bitrate_kbps: cfg.bitrate_kbps,
            created_ms: now_ms(),
            expires_ms: now_ms() + ROOM_LIVENESS.as_millis() as u64,
            seq: 1,
        };
        let mut tree_cfg = cfg.tree.clone();
        tree_cfg.max_children = Some(self.inner.max_children.unwrap_or(cfg.fanout));
        tree_cfg.stream_kbps = cfg.bitrate_kbps;
        let tree = TreeNode::new_root(me, tree_cfg, u64::from_le_bytes(random_bytes()));
        let ticket = Ticket {
            v: wire::VERSION,
            room: cfg.name.clone(),
            broadcaster: me,
            addrs,
            check: ticket_check(&keys),
        };
        let handle = self
            .start_room(
                keys,
                tree,
                Media::Root(bc.clone()),
                media_events,
                Some(record),
                me,
                Some(ticket),
            )
            .await?;
        if cfg.autostart {
            bc.start();
        }
        Ok(handle)
    }

    /// Join a room as a viewer.
    pub async fn watch(
        &self,
        target: WatchTarget,
        password: Option<&str>,
        opts: WatchOptions,
    ) -> Result<RoomHandle, NodeError> {
        let (name, ticket) = match &target {
            WatchTarget::Ticket(t) => (t.room.clone(), Some(t)),
            WatchTarget::Name(n) => (n.clone(), None),
        };
        let keys = self.room_keys(&name, password).await?;
        let record = self.lookup_room(&keys, ticket).await?;
        // Reach the broadcaster (its addresses are in the record) so the snapshot request and the
        // DHT have a path.
        for a in &record.addrs {
            if let Ok(addr) = a.parse() {
                let _ = self.inner.net.dial(addr).await;
            }
        }
        let (viewer, media_events) = Viewer::new(
            MediaKey::new(*keys.media_key().expose()),
            opts.sinks,
            self.inner.media.clone(),
        );
        let mut tree_cfg = opts.tree.unwrap_or_default();
        tree_cfg.max_children = Some(self.inner.max_children.unwrap_or(record.fanout));
        tree_cfg.stream_kbps = record.bitrate_kbps;
        let me = self.inner.identity.node_id();
        let tree = TreeNode::new(me, tree_cfg, u64::from_le_bytes(random_bytes()));
        self.start_room(
            keys,
            tree,
            Media::Viewer(Arc::new(viewer)),
            media_events,
            None,
            record.broadcaster,
            None,
        )
        .await
    }

    async fn start_room(
        &self,
        keys: RoomKeys,
        tree: TreeNode,
        media: Media,
        media_events: mpsc::Receiver<MediaEvent>,
        record: Option<RoomRecord>,
        broadcaster_id: NodeId,
        ticket: Option<Ticket>,
    ) -> Result<RoomHandle, NodeError> {
        let role = if record.is_some() {
            RoomRole::Broadcaster
        } else {
            RoomRole::Viewer
        };
        let room = RoomId(*keys.locator());
        let (tx, rx) = mpsc::channel(ROOM_INPUT_QUEUE);
        if !self
            .inner
            .rooms
            .insert(room, keys.topic().to_owned(), tx.clone())
        {
            return Err(NodeError::AlreadyJoined(keys.name().to_owned()));
        }
        self.inner.topics.insert(keys.clone());
        self.inner.net.subscribe(keys.topic().to_owned()).await?;
        if self.inner.public {
            // Room members are findable on the public DHT under a key only members can compute.
            let (net, key) = (self.inner.net.clone(), keys.derived_key(b"members", &[]));
            tokio::spawn(async move {
                if let Err(e) = net.provide_public(key.to_vec()).await {
                    tracing::warn!("providing the room on the public DHT failed: {e}");
                }
            });
        }
        let record_env = match &record {
            Some(r) => Some(self.publish_record(&keys, r).await?),
            None => None,
        };
        let (ev_tx, ev_rx) = mpsc::channel(ROOM_EVENT_QUEUE);
        let broadcaster = match &media {
            Media::Root(b) => Some(b.clone()),
            Media::Viewer(_) => None,
        };
        let task = RoomTask {
            node: self.clone(),
            net: self.inner.net.clone(),
            keys: keys.clone(),
            room,
            me: self.inner.identity.node_id(),
            tree,
            media,
            record,
            record_env,
            broadcaster: Some(broadcaster_id),
            epoch: Instant::now(),
            inputs_tx: tx.clone(),
            events: ev_tx,
            senders: HashMap::new(),
            children: BTreeMap::new(),
            connecting: BTreeMap::new(),
            seen: Seen::default(),
            seq: 0,
            snapshot_inflight: false,
        };
        let h = tokio::spawn(task.run(rx, media_events));
        self.inner.rooms.lock().tasks.insert(room, h.abort_handle());
        Ok(RoomHandle {
            tx,
            events: Some(ev_rx),
            ticket,
            role,
            broadcaster,
            keys,
            _node: self.clone(),
        })
    }
}

/// Bounded memory of recently seen items (replay protection).
#[derive(Default)]
struct Seen {
    set: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

impl Seen {
    /// True if new (and remembers it).
    fn insert(&mut self, item: [u8; 32]) -> bool {
        if !self.set.insert(item) {
            return false;
        }
        self.order.push_back(item);
        if self.order.len() > SEEN_CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

struct RoomTask {
    node: Node,
    net: Net,
    keys: RoomKeys,
    room: RoomId,
    me: NodeId,
    tree: TreeNode,
    media: Media,
    record: Option<RoomRecord>,
    /// The signed, sealed record as last published (served to ticket holders directly).
    record_env: Option<Envelope>,
    /// The broadcaster's key (viewers learn it from the record).
    broadcaster: Option<NodeId>,
    epoch: Instant,
    inputs_tx: mpsc::Sender<Input>,
    events: mpsc::Sender<RoomEvent>,
    senders: HashMap<NodeId, mpsc::Sender<Vec<u8>>>,
    children: BTreeMap<NodeId, ChildId>,
    /// Children the tree accepted whose media connection is not up yet, with their deadline
    /// (at most the tree's capacity plus one: the tree bounds it).
    connecting: BTreeMap<NodeId, tokio::time::Instant>,
    seen: Seen,
    seq: u64,
    snapshot_inflight: bool,
}

impl RoomTask {
    fn now(&self) -> Millis {
        Millis(self.epoch.elapsed().as_millis() as u64)
    }

    fn emit(&self, ev: RoomEvent) {
        if self.events.try_send(ev).is_err() {
            tracing::trace!("room event dropped: the application is not reading");
        }
    }

    async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut media_events: mpsc::Receiver<MediaEvent>,
    ) {
        let now = self.now();
        if matches!(self.media, Media::Viewer(_)) {
            self.tree.start(now);
        }
        self.drain().await;
        let mut refresh = tokio::time::interval(ROOM_REFRESH);
        refresh.tick().await;
        let mut media_open = true;
        let leave_reply = loop {
            let timer = self
                .tree
                .poll_timeout()
                .map(|t| tokio::time::Instant::from_std(self.epoch + Duration::from_millis(t.0)));
            let connect_due = self.connecting.values().min().copied();
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(Input::Leave(done)) => break Some(done),
                    Some(i) => self.handle(i).await,
                    None => break None,
                },
                ev = media_events.recv(), if media_open => match ev {
                    Some(ev) => self.on_media(ev),
                    None => media_open = false,
                },
                _ = async { tokio::time::sleep_until(timer.expect("guarded")).await }, if timer.is_some() => {
                    let now = self.now();
                    self.tree.handle_timeout(now);
                }
                _ = refresh.tick(), if self.record.is_some() => self.refresh_record().await,
                _ = async { tokio::time::sleep_until(connect_due.expect("guarded")).await }, if connect_due.is_some() => {
                    self.drop_unconnected_children();
                }
            }
            self.drain().await;
        };
        // Leave: tell neighbours (the outputs go out through the per-peer queues), end the record.
        let now = self.now();
        self.tree.leave(now);
        self.drain().await;
        if let Some(mut r) = self.record.take() {
            r.seq += 1;
            r.expires_ms = now_ms();
            // Bounded: with no DHT peer left, leaving must not wait for the put's query.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.node.publish_record(&self.keys, &r),
            )
            .await;
        }
        // Give the per-peer queues a moment to deliver the Leave messages.
        let senders: Vec<_> = self.senders.drain().map(|(_, s)| s).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for s in senders {
            while s.capacity() < PEER_SEND_QUEUE && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.node.inner.rooms.remove(&self.room);
        self.node.inner.topics.remove(self.keys.topic());
        let _ = self.net.unsubscribe(self.keys.topic().to_owned()).await;
        self.emit(RoomEvent::Ended);
        if let Media::Viewer(mut v) = self.media {
            // Spawned signalling tasks may still hold the viewer for a moment; closing it
            // finalizes the files (they are valid without it too, up to the last frame).
            for _ in 0..50 {
                match Arc::try_unwrap(v) {
                    Ok(v) => {
                        v.close().await;
                        break;
                    }
                    Err(shared) => {
                        v = shared;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        if let Some(done) = leave_reply {
            let _ = done.send(());
        }
    }

    async fn refresh_record(&mut self) {
        let Some(r) = self.record.as_mut() else {
            return;
        };
        r.seq += 1;
        r.expires_ms = now_ms() + ROOM_LIVENESS.as_millis() as u64;
        let r = r.clone();
        match self.node.publish_record(&self.keys, &r).await {
            Ok(env) => self.record_env = Some(env),
            Err(e) => tracing::warn!("refreshing the room record failed: {e}"),
        }
    }

    fn peer_of(id: NodeId) -> Option<PeerId> {
        peer_of(id)
    }

    /// Children accepted long ago that never connected: lost to the tree (see
    /// `CHILD_CONNECT_TIMEOUT`).
    fn drop_unconnected_children(&mut self) {
        let now_i = tokio::time::Instant::now();
        let expired: Vec<NodeId> = self
            .connecting
            .iter()
            .filter(|(_, t)| **t <= now_i)
            .map(|(id, _)| *id)
            .collect();
        let now = self.now();
        for id in expired {
            self.connecting.remove(&id);
            if !self.children.contains_key(&id) && self.tree.children().any(|c| c == id) {
                tracing::debug!(child = ?id, "accepted child never connected; dropped");
                self.tree.handle_link_down(id, now);
            }
        }
    }

    fn on_media(&mut self, ev: MediaEvent) {
        let now = self.now();
        match &ev {
            MediaEvent::ParentLost => {
                if let Some(p) = self.tree.parent() {
                    self.tree.handle_link_down(p, now);
                }
            }
            MediaEvent::ChildCut { id, .. } => {
                if let Some((&child, _)) = self.children.iter().find(|(_, c)| *c == id) {
                    self.children.remove(&child);
                    self.tree.handle_link_down(child, now);
                }
            }
            _ => {}
        }
        self.emit(RoomEvent::Media(ev));
    }

    async fn handle(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Gossip { from, data } => self.on_gossip(from, data).await,
            Input::Request { from, req, reply } => self.on_request(from, *req, reply).await,
            Input::PeerGone(peer) => {
                let Some(id) = node_of(&peer) else {
                    return;
                };
                self.senders.remove(&id);
                let neighbour =
                    self.tree.parent() == Some(id) || self.tree.children().any(|c| c == id);
                if neighbour {
                    // The libp2p connection to a tree neighbour closed. A crashed peer refuses a
                    // new connection at once; an idle-closed connection simply reopens. Probe
                    // with a small request instead of tearing the edge down on a hunch.
                    let req = SnapshotRequest {
                        v: wire::VERSION,
                        room: self.room,
                        max: 1,
                    };
                    let env = self.envelope(Kind::Snapshot, &wire::encode(&req), CONTROL_TTL);
                    let bytes = self.request_bytes(env);
                    let (net, tx) = (self.net.clone(), self.inputs_tx.clone());
                    tokio::spawn(async move {
                        if net.request(peer, bytes, PROBE_TIMEOUT).await.is_err() {
                            let _ = tx.send(Input::LinkDown(id)).await;
                        }
                    });
                }
            }
            Input::LinkDown(id) => {
                if self.tree.parent() == Some(id) || self.tree.children().any(|c| c == id) {
                    self.tree.handle_link_down(id, now);
                }
            }
            Input::Snapshot(s) => {
                self.snapshot_inflight = false;
                self.tree.handle_snapshot(s, now);
            }
            Input::ParentSignalled { parent, ok } => {
                if let Err(e) = ok {
                    tracing::debug!(?parent, "media connection to parent failed: {e}");
                    if self.tree.parent() == Some(parent) {
                        self.tree.handle_link_down(parent, now);
                    }
                }
            }
            Input::ChildAttached { child, id } => {
                self.connecting.remove(&child);
                if self.tree.children().any(|c| c == child) {
                    if let Some(old) = self.children.insert(child, id)
                        && old != id
                    {
                        self.detach(old);
                    }
                } else {
                    // Left while we were answering.
                    self.detach(id);
                }
            }
            Input::Status(tx) => {
                let _ = tx.send(RoomStatus {
                    parent: self.tree.parent().and_then(Self::peer_of),
                    depth: self.tree.depth(),
                    children: self.tree.children().filter_map(Self::peer_of).collect(),
                    capacity: self.tree.capacity(),
                });
            }
            Input::Leave(_) => unreachable!("handled by the loop"),
        }
    }

    fn detach(&self, id: ChildId) {
        match &self.media {
            Media::Root(b) => {
                b.detach_child(id);
            }
            Media::Viewer(v) => {
                v.detach_child(id);
            }
        }
    }

    /// Execute the state machine's outputs.
    async fn drain(&mut self) {
        while let Some(out) = self.tree.poll_output() {
            match out {
                Output::Send { to, msg } => {
                    let ctl = Control {
                        v: wire::VERSION,
                        room: self.room,
                        from: self.me,
                        to,
                        msg,
                    };
                    let env = self.envelope(Kind::TreeControl, &wire::encode(&ctl), CONTROL_TTL);
                    self.send_to(to, env);
                }
                Output::Publish { update, to } => {
                    // The state machine's clock is node-local; the wire carries wall-clock time.
                    let upd = Versioned(proto::TreeUpdate {
                        ts_ms: now_ms(),
                        ..update
                    });
                    let env = self.envelope(Kind::TreeUpdate, &wire::encode(&upd), CONTROL_TTL);
                    for peer in to {
                        self.send_to(peer, env.clone());
                    }
                }
                Output::ConnectParent { peer } => self.connect_parent(peer),
                Output::AcceptChild { peer } => {
                    tracing::debug!(child = ?peer, "accepted child; waiting for its offer");
                    if !self.children.contains_key(&peer) {
                        self.connecting
                            .insert(peer, tokio::time::Instant::now() + CHILD_CONNECT_TIMEOUT);
                    }
                }
                Output::RefuseChild { peer, reason } => {
                    tracing::debug!(joiner = ?peer, ?reason, "refused");
                }
                Output::Disconnect { peer } => {
                    self.connecting.remove(&peer);
                    if let Some(id) = self.children.remove(&peer) {
                        self.detach(id);
                    }
                }
                Output::RequestSnapshot => self.request_snapshot(),
                Output::Timer(_) => {} // the loop asks poll_timeout()
                Output::Event(ev) => self.on_tree_event(ev),
            }
        }
    }

    fn on_tree_event(&self, ev: TreeEvent) {
        let p = |id: NodeId| Self::peer_of(id);
        let ev = match ev {
            TreeEvent::Joined { parent, depth } => {
                p(parent).map(|parent| RoomEvent::Joined { parent, depth })
            }
            TreeEvent::ParentChanged { old, new } => p(new).map(|new| RoomEvent::ParentChanged {
                old: old.and_then(p),
                new,
            }),
            TreeEvent::DepthChanged { depth } => Some(RoomEvent::DepthChanged { depth }),
            TreeEvent::Orphaned { lost } => p(lost).map(|lost| RoomEvent::Orphaned { lost }),
            TreeEvent::Rejoined { parent, outage_ms } => {
                p(parent).map(|parent| RoomEvent::Rejoined { parent, outage_ms })
            }
            TreeEvent::ChildAdded(c) => p(c).map(RoomEvent::ChildAdded),
            TreeEvent::ChildRemoved(c) => p(c).map(RoomEvent::ChildRemoved),
        };
        if let Some(ev) = ev {
            self.emit(ev);
        }
    }

    /// Seal `plain` for this room and sign it.
    fn envelope(&mut self, kind: Kind, plain: &[u8], ttl: Duration) -> Envelope {
        self.seq += 1;
        let sealed = self.keys.seal(kind, plain);
        self.node.inner.identity.seal_envelope(
            kind,
            self.seq,
            now_ms() + ttl.as_millis() as u64,
            sealed,
        )
    }

    fn request_bytes(&self, env: Envelope) -> Vec<u8> {
        wire::encode(&RoomRequest {
            v: wire::VERSION,
            room: self.room,
            env,
        })
    }

    /// Queue a message to a peer; one task per peer keeps them in order.
    fn send_to(&mut self, to: NodeId, env: Envelope) {
        let Some(peer) = Self::peer_of(to) else {
            return;
        };
        let bytes = self.request_bytes(env);
        let tx = self.senders.entry(to).or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PEER_SEND_QUEUE);
            let net = self.net.clone();
            tokio::spawn(async move {
                // Ends when the room drops the sender (peer gone or room left) and the queue drains.
                while let Some(bytes) = rx.recv().await {
                    if let Err(e) = net.request(peer, bytes, CONTROL_TIMEOUT).await {
                        tracing::debug!(%peer, "control message not delivered: {e}");
                    }
                }
            });
            tx
        });
        if tx.try_send(bytes).is_err() {
            tracing::debug!(?to, "control queue full: message dropped");
        }
    }

    fn request_snapshot(&mut self) {
        if self.snapshot_inflight {
            return;
        }
        // Ask the broadcaster, else our parent or backup: every member can answer.
        let target = self
            .broadcaster
            .into_iter()
            .chain(self.tree.backup())
            .chain(self.tree.parent())
            .find(|t| *t != self.me);
        let Some(target) = target else { return };
        let Some(peer) = Self::peer_of(target) else {
            return;
        };
        self.snapshot_inflight = true;
        let req = SnapshotRequest {
            v: wire::VERSION,
            room: self.room,
            max: SNAPSHOT_MAX as u16,
        };
        let env = self.envelope(Kind::Snapshot, &wire::encode(&req), CONTROL_TTL);
        let bytes = self.request_bytes(env);
        let (net, keys, tx) = (self.net.clone(), self.keys.clone(), self.inputs_tx.clone());
        let room = self.room;
        tokio::spawn(async move {
            let snap = match net.request(peer, bytes, CONTROL_TIMEOUT).await {
                Ok(resp) => open_snapshot(&keys, room, target, &resp).unwrap_or_else(|e| {
                    tracing::debug!("bad snapshot from {peer}: {e}");
                    proto::Snapshot::default()
                }),
                Err(e) => {
                    tracing::debug!("snapshot request to {peer} failed: {e}");
                    proto::Snapshot::default()
                }
            };
            // Always answer, so the state machine retries (with jitter) when this failed.
            let _ = tx.send(Input::Snapshot(snap)).await;
        });
    }

    fn connect_parent(&mut self, parent: NodeId) {
        let Media::Viewer(viewer) = &self.media else {
            return;
        };
        let Some(peer) = Self::peer_of(parent) else {
            return;
        };
        let viewer = viewer.clone();
        let nonce = Nonce16(random_bytes());
        let keys = self.keys.clone();
        let room = self.room;
        let me = self.me;
        let node = self.node.clone();
        let tx = self.inputs_tx.clone();
        tokio::spawn(async move {
            let ok = async {
                let offer = viewer.connect_parent().await.map_err(|e| e.to_string())?;
                let signal = Signal {
                    v: wire::VERSION,
                    room,
                    from: me,
                    to: parent,
                    nonce,
                    kind: SdpKind::Offer,
                    sdp: offer.sdp,
                    ts_ms: now_ms(),
                };
                let env = signal_envelope(&node, &keys, Kind::Offer, &signal);
                // Durable copy in the DHT (the parent can fetch it if the direct path fails).
                let blob_key = signal_key(&keys, me, parent, &nonce, SdpKind::Offer);
                let put = {
                    let (net, env) = (node.inner.net.clone(), wire::encode(&env));
                    tokio::spawn(async move { net.put_record(blob_key.to_vec(), env).await })
                };
                let req = wire::encode(&RoomRequest {
                    v: wire::VERSION,
                    room,
                    env: env.clone(),
                });
                let direct = if node.inner.inline_signalling {
                    node.inner.net.request(peer, req, SIGNAL_TIMEOUT).await
                } else {
                    Err(crate::net::NetError::Request(
                        "inline signalling is off".into(),
                    ))
                };
                let answer_env = match direct {
                    Ok(resp) => {
                        let resp: RoomResponse = wire::decode(&resp).map_err(|e| e.to_string())?;
                        if let Some(err) = resp.error {
                            return Err(format!("parent refused the offer: {err}"));
                        }
                        resp.env.ok_or("empty answer")?
                    }
                    Err(e) => {
                        // Slow path: tell the parent on the room topic, wait for its answer blob.
                        tracing::debug!("direct signalling unavailable ({e}); using the DHT");
                        put.await.map_err(|e| e.to_string())?.or_else(|e| match e {
                            // Stored here and served from here: the parent can fetch it.
                            crate::net::NetError::NotReplicated => Ok(()),
                            e => Err(e.to_string()),
                        })?;
                        signal_via_dht(&node, &keys, room, me, parent, nonce, blob_key).await?
                    }
                };
                let answer = open_signal(&keys, &answer_env, Kind::Answer, parent, me)?;
                if answer.nonce != nonce {
                    return Err("answer for another exchange".into());
                }
                viewer
                    .parent_answer(&SignalBlob {
                        kind: MediaSdpKind::Answer,
                        sdp: answer.sdp,
                    })
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            let _ = tx.send(Input::ParentSignalled { parent, ok }).await;
        });
    }

    async fn on_gossip(&mut self, from: PeerId, data: Vec<u8>) {
        // Already verified and opened by the gossip validator; open again to get the payload.
        let Some((env, plain)) =
            self.node
                .inner
                .topics
                .open_gossip(self.keys.topic(), &from, &data)
        else {
            return;
        };
        if env.kind != Kind::Notice {
            return;
        }
        let Ok(notice) = wire::decode::<Notice>(&plain) else {
            return;
        };
        if notice.to != self.me || notice.kind != SdpKind::Offer {
            return;
        }
        // A child could not reach us directly: fetch its offer from the DHT and answer there.
        let child = notice.from;
        if !self.tree.children().any(|c| c == child) {
            return;
        }
        if !self.seen.insert(digest(&notice.nonce.0)) {
            tracing::debug!(?child, "replayed signalling notice ignored");
            return;
        }
        let net = self.net.clone();
        let key = notice.blob_key;
        let keys = self.keys.clone();
        let me = self.me;
        let tx = self.inputs_tx.clone();
        let media = match &self.media {
            Media::Root(b) => Media::Root(b.clone()),
            Media::Viewer(v) => Media::Viewer(v.clone()),
        };
        let node = self.node.clone();
        tokio::spawn(async move {
            let Ok(values) = net.get_record(key.to_vec(), SIGNAL_TIMEOUT).await else {
                return;
            };
            for v in values {
                let Ok(env) = wire::decode::<Envelope>(&v) else {
                    continue;
                };
                let Ok(offer) = open_signal(&keys, &env, Kind::Offer, child, me) else {
                    continue;
                };
                if let Ok((id, answer_env)) = answer_offer(&node, &keys, &media, &offer).await {
                    let akey = signal_key(&keys, child, me, &offer.nonce, SdpKind::Answer);
                    let _ = net
                        .put_record(akey.to_vec(), wire::encode(&answer_env))
                        .await;
                    let notice = Notice {
                        v: wire::VERSION,
                        room: offer.room,
                        from: me,
                        to: child,
                        nonce: offer.nonce,
                        kind: SdpKind::Answer,
                        blob_key: akey,
                    };
                    let env = signal_envelope(&node, &keys, Kind::Notice, &notice);
                    let _ = net
                        .publish(keys.topic().to_owned(), wire::encode(&env))
                        .await;
                    let _ = tx.send(Input::ChildAttached { child, id }).await;
                }
                return;
            }
        });
    }

    async fn on_request(&mut self, from: PeerId, req: RoomRequest, reply: ResponseHandle) {
        let now = self.now();
        let env = req.env;
        let respond = |bytes: Vec<u8>| async move {
            let _ = reply.respond(bytes).await;
        };
        // The envelope must be signed by the peer that sent it, valid, and not a replay.
        let signer_ok = node_of(&from) == Some(env.signer);
        if !signer_ok || env.verify(now_ms()).is_err() {
            return respond(refusal("invalid envelope")).await;
        }
        if !self.seen.insert(digest(&env.sig)) {
            return respond(refusal("replayed")).await;
        }
        let Ok(plain) = self.keys.open(env.kind, &env.payload) else {
            return respond(refusal("cannot open: not a member of this room")).await;
        };
        let sender = env.signer;
        match env.kind {
            Kind::TreeControl => {
                let Ok(ctl) = wire::decode::<Control>(&plain) else {
                    return respond(refusal("malformed control")).await;
                };
                if ctl.from != sender || ctl.to != self.me || ctl.room != self.room {
                    return respond(refusal("misaddressed control")).await;
                }
                respond(ok_response(None)).await;
                self.tree.handle_message(sender, ctl.msg, now);
            }
            Kind::TreeUpdate => {
                let Ok(Versioned(upd)) = wire::decode::<Versioned<proto::TreeUpdate>>(&plain)
                else {
                    return respond(refusal("malformed update")).await;
                };
                if upd.peer != sender {
                    return respond(refusal("update about someone else")).await;
                }
                respond(ok_response(None)).await;
                self.tree.handle_update(sender, upd, now);
            }
            Kind::RoomRecord => match &self.record_env {
                // A member (it sealed the request with the room key) asks the broadcaster.
                Some(env) => respond(ok_response(Some(env.clone()))).await,
                None => respond(refusal("not the broadcaster")).await,
            },
            Kind::Snapshot => {
                let snap = self.tree.snapshot_for_newcomer(SNAPSHOT_MAX);
                let resp = SnapshotResponse {
                    v: wire::VERSION,
                    room: self.room,
                    candidates: snap.candidates,
                };
                let env = self.envelope(Kind::Snapshot, &wire::encode(&resp), CONTROL_TTL);
                respond(ok_response(Some(env))).await;
            }
            Kind::Offer => {
                let Ok(offer) = open_signal(&self.keys, &env, Kind::Offer, sender, self.me) else {
                    return respond(refusal("bad offer")).await;
                };
                if !self.seen.insert(digest(&offer.nonce.0)) {
                    return respond(refusal("nonce reused")).await;
                }
                if !self.tree.children().any(|c| c == sender) {
                    return respond(refusal("not a child of this node")).await;
                }
                let media = match &self.media {
                    Media::Root(b) => Media::Root(b.clone()),
                    Media::Viewer(v) => Media::Viewer(v.clone()),
                };
                let (node, keys, tx, me) = (
                    self.node.clone(),
                    self.keys.clone(),
                    self.inputs_tx.clone(),
                    self.me,
                );
                // Answering gathers ICE candidates: off the loop.
                tokio::spawn(async move {
                    match answer_offer(&node, &keys, &media, &offer).await {
                        Ok((id, answer_env)) => {
                            let akey = signal_key(&keys, sender, me, &offer.nonce, SdpKind::Answer);
                            let bytes = wire::encode(&answer_env);
                            respond(ok_response(Some(answer_env))).await;
                            let _ = tx.send(Input::ChildAttached { child: sender, id }).await;
                            let _ = node.inner.net.put_record(akey.to_vec(), bytes).await;
                        }
                        Err(e) => respond(refusal(&e)).await,
                    }
                });
            }
            _ => respond(refusal("unexpected kind")).await,
        }
    }
}

fn ok_response(env: Option<Envelope>) -> Vec<u8> {
    wire::encode(&RoomResponse {
        v: wire::VERSION,
        env,
        error: None,
    })
}

/// Seal a signalling message for the room and sign it; it lives [`SIGNAL_TTL`].
fn signal_envelope<T: wire::Message>(
    node: &Node,
    keys: &RoomKeys,
    kind: Kind,
    msg: &T,
) -> Envelope {
    node.inner.identity.seal_envelope(
        kind,
        now_ms(),
        now_ms() + SIGNAL_TTL.as_millis() as u64,
        keys.seal(kind, &wire::encode(msg)),
    )
}

/// DHT key of a signalling blob: H(room, child, parent, nonce, kind).
fn signal_key(
    keys: &RoomKeys,
    child: NodeId,
    parent: NodeId,
    nonce: &Nonce16,
    kind: SdpKind,
) -> [u8; 32] {
    let k = [match kind {
        SdpKind::Offer => 0u8,
        SdpKind::Answer => 1u8,
    }];
    keys.derived_key(b"signal", &[&child.0, &parent.0, &nonce.0, &k])
}

/// Verify, open and check a signalling envelope.
fn open_signal(
    keys: &RoomKeys,
    env: &Envelope,
    kind: Kind,
    from: NodeId,
    to: NodeId,
) -> Result<Signal, String> {
    env.verify_kind(kind, now_ms()).map_err(|e| e.to_string())?;
    if env.signer != from {
        return Err("signal signed by someone else".into());
    }
    let plain = keys.open(kind, &env.payload).map_err(|e| e.to_string())?;
    let s: Signal = wire::decode(&plain).map_err(|e| e.to_string())?;
    if s.from != from || s.to != to {
        return Err("misaddressed signal".into());
    }
    let age = now_ms().saturating_sub(s.ts_ms);
    if age > SIGNAL_MAX_AGE.as_millis() as u64 || s.ts_ms > now_ms() + 5_000 {
        return Err(format!("stale signal ({age} ms old)"));
    }
    Ok(s)
}

/// Attach a child from its offer; returns the signed, sealed answer.
async fn answer_offer(
    node: &Node,
    keys: &RoomKeys,
    media: &Media,
    offer: &Signal,
) -> Result<(ChildId, Envelope), String> {
    let blob = SignalBlob {
        kind: MediaSdpKind::Offer,
        sdp: offer.sdp.clone(),
    };
    let (id, answer) = match media {
        Media::Root(b) => b.attach_child(&blob).await,
        Media::Viewer(v) => v.attach_child(&blob).await,
    }
    .map_err(|e| e.to_string())?;
    let signal = Signal {
        v: wire::VERSION,
        room: offer.room,
        from: offer.to,
        to: offer.from,
        nonce: offer.nonce,
        kind: SdpKind::Answer,
        sdp: answer.sdp,
        ts_ms: now_ms(),
    };
    let env = signal_envelope(node, keys, Kind::Answer, &signal);
    Ok((id, env))
}

/// The slow signalling path: a notice on the room topic, then poll the DHT for the answer.
async fn signal_via_dht(
    node: &Node,
    keys: &RoomKeys,
    room: RoomId,
    me: NodeId,
    parent: NodeId,
    nonce: Nonce16,
    blob_key: [u8; 32],
) -> Result<Envelope, String> {
    let notice = Notice {
        v: wire::VERSION,
        room,
        from: me,
        to: parent,
        nonce,
        kind: SdpKind::Offer,
        blob_key,
    };
    let env = signal_envelope(node, keys, Kind::Notice, &notice);
    node.inner
        .net
        .publish(keys.topic().to_owned(), wire::encode(&env))
        .await
        .map_err(|e| e.to_string())?;
    let akey = signal_key(keys, me, parent, &nonce, SdpKind::Answer);
    let deadline = tokio::time::Instant::now() + SIGNAL_TIMEOUT;
    // Bounded polling: at most SIGNAL_TIMEOUT, every 500 ms.
    while tokio::time::Instant::now() < deadline {
        if let Ok(values) = node
            .inner
            .net
            .get_record(akey.to_vec(), Duration::from_secs(2))
            .await
        {
            for v in values {
                if let Ok(env) = wire::decode::<Envelope>(&v)
                    && env.kind == Kind::Answer
                {
                    return Ok(env);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("no answer from the parent".into())
}

fn open_snapshot(
    keys: &RoomKeys,
    room: RoomId,
    from: NodeId,
    resp: &[u8],
) -> Result<proto::Snapshot, String> {
    let resp: RoomResponse = wire::decode(resp).map_err(|e| e.to_string())?;
    if let Some(e) = resp.error {
        return Err(e);
    }
    let env = resp.env.ok_or("empty snapshot")?;
    env.verify_kind(Kind::Snapshot, now_ms())
        .map_err(|e| e.to_string())?;
    if env.signer != from {
        return Err("snapshot signed by someone else".into());
    }
    let plain = keys
        .open(Kind::Snapshot, &env.payload)
        .map_err(|e| e.to_string())?;
    let s: SnapshotResponse = wire::decode(&plain).map_err(|e| e.to_string())?;
    if s.room != room {
        return Err("snapshot of another room".into());
    }
    Ok(proto::Snapshot {
        candidates: s.candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Identity, KdfParams};

    fn signal_env(
        from: &Identity,
        to: NodeId,
        keys: &RoomKeys,
        ts_ms: u64,
        kind: Kind,
    ) -> Envelope {
        let s = Signal {
            v: wire::VERSION,
            room: RoomId(*keys.locator()),
            from: from.node_id(),
            to,
            nonce: Nonce16([7; 16]),
            kind: SdpKind::Offer,
            sdp: "v=0".into(),
            ts_ms,
        };
        from.seal_envelope(
            kind,
            1,
            now_ms() + 60_000,
            keys.seal(kind, &wire::encode(&s)),
        )
    }

    #[test]
    fn signals_are_checked_for_age_address_signer_and_kind() {
        let keys = RoomKeys::derive("r", Some("pw"), KdfParams::TEST_ONLY).unwrap();
        let child = Identity::generate();
        let parent = NodeId([9; 32]);
        let me = child.node_id();
        let fresh = signal_env(&child, parent, &keys, now_ms(), Kind::Offer);
        assert!(open_signal(&keys, &fresh, Kind::Offer, me, parent).is_ok());
        // Stale.
        let old = signal_env(&child, parent, &keys, now_ms() - 60_000, Kind::Offer);
        let e = open_signal(&keys, &old, Kind::Offer, me, parent).unwrap_err();
        assert!(e.contains("stale"), "{e}");
        // From the future.
        let future = signal_env(&child, parent, &keys, now_ms() + 60_000, Kind::Offer);
        assert!(open_signal(&keys, &future, Kind::Offer, me, parent).is_err());
        // For someone else, from someone else, or of the other kind.
        assert!(open_signal(&keys, &fresh, Kind::Offer, me, NodeId([1; 32])).is_err());
        assert!(open_signal(&keys, &fresh, Kind::Offer, NodeId([1; 32]), parent).is_err());
        assert!(open_signal(&keys, &fresh, Kind::Answer, me, parent).is_err());
        // Another room's key.
        let other = RoomKeys::derive("r", Some("other"), KdfParams::TEST_ONLY).unwrap();
        assert!(open_signal(&other, &fresh, Kind::Offer, me, parent).is_err());
    }

    #[test]
    fn seen_is_bounded_and_detects_replays() {
        let mut s = Seen::default();
        assert!(s.insert([1; 32]));
        assert!(!s.insert([1; 32]));
        for i in 0..(SEEN_CAPACITY as u32 + 10) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 0xEE;
            s.insert(k);
        }
        assert!(s.set.len() <= SEEN_CAPACITY + 1);
        assert_eq!(s.set.len(), s.order.len());
    }
}
