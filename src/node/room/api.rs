//! What an application sees of a room: its configuration, its events and its handle.
//!
//! These types are kept together because they are the public surface of a room: the
//! [`RoomHandle`] talks to the room task only through its bounded input queue, and reads what
//! happens from a bounded event queue (the oldest events are dropped, never the room stalled,
//! when the application does not read).

use std::sync::Arc;

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::LEAVE_TIMEOUT;
use super::task::Input;
use crate::crypto::RoomKeys;
use crate::media::{Broadcaster, MediaEvent, MediaSource, Sinks};
use crate::node::{Node, NodeError};
use crate::proto;
use crate::wire::Ticket;

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
    /// The broadcaster ended the broadcast (its signed notice arrived, or the room record says
    /// so). The room closes: [`RoomEvent::Ended`] follows once the files are finalized.
    BroadcastEnded,
    /// The room ended (we left, or the broadcast is over); the files are finalized.
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

/// What [`super::Node::broadcast`] and [`super::Node::watch`] assemble a handle from.
pub(super) struct HandleParts {
    pub(super) tx: mpsc::Sender<Input>,
    pub(super) events: mpsc::Receiver<RoomEvent>,
    pub(super) ticket: Option<Ticket>,
    pub(super) role: RoomRole,
    pub(super) broadcaster: Option<Arc<Broadcaster>>,
    pub(super) keys: RoomKeys,
    pub(super) node: Node,
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
    pub(super) fn new(p: HandleParts) -> Self {
        RoomHandle {
            tx: p.tx,
            events: Some(p.events),
            ticket: p.ticket,
            role: p.role,
            broadcaster: p.broadcaster,
            keys: p.keys,
            _node: p.node,
        }
    }

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
            Some(b) => Ok(b.send_data(msg)?),
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
            let _ = tokio::time::timeout(LEAVE_TIMEOUT, rx).await;
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
