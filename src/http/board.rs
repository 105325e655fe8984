//! The gateway's board: what this node knows of each room it is in, for `/api/status`, the
//! page and `/metrics`.
//!
//! The node's rooms are owned by whoever made them (the CLI's `broadcast` or `watch`, or the
//! gateway's own WHIP and WHEP sessions); each owner holds a [`RoomReport`] and feeds it the
//! room's events and status as they come. The board keeps the latest figures per room (bounded:
//! [`MAX_ROOMS`]) and never asks a room anything itself, so a slow room never delays a status
//! request. Dropping the report takes the room off the board.
//!
//! `/metrics` is rendered from the same snapshot with `prometheus-client` (the crate
//! rust-libp2p's metrics use): a registry is built per scrape from the current values, so
//! there is no second copy of the figures to keep in step.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libp2p::PeerId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use super::feed::Feed;
use crate::media::{MediaEvent, MediaStats};
use crate::net::NetStatus;
use crate::node::{RoomEvent, RoomStatus};

/// Rooms on the board at most (one node is in a handful).
pub const MAX_ROOMS: usize = 64;

/// This node's part in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// The root: it broadcasts (from files, a pipe or a WHIP publisher).
    Broadcaster,
    /// A member of the tree below the root.
    Viewer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Broadcaster => "broadcaster",
            Role::Viewer => "viewer",
        }
    }
}

/// What the board holds of one room.
#[derive(Debug, Clone)]
struct Entry {
    role: Role,
    /// Who made it: "cli", "whip" or "whep".
    origin: &'static str,
    status: RoomStatus,
    stats: MediaStats,
    /// Parent changes after the first join (repairs and rebalancing).
    repairs: u64,
    first_video_ms: Option<u64>,
    password: Option<String>,
    feed: Option<Feed>,
    since: Instant,
    /// The room's end was seen.
    ended: bool,
}

#[derive(Default)]
struct Inner {
    rooms: BTreeMap<String, Entry>,
    /// Connections by ICE path ("direct", "hole-punched", "turn", "unknown").
    paths: BTreeMap<String, u64>,
    whip_sessions: u64,
    whep_players: u64,
}

/// The board, shared by the gateway and the room owners. Cheap to clone.
#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("rooms", &self.lock().rooms.len())
            .finish()
    }
}

