//! What an application sees of a room: its configuration, its events and its handle.
//!
//! These types are kept together because they are the public surface of a room: the
//! room handles talk to the room task only through its bounded input queue, and reads what
//! happens from a bounded event queue (new events are dropped, never the room stalled, when
//! the application does not read). Each role has its own handle: [`Broadcast`] for the root,
//! [`Watch`] for a viewer; the events come once, with the handle, as a [`RoomEvents`] stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::LEAVE_TIMEOUT;
use super::task::Input;
use crate::crypto::RoomKeys;
use crate::media::{Broadcaster, MediaEvent, MediaSource, Sinks};
use crate::node::{Node, NodeError};
use crate::proto;
use crate::wire::Ticket;

/// What to broadcast: built with [`RoomConfig::new`] and its setters.
///
/// ```no_run
/// # use waterfall::{RoomConfig, FileSource, MediaSource, SourceOptions};
/// # fn f(video: Box<dyn MediaSource>) {
/// let cfg = RoomConfig::new("standup").password("secret").fanout(4).source(video);
/// # }
/// ```
pub struct RoomConfig {
    pub(crate) name: String,
    pub(crate) password: Option<String>,
    pub(crate) sources: Vec<Box<dyn MediaSource>>,
    pub(crate) data: bool,
    pub(crate) fanout: u16,
    pub(crate) bitrate_kbps: u32,
    pub(crate) tree: proto::Config,
    pub(crate) autostart: bool,
}

impl RoomConfig {
    /// A room with defaults: public (no password), fanout 4, 1 Mbit/s, a data channel, sources
    /// started at once.
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
    /// The room's password (without one the room is public).
    pub fn password(mut self, pw: impl Into<String>) -> Self {
        self.password = Some(pw.into());
        self
    }
    /// Add a media source (at most one video and one audio).
    pub fn source(mut self, s: Box<dyn MediaSource>) -> Self {
        self.sources.push(s);
        self
    }
    /// Children per relay the room aims for (default 4).
    pub fn fanout(mut self, k: u16) -> Self {
        self.fanout = k;
        self
    }
    /// Whether a data channel runs beside the media (default on).
    pub fn data(mut self, on: bool) -> Self {
        self.data = on;
        self
    }
    /// The stream's bitrate in kbit/s (default 1000): a relay's capacity is its uplink divided
    /// by it when no maximum is set.
    pub fn bitrate_kbps(mut self, kbps: u32) -> Self {
        self.bitrate_kbps = kbps;
        self
    }
    /// Tree tunables (the defaults are right for real use; tests shorten them).
    pub fn tree(mut self, cfg: proto::Config) -> Self {
        self.tree = cfg;
        self
    }
    /// Start reading the sources at once (default), or wait for [`Broadcast::start`], e.g. until
    /// the first viewers are attached so that they get every frame from the first.
    pub fn autostart(mut self, on: bool) -> Self {
        self.autostart = on;
        self
    }
    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
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
    /// A ticket printed by the broadcaster: pins the broadcaster, carries its addresses, and
    /// tells a wrong password from a room that is gone.
    Ticket(Ticket),
    /// A room name, looked up in the DHT.
    Name(String),
}

impl From<Ticket> for WatchTarget {
    fn from(t: Ticket) -> Self {
        WatchTarget::Ticket(t)
    }
}

/// How to watch: built with [`WatchConfig::new`] and its setters.
#[derive(Debug, Clone, Default)]
pub struct WatchConfig {
    pub(crate) password: Option<String>,
    pub(crate) sinks: Sinks,
    pub(crate) tree: Option<proto::Config>,
}

impl WatchConfig {
    /// No password (a public room), nothing written, default tree tunables.
    pub fn new() -> Self {
        Self::default()
    }
    /// The room's password.
    pub fn password(mut self, pw: impl Into<String>) -> Self {
        self.password = Some(pw.into());
        self
    }
    /// The password, if any (`None` for a public room).
    pub fn password_opt(mut self, pw: Option<String>) -> Self {
        self.password = pw;
        self
    }
    /// Where to write what arrives.
    pub fn sinks(mut self, sinks: Sinks) -> Self {
        self.sinks = sinks;
        self
    }
    /// Tree tunables (the defaults are right for real use; tests shorten them).
    pub fn tree(mut self, cfg: proto::Config) -> Self {
        self.tree = Some(cfg);
        self
    }
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
    /// Our media could not reach this parent (ICE failed, or was not connected within the
    /// room's bound): we leave it, repair elsewhere and do not try it again for a while.
    /// `timed_out` tells the two apart.
    ParentUnreachable { parent: PeerId, timed_out: bool },
    /// This host's network changed (an address came or went): the media connection to the
    /// parent restarted ICE in place (`restarted`), keeping this node's place and children; or
    /// the restart failed (`error` says why) and the parent is repaired as if lost.
    IceRestart {
        parent: PeerId,
        restarted: bool,
        error: Option<String>,
    },
    /// A child was accepted.
    ChildAdded(PeerId),
    /// A child left or was lost.
    ChildRemoved(PeerId),
    /// Something from the media session (first frame, stats, decrypt failures...).
    Media(MediaEvent),
    /// The broadcaster ended the broadcast (its signed notice arrived, or the room record says
    /// so). The room closes: [`RoomEvent::Ended`] follows once the files are finalized.
    BroadcastEnded,
    /// The addresses in this broadcaster's ticket changed (an address confirmed, a relay
    /// reservation made or lost): the room record already carries them; hand the new ticket
    /// to viewers who have not joined yet (old tickets still work while their addresses do).
    TicketChanged(Ticket),
    /// The broadcaster vanished without ending the broadcast (it crashed, or is cut off): no
    /// media from it and no answer from it for a grace period. The room closes:
    /// [`RoomEvent::Ended`] follows once the files are finalized.
    BroadcasterLost,
    /// The room ended (we left, or the broadcast is over); the files are finalized.
    Ended,
    /// Several signers claim this room's name (looked up by name): the one watched is
    /// [`NameContest::chosen`](crate::node::NameContest), pinned or only the freshest (then a
    /// ticket is the way to be sure).
    NameContested(crate::node::NameContest),
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

/// What happens in a room, as a [`Stream`] of [`RoomEvent`]s: handed out once, with the room's
/// handle, by [`Node::broadcast`] and [`Node::watch`]. The queue behind it is bounded: when the
/// application does not read, new events are dropped (the room never stalls). The stream ends
/// after [`RoomEvent::Ended`].
#[derive(Debug)]
pub struct RoomEvents {
    rx: mpsc::Receiver<RoomEvent>,
}

impl RoomEvents {
    /// The next event (`None` once the room has ended).
    pub async fn recv(&mut self) -> Option<RoomEvent> {
        self.rx.recv().await
    }

