//! One room on one node: the shell that runs the room layer ([`RoomNode`]) over the network and
//! the media session.
//!
//! Every rule of the room lives in [`crate::proto::room`] and [`crate::proto::tree`], pure and run
//! by the simulator too; this module does the I/O they ask for. The room task (`task.rs`) owns a
//! [`RoomNode`] and a media session (a [`Broadcaster`] at the root, a [`Viewer`] elsewhere), feeds
//! it what the swarm and the media session report, and executes its outputs:
//!
//! | output | action |
//! |---|---|
//! | `SendControl{to, msg}` | a sealed, signed [`Control`](crate::wire::Control) in a direct request, queued per peer (in order) |
//! | `Publish{update, to}` | the signed update to each tree neighbour (wall-clock `ts_ms`) |
//! | `RequestSnapshot{from}` | a snapshot request to that member; the answer (or an empty one) goes back |
//! | `ConnectParent{peer}` | WebRTC offer -> signalling -> answer (`signal.rs`) |
//! | `AcceptChild{peer}` | the child's offer will be answered when it arrives |
//! | `Disconnect{peer}` | close that child's media connection |
//! | `Probe{peer}` | a small request; its answer or failure goes back |
//! | `SendEnd{to}` | the broadcaster's signed end notice to each child (and, at the root, on the room topic) |
//! | `CheckRecord` | a DHT lookup of the room record: live, or ended |
//! | `Emit(event)` | a [`RoomEvent`] for the application |
//! | `Close` | the room is over: leave, finalize the files |
//!
//! Files: `api.rs` holds the public types (configuration, events, the handle), `registry.rs`
//! routes what the swarm delivers to the right room, `task.rs` is the loop, `checks.rs` verifies
//! requests and gossip before anything reaches the room layer, `signal.rs` carries offers and
//! answers.
//! Every task a room spawns belongs to the room's `JoinSet`, so leaving (or a crash) stops them
//! all; the room's work runs in a `room` tracing span.

mod api;
mod checks;
mod registry;
mod signal;
mod task;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

pub use api::{
    Broadcast, RoomConfig, RoomEvent, RoomEvents, RoomStatus, Watch, WatchConfig, WatchTarget,
};
pub(crate) use registry::Rooms;
pub use signal::SIGNAL_MAX_AGE;

use super::{Node, NodeError, ROOM_LIVENESS, ticket_check};
use crate::crypto::{RoomKeys, now_ms, random_bytes};
use crate::media::{Broadcaster, MediaEvent, MediaKey, Viewer};
use crate::proto::{NodeId, RoomNode, RoomTimings, TreeNode};
use crate::wire::{self, RoomId, RoomRecord, Ticket, TrackInfo, TrackKind};

/// Inputs queued per room.
const ROOM_INPUT_QUEUE: usize = 512;
/// Events queued for the application; the oldest are dropped when it does not read.
const ROOM_EVENT_QUEUE: usize = 256;

/// The media side of a room.
#[derive(Clone)]
pub(crate) enum Media {
    Root(Arc<Broadcaster>),
    Viewer(Arc<Viewer>),
}

/// What a room task starts from.
struct RoomStart {
    keys: RoomKeys,
    room: RoomNode,
    media: Media,
    media_events: mpsc::Receiver<MediaEvent>,
    /// The record, at the broadcaster.
    record: Option<RoomRecord>,
    /// The broadcast's creation time (its session: end notices name it).
    session: u64,
    /// Queued before anything else happens in the room (what the lookup found out).
    first_event: Option<RoomEvent>,
}

impl Node {
    /// Create a room and broadcast into it. Returns the room's handle and its events (once).
    pub async fn broadcast(&self, cfg: RoomConfig) -> Result<(Broadcast, RoomEvents), NodeError> {
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
        )?;
        let bc = Arc::new(bc);
        let addrs: Vec<String> = self.addrs().await?.iter().map(|a| a.to_string()).collect();
        let me = self.inner.identity.node_id();
        let created_ms = now_ms();
        let record = RoomRecord {
            v: wire::VERSION,
            broadcaster: me,
            addrs: addrs.clone(),
            tracks,
            data: cfg.data,
            fanout: cfg.fanout,
            bitrate_kbps: cfg.bitrate_kbps,
            created_ms,
            expires_ms: created_ms + ROOM_LIVENESS.as_millis() as u64,
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
        let parts = self
            .start_room(RoomStart {
                keys,
                room: RoomNode::new(tree, me, RoomTimings::default()),
                media: Media::Root(bc.clone()),
                media_events,
                record: Some(record),
                session: created_ms,
                first_event: None,
            })
            .await?;
        if cfg.autostart {
            bc.start();
        }
        Ok(Broadcast::new(parts, ticket, bc))
    }