/// The board is full ([`MAX_ROOMS`]) or already shows the room.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BoardError {
    /// The room is on the board already (this node is in it).
    #[error("this node is already in room {0:?}")]
    Taken(String),
    /// Too many rooms.
    #[error("too many rooms on this node (at most {MAX_ROOMS})")]
    Full,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put a room on the board; the report keeps it there until dropped. `password` is what
    /// local players of this room use when their request carries none (the owner's password).
    pub fn report(
        &self,
        room: &str,
        role: Role,
        password: Option<String>,
    ) -> Result<RoomReport, BoardError> {
        self.report_from(room, role, password, "cli")
    }

    pub(crate) fn report_from(
        &self,
        room: &str,
        role: Role,
        password: Option<String>,
        origin: &'static str,
    ) -> Result<RoomReport, BoardError> {
        let mut g = self.lock();
        if g.rooms.contains_key(room) {
            return Err(BoardError::Taken(room.to_owned()));
        }
        if g.rooms.len() >= MAX_ROOMS {
            return Err(BoardError::Full);
        }
        g.rooms.insert(
            room.to_owned(),
            Entry {
                role,
                origin,
                status: RoomStatus {
                    depth: (role == Role::Broadcaster).then_some(0),
                    ..Default::default()
                },
                stats: MediaStats::default(),
                repairs: 0,
                first_video_ms: None,
                password,
                feed: None,
                since: Instant::now(),
                ended: false,
            },
        );
        Ok(RoomReport {
            board: self.clone(),
            room: room.to_owned(),
        })
    }

    /// Whether this node is in `room`.
    pub fn has(&self, room: &str) -> bool {
        self.lock().rooms.contains_key(room)
    }

    /// The feed of `room` for local players, if its owner gave one, and the owner's password.
    pub(crate) fn feed(&self, room: &str) -> Option<(Feed, Option<String>)> {
        let g = self.lock();
        let e = g.rooms.get(room)?;
        Some((e.feed.clone()?, e.password.clone()))
    }

    /// Count a connection's ICE path (from the node's ICE notices).
    pub fn count_path(&self, path: crate::media::peer::IcePath) {
        *self.lock().paths.entry(path.to_string()).or_insert(0) += 1;
    }

    pub(crate) fn sessions_changed(&self, whip: i64, whep: i64) {
        let mut g = self.lock();
        g.whip_sessions = g.whip_sessions.saturating_add_signed(whip);
        g.whep_players = g.whep_players.saturating_add_signed(whep);
    }

    /// `/api/status`: this node, its network and every room on the board.
    pub(crate) fn status_json(&self, me: PeerId, net: Option<&NetStatus>) -> Value {
        let g = self.lock();
        let rooms: Vec<Value> = g
            .rooms
            .iter()
            .map(|(name, e)| {
                json!({
                    "name": name,
                    "role": e.role.name(),
                    "origin": e.origin,
                    "parent": e.status.parent.map(|p| p.to_string()),
                    "depth": e.status.depth,
                    "children": e.status.children.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                    "capacity": e.status.capacity,
                    "bitrate_bps": e.stats.bitrate_bps,
                    "bytes_in": e.stats.bytes_in,
                    "packets_in": e.stats.packets_in,
                    "packets_forwarded": e.stats.packets_forwarded,
                    "video_frames": e.stats.video_frames,
                    "audio_frames": e.stats.audio_frames,
                    "gaps": e.stats.gaps,
                    "frames_dropped": e.stats.frames_dropped,
                    "repairs": e.repairs,
                    "first_video_ms": e.first_video_ms,
                    "players": e.feed.as_ref().map(Feed::players).unwrap_or(0),
                    "age_s": e.since.elapsed().as_secs(),
                    "ended": e.ended,
                })
            })
            .collect();
        json!({
            "peer_id": me.to_string(),
            "net": net.map(|n| json!({
                "peers": n.peers,
                "dht_peers": n.dht_peers,
                "dht_records": n.dht_records,
                "reachability": n.reachability.to_string(),
                "relay_serving": n.relay_serving,
            })),
            "paths": g.paths,
            "whip_sessions": g.whip_sessions,
            "whep_players": g.whep_players,
            "rooms": rooms,
        })
    }

    /// `/metrics` in the Prometheus text format.
    pub(crate) fn metrics_text(&self, net: Option<&NetStatus>) -> String {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct RoomLabel {
            room: String,
            role: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct PathLabel {
            path: String,
        }
        let mut reg = Registry::with_prefix("waterfall");
        let gauge = |reg: &mut Registry, name: &str, help: &str, v: i64| {
            let g: Gauge = Gauge::default();
            g.set(v);
            reg.register(name, help, g);
        };
        if let Some(n) = net {
            gauge(&mut reg, "peers", "Connected libp2p peers", n.peers as i64);
            gauge(
                &mut reg,
                "dht_peers",
                "Peers in the waterfall DHT routing table",
                n.dht_peers as i64,
            );
            gauge(
                &mut reg,
                "dht_records",
                "Records in the local DHT store",
                n.dht_records as i64,
            );
        }
        let g = self.lock();
        gauge(
            &mut reg,
            "rooms",
            "Rooms this node is in",
            g.rooms.len() as i64,
        );
        gauge(
            &mut reg,
            "whip_sessions",
            "WHIP publishers connected to this node",
            g.whip_sessions as i64,
        );
        gauge(
            &mut reg,
            "whep_players",
            "WHEP players served by this node",
            g.whep_players as i64,
        );
        let children = Family::<RoomLabel, Gauge>::default();
        let depth = Family::<RoomLabel, Gauge>::default();
        let bitrate = Family::<RoomLabel, Gauge>::default();
        let bytes_in = Family::<RoomLabel, Counter>::default();
        let forwarded = Family::<RoomLabel, Counter>::default();
        let frames = Family::<RoomLabel, Counter>::default();
        let gaps = Family::<RoomLabel, Counter>::default();
        let repairs = Family::<RoomLabel, Counter>::default();
        for (name, e) in &g.rooms {
            let l = RoomLabel {
                room: name.clone(),
                role: e.role.name().to_owned(),
            };
            children
                .get_or_create(&l)
                .set(e.status.children.len() as i64);
            depth
                .get_or_create(&l)
                .set(e.status.depth.map(i64::from).unwrap_or(-1));
            bitrate.get_or_create(&l).set(e.stats.bitrate_bps as i64);
            bytes_in.get_or_create(&l).inc_by(e.stats.bytes_in);
            forwarded
                .get_or_create(&l)
                .inc_by(e.stats.packets_forwarded);
            frames.get_or_create(&l).inc_by(e.stats.video_frames);
            gaps.get_or_create(&l).inc_by(e.stats.gaps);
            repairs.get_or_create(&l).inc_by(e.repairs);
        }
        reg.register("room_children", "Children this node relays to", children);
        reg.register(
            "room_depth",
            "Depth in the room's tree (-1: detached)",
            depth,
        );
        reg.register(
            "room_bitrate_bps",
            "Inbound (or produced) media bitrate",
            bitrate,
        );
        reg.register(
            "room_bytes_in",
            "RTP payload bytes received or produced",
            bytes_in,
        );
        reg.register(
            "room_packets_relayed",
            "RTP packets handed to children",
            forwarded,
        );
        reg.register("room_video_frames", "Video frames played", frames);
        reg.register("room_gaps", "Packets lost and not repaired in time", gaps);
        reg.register(
            "room_repairs",
            "Parent changes after joining (repairs, rebalancing)",
            repairs,
        );
        let paths = Family::<PathLabel, Counter>::default();
        for (p, n) in &g.paths {
            paths
                .get_or_create(&PathLabel { path: p.clone() })
                .inc_by(*n);
        }
        reg.register("ice_connections", "WebRTC connections by ICE path", paths);
        drop(g);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

/// A room's place on the board, held by the room's owner: it passes the room's events and
/// status in. Dropping it takes the room off the board.
#[derive(Debug)]
pub struct RoomReport {
    board: Board,
    room: String,
}

impl RoomReport {
    fn with(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.board.lock().rooms.get_mut(&self.room) {
            f(e)
        }
    }

    /// The room's name.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// Take in one of the room's events.
    pub fn event(&self, ev: &RoomEvent) {
        self.with(|e| match ev {
            RoomEvent::Joined { parent, depth } => {
                e.status.parent = Some(*parent);
                e.status.depth = Some(*depth);
            }
            RoomEvent::ParentChanged { new, .. } | RoomEvent::Rejoined { parent: new, .. } => {
                e.status.parent = Some(*new);
                e.repairs += 1;
            }
            RoomEvent::DepthChanged { depth } => e.status.depth = *depth,
            RoomEvent::Orphaned { .. } => e.status.parent = None,
            RoomEvent::ChildAdded(c) if !e.status.children.contains(c) => {
                e.status.children.push(*c);
            }
            RoomEvent::ChildRemoved(c) => e.status.children.retain(|x| x != c),
            RoomEvent::Media(MediaEvent::Stats(s)) => e.stats = *s,
            RoomEvent::Media(MediaEvent::FirstFrame { kind, after })
                if *kind == crate::media::MediaKind::Video =>
            {
                e.first_video_ms = Some(after.as_millis() as u64);
            }
            RoomEvent::BroadcastEnded | RoomEvent::BroadcasterLost | RoomEvent::Ended => {
                e.ended = true;
            }
            _ => {}
        });
    }

    /// Take in the room's status (parent, depth, children, capacity), as the room tells it.
    pub fn status(&self, s: &RoomStatus) {
        self.with(|e| {
            e.status = s.clone();
            if e.role == Role::Broadcaster {
                e.status.depth = Some(0);
            }
        });
    }

    /// Local players of this room take their frames from `feed`.
    pub fn feed(&self, feed: Feed) {
        self.with(|e| e.feed = Some(feed));
    }
}

impl Drop for RoomReport {
    /// The room leaves the board; its local players end with it.
    fn drop(&mut self) {
        let gone = self.board.lock().rooms.remove(&self.room);
        if let Some(f) = gone.and_then(|e| e.feed) {
            f.end();
        }
    }
}