    /// An event already queued, without waiting (`None` when there is none right now).
    pub fn try_recv(&mut self) -> Option<RoomEvent> {
        self.rx.try_recv().ok()
    }
}

impl Stream for RoomEvents {
    type Item = RoomEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RoomEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// What [`Node::broadcast`] and [`Node::watch`] assemble a handle from.
pub(super) struct HandleParts {
    pub(super) tx: mpsc::Sender<Input>,
    pub(super) events: mpsc::Receiver<RoomEvent>,
    pub(super) keys: RoomKeys,
    pub(super) node: Node,
}

/// What both handles share: the room task's input queue. Dropping it leaves the room.
struct RoomLink {
    tx: mpsc::Sender<Input>,
    keys: RoomKeys,
    _node: Node,
}

impl RoomLink {
    async fn status(&self) -> Result<RoomStatus, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Status(tx))
            .await
            .map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| NodeError::Closed)
    }

    async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Input::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(LEAVE_TIMEOUT, rx).await;
        }
    }
}

impl Drop for RoomLink {
    /// Dropping the handle leaves the room (gracefully, in the background); once every room
    /// handle and every `Node` clone is gone, the node stops.
    fn drop(&mut self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.tx.try_send(Input::Leave(tx));
    }
}

impl HandleParts {
    fn split(self) -> (RoomLink, RoomEvents) {
        (
            RoomLink {
                tx: self.tx,
                keys: self.keys,
                _node: self.node,
            },
            RoomEvents { rx: self.events },
        )
    }
}

/// A room this node broadcasts into (the root of its tree). Dropping it ends the broadcast.
pub struct Broadcast {
    link: RoomLink,
    ticket: Ticket,
    media: Arc<Broadcaster>,
}

impl std::fmt::Debug for Broadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broadcast")
            .field("room", &self.link.keys.name())
            .finish_non_exhaustive()
    }
}

impl Broadcast {
    pub(super) fn new(
        parts: HandleParts,
        ticket: Ticket,
        media: Arc<Broadcaster>,
    ) -> (Self, RoomEvents) {
        let (link, events) = parts.split();
        (
            Broadcast {
                link,
                ticket,
                media,
            },
            events,
        )
    }

    /// The ticket viewers paste to watch (it pins this broadcaster and carries its addresses
    /// as they were when the broadcast started; [`RoomEvent::TicketChanged`] carries later
    /// ones).
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// The room's keys.
    pub fn keys(&self) -> &RoomKeys {
        &self.link.keys
    }

    /// Send an application message down the tree, over the data channel, to every viewer.
    pub fn send_data(&self, msg: &[u8]) -> Result<(), NodeError> {
        Ok(self.media.send_data(msg)?)
    }

    /// Start the media sources (once; only needed with [`RoomConfig::autostart`] off).
    pub fn start(&self) {
        self.media.start();
    }

    /// Current tree position (the root: depth 0, its children).
    pub async fn status(&self) -> Result<RoomStatus, NodeError> {
        self.link.status().await
    }

    /// End the broadcast gracefully: viewers are told, the room record is ended.
    pub async fn leave(self) {
        self.link.leave().await
    }
}

/// A room this node watches (and relays to its children). Dropping it leaves the room.
pub struct Watch {
    link: RoomLink,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("room", &self.link.keys.name())
            .finish_non_exhaustive()
    }
}

impl Watch {
    pub(super) fn new(parts: HandleParts) -> (Self, RoomEvents) {
        let (link, events) = parts.split();
        (Watch { link }, events)
    }

    /// The room's keys.
    pub fn keys(&self) -> &RoomKeys {
        &self.link.keys
    }

    /// Current tree position: parent, depth, children.
    pub async fn status(&self) -> Result<RoomStatus, NodeError> {
        self.link.status().await
    }

    /// Ask the parent for a keyframe now (coalesced with other requests): for a program that
    /// starts consuming the frames mid-stream ([`crate::media::SinkTarget::Frames`]). Dropped
    /// when the room's input queue is full.
    pub fn request_keyframe(&self) {
        let _ = self.link.tx.try_send(Input::RequestKeyframe);
    }

    /// Leave gracefully: children and parent are told, files are finalized.
    pub async fn leave(self) {
        self.link.leave().await
    }
}