    /// Join a room as a viewer.
    pub async fn watch(
        &self,
        target: impl Into<WatchTarget>,
        cfg: WatchConfig,
    ) -> Result<(Watch, RoomEvents), NodeError> {
        let target = target.into();
        let password = cfg.password.as_deref();
        let (name, ticket) = match &target {
            WatchTarget::Ticket(t) => (t.room.clone(), Some(t)),
            WatchTarget::Name(n) => (n.clone(), None),
        };
        let keys = self.room_keys(&name, password).await?;
        let found = self.lookup_room_claims(&keys, ticket).await?;
        let first_event = found.contest.map(|c| {
            tracing::warn!("{c}");
            RoomEvent::NameContested(c)
        });
        let record = found.record;
        // Reach the broadcaster (its addresses are in the record) so the snapshot request and the
        // DHT have a path.
        if let Some(peer) = peer(record.broadcaster) {
            super::addrs::dial_all(&self.inner.net, &record.addrs, peer).await;
        }
        let (viewer, media_events) = Viewer::new(
            MediaKey::new(*keys.media_key().expose()),
            cfg.sinks,
            self.inner.media.clone(),
        );
        let mut tree_cfg = cfg.tree.clone().unwrap_or_default();
        tree_cfg.max_children = Some(self.inner.max_children.unwrap_or(record.fanout));
        tree_cfg.stream_kbps = record.bitrate_kbps;
        let me = self.inner.identity.node_id();
        let tree = TreeNode::new(me, tree_cfg, u64::from_le_bytes(random_bytes()));
        self.start_room(RoomStart {
            keys,
            room: RoomNode::new(tree, record.broadcaster, RoomTimings::default()),
            media: Media::Viewer(Arc::new(viewer)),
            media_events,
            record: None,
            session: record.created_ms,
            first_event,
        })
        .await
        .map(Watch::new)
    }

    async fn start_room(&self, start: RoomStart) -> Result<api::HandleParts, NodeError> {
        let RoomStart {
            keys,
            room,
            media,
            media_events,
            record,
            session,
            first_event,
        } = start;
        let role = if record.is_some() {
            "broadcaster"
        } else {
            "viewer"
        };
        let room_id = RoomId(*keys.locator());
        let (tx, rx) = mpsc::channel(ROOM_INPUT_QUEUE);
        if !self
            .inner
            .rooms
            .insert(room_id, keys.topic().to_owned(), tx.clone())
        {
            return Err(NodeError::AlreadyJoined(keys.name().to_owned()));
        }
        self.inner.topics.insert(keys.clone());
        if let Err(e) = self.inner.net.subscribe(keys.topic().to_owned()).await {
            self.inner.rooms.remove(&room_id);
            self.inner.topics.remove(keys.topic());
            return Err(e.into());
        }
        let record_env = match &record {
            Some(r) => match self.publish_record(&keys, r).await {
                Ok(env) => Some(env),
                Err(e) => {
                    self.inner.rooms.remove(&room_id);
                    self.inner.topics.remove(keys.topic());
                    return Err(e);
                }
            },
            None => None,
        };
        let (ev_tx, ev_rx) = mpsc::channel(ROOM_EVENT_QUEUE);
        if let Some(ev) = first_event {
            let _ = ev_tx.try_send(ev);
        }
        let span = tracing::info_span!(
            "room",
            name = %keys.name(),
            role,
            me = %self.peer_id(),
        );
        let task = task::RoomTask::new(task::TaskParts {
            node: self.clone(),
            keys: keys.clone(),
            room_id,
            room,
            media,
            record,
            record_env,
            session,
            inputs_tx: tx.clone(),
            events: ev_tx,
        });
        let h = tokio::spawn(task.run(rx, media_events).instrument(span));
        self.inner.rooms.set_task(room_id, h.abort_handle());
        Ok(api::HandleParts {
            tx,
            events: ev_rx,
            keys,
            node: self.clone(),
        })
    }
}

/// How long a room may take to leave (telling its neighbours, ending its record).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The digest remembered by the replay window: SHA-256 of a signature or nonce.
fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// A peer's libp2p id, for the application's events (logged and skipped if the key is invalid,
/// which our own tree never produces: it only names peers whose envelopes verified).
fn peer(id: NodeId) -> Option<libp2p::PeerId> {
    crate::net::peer_of(id)
}
