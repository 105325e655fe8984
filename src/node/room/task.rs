//! The room task: one loop that feeds the room layer ([`RoomNode`]) and executes its outputs.
//!
//! Each turn of the loop takes one thing that happened (an input from the swarm or the handle, a
//! media event, the room layer's deadline, the record refresh, a finished subtask), hands it to
//! the room layer with `handle_*`, then drains [`RoomNode::poll_output`] and executes every
//! output (the table in the [module docs](super)), then sleeps until the next input or
//! [`RoomNode::poll_timeout`] -- the call order the room layer documents. Nothing here decides
//! anything about the tree or the room's rules; it seals, signs, sends, and reports back.
//!
//! Work that waits on the network (requests, signalling, lookups) runs in subtasks owned by the
//! room's `JoinSet`, which the loop reaps; they report back through the room's own input queue.
//! Control messages to one peer go through one queue per peer (in order, bounded), so a slow
//! peer delays only its own messages. When the room ends (left, or the broadcast is over) the
//! task tells its neighbours, waits a moment for the queues to drain, stops every subtask,
//! finalizes the files, and only then reports [`RoomEvent::Ended`].
//!
//! About 900 lines: the loop, one executor per kind of room output, and the viewer's watch on the
//! broadcaster's liveness, all working on the task's one state; split along outputs, each file
//! would reach into the same struct.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::api::{RoomEvent, RoomStatus};
use super::checks::{self, Checked, Refusal, ok_response, open_snapshot, refusal};
use super::signal::{self, SignalCtx, SignalError};
use super::{Media, digest, peer};
use crate::crypto::{Kind, RoomKeys, now_ms};
use crate::media::session::CutReason;
use crate::media::{ChildId, MediaEvent};
use crate::net::{Net, ResponseHandle, node_of, peer_of};
use crate::node::addrs::{AddrChanges, next_change};
use crate::node::{Node, ROOM_LIVENESS, ROOM_REFRESH};
use crate::proto::room::{EndCause, LinkCause, RoomEvent as CoreEvent};
use crate::proto::{Millis, NodeId, RoomNode, RoomOutput, Snapshot, TreeEvent, TreeUpdate};
use crate::wire::{
    self, BroadcastEnd, Control, Envelope, Notice, RoomId, RoomRecord, RoomRequest, SdpKind,
    SnapshotRequest, SnapshotResponse, Versioned,
};

/// Control messages queued per peer.
const PEER_SEND_QUEUE: usize = 64;
/// Peers with a control queue at once (tree neighbours, join candidates, joiners).
const MAX_PEER_QUEUES: usize = 128;
/// Subtasks of one room at once; beyond it, new work (an offer to answer) is refused as busy.
const MAX_ROOM_TASKS: usize = 512;
/// Time allowed for a control message request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Control envelopes expire after this (bounds the replay window).
const CONTROL_TTL: Duration = Duration::from_secs(30);
/// Candidates in a snapshot.
const SNAPSHOT_MAX: u16 = 16;
/// How long a leaving room waits for its queues to drain and for its record to be ended.
const LEAVE_GRACE: Duration = Duration::from_secs(2);

/// Inputs of a room task.
pub(crate) enum Input {
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
    Snapshot(Snapshot),
    Probe {
        peer: NodeId,
        answered: bool,
    },
    ParentSignalled {
        parent: NodeId,
        result: Result<(), SignalError>,
    },
    /// An ICE restart with the parent (after a network change) ended.
    ParentRestarted {
        parent: NodeId,
        result: Result<(), SignalError>,
    },
    ChildAttached {
        child: NodeId,
        id: ChildId,
    },
    RecordChecked {
        live: bool,
    },
    /// Whether the broadcaster answered a direct request (see [`SourceWatch`]).
    BroadcasterProbed {
        reachable: bool,
    },
    Status(oneshot::Sender<RoomStatus>),
    /// A local consumer of the frames needs a keyframe ([`super::Watch::request_keyframe`]).
    RequestKeyframe,
    Leave(oneshot::Sender<()>),
}

/// What a room task is made of.
pub(super) struct TaskParts {
    pub node: Node,
    pub keys: RoomKeys,
    pub room_id: RoomId,
    pub room: RoomNode,
    pub media: Media,
    pub record: Option<RoomRecord>,
    pub record_env: Option<Envelope>,
    pub session: u64,
    pub inputs_tx: mpsc::Sender<Input>,
    pub events: mpsc::Sender<RoomEvent>,
}

pub(super) struct RoomTask {
    node: Node,
    net: Net,
    keys: RoomKeys,
    room_id: RoomId,
    me: NodeId,
    room: RoomNode,
    media: Media,
    /// The record, at the broadcaster (refreshed, and ended when it leaves).
    record: Option<RoomRecord>,
    /// The signed, sealed record as last published (served to ticket holders directly).
    record_env: Option<Envelope>,
    /// The broadcast's creation time: end notices must name it.
    session: u64,
    /// The broadcaster's end notice (made at the root, verified at a viewer), sent to children.
    end_env: Option<Envelope>,
    epoch: Instant,
    inputs_tx: mpsc::Sender<Input>,
    events: mpsc::Sender<RoomEvent>,
    senders: HashMap<NodeId, mpsc::Sender<Vec<u8>>>,
    /// The media session's ids of the children whose media is connected.
    children: BTreeMap<NodeId, ChildId>,
    /// Sequence of the envelopes this room signs.
    seq: u64,
    tasks: JoinSet<()>,
    /// The room layer closed the room: leave.
    closing: bool,
    /// At the broadcaster: our addresses, so the record and ticket follow them.
    addr_changes: Option<AddrChanges>,
    /// This host's network changes (see `netwatch`): the parent connection restarts ICE.
    net_changes: tokio::sync::watch::Receiver<u64>,
    /// Is the broadcaster still there? (viewers)
    source: SourceWatch,
}

/// Media silent this long (no packet reached this viewer) makes a viewer ask whether the
/// broadcaster is still there.
const SOURCE_SILENT: Duration = Duration::from_secs(3);
/// The broadcaster silent and unreachable this long is gone: the room ends
/// ([`RoomEvent::BroadcasterLost`]). A broadcaster that answers again within it (back from a
/// network cut, or restarted with the same identity) keeps the room.
const BROADCASTER_GRACE: Duration = Duration::from_secs(8);

/// A viewer's view of the broadcaster's liveness. A crashed broadcaster sends no end notice,
/// and its record stays live until it expires (minutes): the only fast evidence is that media
/// stopped everywhere below it and that the broadcaster itself no longer answers. Media
/// progress comes from the session's stats (once a second); while media is silent the
/// broadcaster is asked directly for its record, at most one request at a time.
#[derive(Default)]
struct SourceWatch {
    packets_in: u64,
    /// When media last progressed (`None`: no media yet; a data-only room is never watched).
    progressed: Option<Instant>,
    /// Since when the broadcaster has not answered, media being silent.
    unreachable_since: Option<Instant>,
    probing: bool,
}

impl RoomTask {
    pub(super) fn new(p: TaskParts) -> Self {
        RoomTask {
            // Before `record` and `node` move.
            addr_changes: p
                .record
                .is_some()
                .then(|| AddrChanges::new(p.node.inner.net.addrs_watch())),
            net_changes: p.node.inner.interfaces.changes(),
            net: p.node.inner.net.clone(),
            me: p.node.inner.identity.node_id(),
            node: p.node,
            keys: p.keys,
            room_id: p.room_id,
            room: p.room,
            media: p.media,
            record: p.record,
            record_env: p.record_env,
            session: p.session,
            end_env: None,
            epoch: Instant::now(),
            inputs_tx: p.inputs_tx,
            events: p.events,
            senders: HashMap::new(),
            children: BTreeMap::new(),
            seq: 0,
            tasks: JoinSet::new(),
            closing: false,
            source: SourceWatch::default(),
        }
    }

    /// Media progress from the session's stats: probes the broadcaster while media is silent.
    fn watch_source(&mut self, packets_in: u64) {
        if !matches!(self.media, Media::Viewer(_)) || self.room.tree().is_root() {
            return;
        }
        let now = Instant::now();
        let w = &mut self.source;
        if packets_in > w.packets_in {
            w.packets_in = packets_in;
            w.progressed = Some(now);
            w.unreachable_since = None;
            return;
        }
        let silent = w
            .progressed
            .is_some_and(|t| now.duration_since(t) >= SOURCE_SILENT);
        if !silent || w.probing {
            return;
        }
        w.probing = true;
        let (node, keys, tx) = (self.node.clone(), self.keys.clone(), self.inputs_tx.clone());
        let broadcaster = self.room.broadcaster();
        let spawned = self.spawn(async move {
            let reachable = node.fetch_record_direct(&keys, broadcaster).await.is_some();
            let _ = tx.send(Input::BroadcasterProbed { reachable }).await;
        });
        if !spawned {
            self.source.probing = false;
        }
    }

    fn on_broadcaster_probed(&mut self, reachable: bool, now: Millis) {
        let w = &mut self.source;
        w.probing = false;
        if reachable {
            w.unreachable_since = None;
            return;
        }
        let since = *w.unreachable_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= BROADCASTER_GRACE {
            tracing::info!("the broadcaster is silent and unreachable: it is gone");
            self.room.handle_broadcaster_lost(now);
        }
    }

    fn now(&self) -> Millis {
        Millis(self.epoch.elapsed().as_millis() as u64)
    }

    fn emit(&self, ev: RoomEvent) {
        if self.events.try_send(ev).is_err() {
            tracing::trace!("room event dropped: the application is not reading");
        }
    }

    /// Run `work` as a subtask of this room (in its span); false if the room has too many.
    fn spawn(&mut self, work: impl Future<Output = ()> + Send + 'static) -> bool {
        if self.tasks.len() >= MAX_ROOM_TASKS {
            tracing::debug!("room busy: subtask dropped");
            return false;
        }
        self.tasks.spawn(work.in_current_span());
        true
    }

    fn signal_ctx(&self) -> SignalCtx {
        SignalCtx {
            node: self.node.clone(),
            keys: self.keys.clone(),
            room: self.room_id,
            me: self.me,
        }
    }

    /// What a task answering a child's offer takes along: the signalling context, the media
    /// session that attaches the child, and the way back to this loop.
    fn answering(&self) -> (SignalCtx, Media, mpsc::Sender<Input>) {
        (
            self.signal_ctx(),
            self.media.clone(),
            self.inputs_tx.clone(),
        )
    }

    pub(super) async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut media_events: mpsc::Receiver<MediaEvent>,
    ) {
        // On the public DHT only the broadcaster provides the room (`Node::publish_record`,
        // withdrawn when the record ends): that is the key a lookup by name asks for.
        let now = self.now();
        if matches!(self.media, Media::Viewer(_)) {
            self.room.start(now);
        }
        self.drain().await;
        let mut refresh = tokio::time::interval(ROOM_REFRESH);
        refresh.tick().await;
        let mut media_open = true;
        let leave_reply = loop {
            if self.closing {
                break None;
            }
            let wake = self
                .room
                .poll_timeout()
                .map(|t| tokio::time::Instant::from_std(self.epoch + Duration::from_millis(t.0)));
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
                _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                    let now = self.now();
                    self.room.handle_timeout(now);
                }
                _ = refresh.tick(), if self.record.is_some() => self.refresh_record().await,
                _ = next_change(&mut self.addr_changes) => {
                    self.refresh_record().await;
                    match self.node.ticket(&self.keys).await {
                        Ok(t) => self.emit(RoomEvent::TicketChanged(t)),
                        Err(e) => tracing::debug!("no new ticket: {e}"),
                    }
                }
                Ok(()) = self.net_changes.changed() => self.on_network_changed(),
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = done && e.is_panic() {
                        tracing::warn!("a room subtask panicked: {e}");
                    }
                }
            }
            self.drain().await;
        };
        self.finish(leave_reply).await;
    }

    /// Leave: tell the neighbours (the root's end notice first), end the record, let the queues
    /// drain, stop every subtask, finalize the files, then report the end.
    async fn finish(mut self, leave_reply: Option<oneshot::Sender<()>>) {
        let now = self.now();
        self.room.leave(now);
        self.drain().await;
        // Closing the queues ends their tasks once they have delivered what they hold.
        self.senders.clear();
        if let Some(mut r) = self.record.take() {
            r.seq += 1;
            r.expires_ms = now_ms();
            // Bounded: with no DHT peer left, leaving must not wait for the put's query.
            let _ =
                tokio::time::timeout(LEAVE_GRACE, self.node.publish_record(&self.keys, &r)).await;
        }
        let tasks = &mut self.tasks;
        let _ = tokio::time::timeout(LEAVE_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.shutdown().await;
        self.node.inner.rooms.remove(&self.room_id);
        // Unsubscribe before the topic's keys go: gossip still in flight would otherwise reach a
        // validator that can no longer open it, and count against honest senders.
        let _ = self.net.unsubscribe(self.keys.topic().to_owned()).await;
        self.node.inner.topics.remove(self.keys.topic());
        let events = self.events.clone();
        if let Media::Viewer(v) = self.media {
            // Every subtask is gone, and with them their references to the viewer.
            match std::sync::Arc::try_unwrap(v) {
                Ok(v) => v.close().await,
                Err(_) => tracing::warn!("the viewer is still shared: files close when it drops"),
            }
        }
        if events.try_send(RoomEvent::Ended).is_err() {
            tracing::trace!("room event dropped: the application is not reading");
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

    fn on_media(&mut self, ev: MediaEvent) {
        let now = self.now();
        match &ev {
            MediaEvent::ParentLost => {
                // Before the media was ever up this is a path the room avoids, not a lost parent.
                if let Some(p) = self.room.tree().parent() {
                    self.room.handle_link_down(p, now);
                }
            }
            MediaEvent::Stats(st) => self.watch_source(st.packets_in),
            // A frozen parent's transport has not failed (yet): its silence is the evidence.
            MediaEvent::ParentStalled { .. } => {
                if let Some(p) = self.room.tree().parent() {
                    self.room.handle_link_down(p, now);
                }
            }
            MediaEvent::ParentConnected => {
                if let Some(p) = self.room.tree().parent() {
                    self.room.handle_parent_connected(p, now);
                }
            }
            MediaEvent::ChildCut { id, reason } => {
                if let Some((&child, _)) = self.children.iter().find(|(_, c)| *c == id) {
                    self.children.remove(&child);
                    match reason {
                        CutReason::Slow => self.room.handle_child_too_slow(child, now),
                        CutReason::Disconnected => self.room.handle_link_down(child, now),
                    }
                }
            }
            _ => {}
        }
        self.emit(RoomEvent::Media(ev));
    }

    async fn handle(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Gossip { from, data } => self.on_gossip(from, data),
            Input::Request { from, req, reply } => self.on_request(from, *req, reply).await,
            Input::PeerGone(peer) => {
                let Some(id) = node_of(&peer) else {
                    return;
                };
                self.senders.remove(&id);
                self.room.handle_peer_disconnected(id, now);
            }
            Input::Snapshot(s) => self.room.handle_snapshot(s, now),
            Input::Probe { peer, answered } => {
                if answered {
                    self.room.handle_probe_answered(peer, now);
                } else {
                    self.room.handle_probe_failed(peer, now);
                }
            }
            Input::ParentSignalled { parent, result } => {
                if let Err(e) = result {
                    tracing::debug!(?parent, "media connection to parent failed: {e}");
                    self.room.handle_parent_connect_failed(parent, now);
                }
            }
            Input::ParentRestarted { parent, result } => {
                // A restart that failed leaves a parent that cannot reach us: repair now rather
                // than wait for the watchdog.
                let error = result.err().map(|e| e.to_string());
                if let Some(e) = &error {
                    tracing::warn!(
                        ?parent,
                        "ICE restart with the parent failed ({e}): repairing"
                    );
                    if self.room.tree().parent() == Some(parent) {
                        self.room.handle_link_down(parent, now);
                    }
                }
                if let Some(p) = peer(parent) {
                    self.emit(RoomEvent::IceRestart {
                        parent: p,
                        restarted: error.is_none(),
                        error,
                    });
                }
            }
            Input::ChildAttached { child, id } => {
                if let Some(old) = self.children.insert(child, id)
                    && old != id
                {
                    self.detach(old);
                }
                // The room layer disconnects it again if it left while we were answering.
                self.room.handle_child_connected(child, now);
            }
            Input::RecordChecked { live } => self.room.handle_record_checked(live, now),
            Input::BroadcasterProbed { reachable } => self.on_broadcaster_probed(reachable, now),
            Input::Status(tx) => {
                let tree = self.room.tree();
                let _ = tx.send(RoomStatus {
                    parent: tree.parent().and_then(peer),
                    depth: tree.depth(),
                    children: tree.children().filter_map(peer).collect(),
                    capacity: tree.capacity(),
                });
            }
            Input::RequestKeyframe => {
                if let Media::Viewer(v) = &self.media {
                    v.request_keyframe();
                }
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

    /// Execute the room layer's outputs.
    async fn drain(&mut self) {
        while let Some(out) = self.room.poll_output() {
            match out {
                RoomOutput::SendControl { to, msg } => {
                    let ctl = Control {
                        v: wire::VERSION,
                        room: self.room_id,
                        from: self.me,
                        to,
                        msg,
                    };
                    let env = self.envelope(Kind::TreeControl, &wire::encode(&ctl), CONTROL_TTL);
                    self.send_to(to, env);
                }
                RoomOutput::Publish { update, to } => {
                    // The state machine's clock is node-local; the wire carries wall-clock time.
                    let update = Versioned(TreeUpdate {
                        ts_ms: now_ms(),
                        ..update
                    });
                    let env = self.envelope(Kind::TreeUpdate, &wire::encode(&update), CONTROL_TTL);
                    for peer in to {
                        self.send_to(peer, env.clone());
                    }
                }
                RoomOutput::RequestSnapshot { from } => self.request_snapshot(from),
                RoomOutput::ConnectParent { peer } => self.connect_parent(peer),
                RoomOutput::AcceptChild { peer } => {
                    tracing::debug!(child = ?peer, "accepted child; waiting for its offer");
                }
                RoomOutput::RefuseChild { peer, reason } => {
                    tracing::debug!(joiner = ?peer, ?reason, "refused");
                }
                RoomOutput::Disconnect { peer } => {
                    if let Some(id) = self.children.remove(&peer) {
                        self.detach(id);
                    }
                }
                RoomOutput::Probe { peer } => self.probe(peer),
                RoomOutput::SendEnd { to } => self.send_end(to).await,
                RoomOutput::CheckRecord => self.check_record(),
                RoomOutput::Emit(ev) => self.on_room_event(ev),
                RoomOutput::Close => self.closing = true,
            }
        }
    }

    fn on_room_event(&self, ev: CoreEvent) {
        let ev = match ev {
            CoreEvent::Tree(ev) => match ev {
                TreeEvent::Joined { parent, depth } => {
                    peer(parent).map(|parent| RoomEvent::Joined { parent, depth })
                }
                TreeEvent::ParentChanged { old, new } => {
                    peer(new).map(|new| RoomEvent::ParentChanged {
                        old: old.and_then(peer),
                        new,
                    })
                }
                TreeEvent::DepthChanged { depth } => Some(RoomEvent::DepthChanged { depth }),
                TreeEvent::Orphaned { lost } => peer(lost).map(|lost| RoomEvent::Orphaned { lost }),
                TreeEvent::Rejoined { parent, outage_ms } => {
                    peer(parent).map(|parent| RoomEvent::Rejoined { parent, outage_ms })
                }
                TreeEvent::ChildAdded(c) => peer(c).map(RoomEvent::ChildAdded),
                TreeEvent::ChildRemoved(c) => peer(c).map(RoomEvent::ChildRemoved),
            },
            CoreEvent::BroadcastEnded(EndCause::BroadcasterLost) => {
                tracing::info!("the broadcaster is gone");
                Some(RoomEvent::BroadcasterLost)
            }
            CoreEvent::BroadcastEnded(cause) => {
                tracing::info!(?cause, "the broadcast ended");
                Some(RoomEvent::BroadcastEnded)
            }
            CoreEvent::LinkDown {
                peer: p,
                cause: cause @ (LinkCause::ParentConnectFailed | LinkCause::ParentNeverConnected),
            } => peer(p).map(|parent| RoomEvent::ParentUnreachable {
                parent,
                timed_out: cause == LinkCause::ParentNeverConnected,
            }),
            CoreEvent::LinkDown { peer, cause } => {
                tracing::debug!(?peer, ?cause, "link declared down");
                None
            }
            CoreEvent::ProbeAnswered(peer) => {
                tracing::debug!(?peer, "probe answered: the edge stays");
                None
            }
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
            room: self.room_id,
            env,
        })
    }

    /// Queue a message to a peer; one subtask per peer keeps them in order.
    fn send_to(&mut self, to: NodeId, env: Envelope) {
        let Some(peer) = peer_of(to) else {
            return;
        };
        let bytes = self.request_bytes(env);
        if !self.senders.contains_key(&to) {
            if self.senders.len() >= MAX_PEER_QUEUES {
                // Idle queues go first; their subtasks end once the queue is dropped.
                self.senders.retain(|_, s| s.capacity() < PEER_SEND_QUEUE);
            }
            if self.senders.len() >= MAX_PEER_QUEUES {
                tracing::debug!(?to, "too many peer queues: control message dropped");
                return;
            }
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PEER_SEND_QUEUE);
            let net = self.net.clone();
            // Ends when the room drops the sender (peer gone or room left) and the queue drains.
            let started = self.spawn(async move {
                while let Some(bytes) = rx.recv().await {
                    if let Err(e) = net.request(peer, bytes, CONTROL_TIMEOUT).await {
                        tracing::debug!(%peer, "control message not delivered: {e}");
                    }
                }
            });
            if !started {
                return;
            }
            self.senders.insert(to, tx);
        }
        if let Some(tx) = self.senders.get(&to)
            && tx.try_send(bytes).is_err()
        {
            tracing::debug!(?to, "control queue full: message dropped");
        }
    }

    fn snapshot_request(&mut self, max: u16) -> Vec<u8> {
        let req = SnapshotRequest {
            v: wire::VERSION,
            room: self.room_id,
            max,
        };
        let env = self.envelope(Kind::Snapshot, &wire::encode(&req), CONTROL_TTL);
        self.request_bytes(env)
    }

    fn request_snapshot(&mut self, target: NodeId) {
        let Some(peer) = peer_of(target) else {
            // Nobody to ask: as if the request had failed (the tree retries).
            self.room.handle_snapshot(Snapshot::default(), self.now());
            return;
        };
        let bytes = self.snapshot_request(SNAPSHOT_MAX);
        let (net, keys, tx, room) = (
            self.net.clone(),
            self.keys.clone(),
            self.inputs_tx.clone(),
            self.room_id,
        );
        self.spawn(async move {
            let snap = match net.request(peer, bytes, CONTROL_TIMEOUT).await {
                Ok(resp) => open_snapshot(&keys, room, target, &resp).unwrap_or_else(|e| {
                    tracing::debug!("bad snapshot from {peer}: {e}");
                    Snapshot::default()
                }),
                Err(e) => {
                    tracing::debug!("snapshot request to {peer} failed: {e}");
                    Snapshot::default()
                }
            };
            // Always answer, so the room layer clears its request and the tree retries.
            let _ = tx.send(Input::Snapshot(snap)).await;
        });
    }

    /// Any answer at all proves the peer alive; a small snapshot request is the probe.
    fn probe(&mut self, target: NodeId) {
        let Some(peer) = peer_of(target) else {
            self.room.handle_probe_failed(target, self.now());
            return;
        };
        let bytes = self.snapshot_request(1);
        let timeout = Duration::from_millis(self.room.timings().probe_ms);
        let (net, tx) = (self.net.clone(), self.inputs_tx.clone());
        self.spawn(async move {
            let answered = net.request(peer, bytes, timeout).await.is_ok();
            let _ = tx
                .send(Input::Probe {
                    peer: target,
                    answered,
                })
                .await;
        });
    }

    /// Is the broadcast still live? Its record tells ([`Node::broadcast_live`]).
    fn check_record(&mut self) {
        let (node, keys, tx) = (self.node.clone(), self.keys.clone(), self.inputs_tx.clone());
        let (broadcaster, session) = (self.room.broadcaster(), self.session);
        self.spawn(async move {
            let live = node.broadcast_live(&keys, broadcaster, session).await;
            let _ = tx.send(Input::RecordChecked { live }).await;
        });
    }

    /// The end notice to our children: made and signed here at the root (and published on the
    /// room topic), forwarded byte for byte by a viewer.
    async fn send_end(&mut self, to: Vec<NodeId>) {
        if self.end_env.is_none() && self.room.tree().is_root() {
            let end = BroadcastEnd {
                v: wire::VERSION,
                room: self.room_id,
                created_ms: self.session,
            };
            let env = self.envelope(Kind::BroadcastEnd, &wire::encode(&end), CONTROL_TTL);
            if let Err(e) = self
                .net
                .publish(self.keys.topic().to_owned(), wire::encode(&env))
                .await
            {
                tracing::debug!("publishing the end of the broadcast failed: {e}");
            }
            self.end_env = Some(env);
        }
        let Some(env) = self.end_env.clone() else {
            return;
        };
        for child in to {
            self.send_to(child, env.clone());
        }
    }

    fn connect_parent(&mut self, parent: NodeId) {
        let Media::Viewer(viewer) = &self.media else {
            return;
        };
        let (viewer, cx, tx) = (viewer.clone(), self.signal_ctx(), self.inputs_tx.clone());
        self.spawn(async move {
            let result = signal::connect_parent(&cx, &viewer, parent).await;
            let _ = tx.send(Input::ParentSignalled { parent, result }).await;
        });
    }

    /// This host's network changed: restart ICE with the parent, keeping our place in the tree.
    /// (Children restart theirs if their own network changed; if ours did, their connections
    /// fail over to a repair unless ICE finds a path again by itself.)
    fn on_network_changed(&mut self) {
        let (Media::Viewer(viewer), Some(parent)) = (&self.media, self.room.tree().parent()) else {
            return;
        };
        if self.tasks.len() >= MAX_ROOM_TASKS {
            return;
        }
        let (viewer, cx, tx) = (viewer.clone(), self.signal_ctx(), self.inputs_tx.clone());
        self.spawn(async move {
            let result = signal::restart_parent(&cx, &viewer, parent).await;
            let _ = tx.send(Input::ParentRestarted { parent, result }).await;
        });
    }

    fn checks_context(&self) -> checks::Context<'_> {
        checks::Context {
            keys: &self.keys,
            room: self.room_id,
            me: self.me,
            broadcaster: self.room.broadcaster(),
            session: self.session,
        }
    }

    fn on_gossip(&mut self, from: PeerId, data: Vec<u8>) {
        // Already verified and opened by the gossip validator; open again to get the payload.
        let Some((env, plain)) =
            self.node
                .inner
                .topics
                .open_gossip(self.keys.topic(), &from, &data)
        else {
            return;
        };
        let now = self.now();
        match env.kind {
            Kind::BroadcastEnd => match checks::check_end(&self.checks_context(), &env) {
                Ok(()) => {
                    self.end_env.get_or_insert(env);
                    self.room.handle_end_notice(now);
                }
                Err(e) => tracing::debug!(%from, "end notice ignored: {e}"),
            },
            Kind::Notice => {
                let Ok(notice) = wire::decode::<Notice>(&plain) else {
                    return;
                };
                if notice.to != self.me || notice.kind != SdpKind::Offer {
                    return;
                }
                // A child could not reach us directly: fetch its offer from the DHT, answer there.
                let child = notice.from;
                if !self.room.tree().children().any(|c| c == child) {
                    return;
                }
                if !self.room.is_fresh(digest(&notice.nonce.0)) {
                    tracing::debug!(?child, "replayed signalling notice ignored");
                    return;
                }
                let (cx, media, tx) = self.answering();
                self.spawn(async move {
                    match signal::answer_from_dht(&cx, &media, child, notice.blob_key).await {
                        Ok(Some(id)) => {
                            let _ = tx.send(Input::ChildAttached { child, id }).await;
                        }
                        Ok(None) => tracing::debug!(?child, "no usable offer in the DHT"),
                        Err(e) => tracing::debug!(?child, "answering through the DHT: {e}"),
                    }
                });
            }
            _ => {}
        }
    }

    async fn on_request(&mut self, from: PeerId, req: RoomRequest, reply: ResponseHandle) {
        let now = self.now();
        let checked = {
            let cx = checks::Context {
                keys: &self.keys,
                room: self.room_id,
                me: self.me,
                broadcaster: self.room.broadcaster(),
                session: self.session,
            };
            let room = &mut self.room;
            checks::check_request(&cx, &from, req.env, |k| room.is_fresh(k))
        };
        let checked = match checked {
            Ok(c) => c,
            Err(why) => {
                tracing::debug!(%from, "request refused: {why}");
                let _ = reply.respond(refusal(&why)).await;
                return;
            }
        };
        match checked {
            Checked::Control { from, msg } => {
                let _ = reply.respond(ok_response(None)).await;
                self.room.handle_message(from, msg, now);
            }
            Checked::Update { from, update } => {
                let _ = reply.respond(ok_response(None)).await;
                self.room.handle_update(from, update, now);
            }
            Checked::Record => {
                let resp = match &self.record_env {
                    Some(env) => ok_response(Some(env.clone())),
                    None => refusal(&Refusal::NotBroadcaster),
                };
                let _ = reply.respond(resp).await;
            }
            Checked::Snapshot { max } => {
                let snap = self
                    .room
                    .tree()
                    .snapshot_for_newcomer(max.clamp(1, SNAPSHOT_MAX) as usize);
                let resp = SnapshotResponse {
                    v: wire::VERSION,
                    room: self.room_id,
                    candidates: snap.candidates,
                };
                let env = self.envelope(Kind::Snapshot, &wire::encode(&resp), CONTROL_TTL);
                let _ = reply.respond(ok_response(Some(env))).await;
            }
            Checked::End(env) => {
                let _ = reply.respond(ok_response(None)).await;
                self.end_env.get_or_insert(env);
                self.room.handle_end_notice(now);
            }
            Checked::Offer { from, env } => self.on_offer(from, env, reply).await,
        }
    }

    /// A child's offer (direct path): answer it off the loop (answering gathers ICE).
    async fn on_offer(&mut self, child: NodeId, env: Envelope, reply: ResponseHandle) {
        let offer = match signal::open_signal(&self.keys, &env, Kind::Offer, child, self.me) {
            Ok(o) => o,
            Err(e) => {
                let _ = reply.respond(refusal(&Refusal::BadOffer(e))).await;
                return;
            }
        };
        if !self.room.is_fresh(digest(&offer.nonce.0)) {
            let _ = reply.respond(refusal(&Refusal::NonceReused)).await;
            return;
        }
        if !self.room.tree().children().any(|c| c == child) {
            let _ = reply.respond(refusal(&Refusal::NotAChild)).await;
            return;
        }
        if self.tasks.len() >= MAX_ROOM_TASKS {
            let _ = reply.respond(refusal(&Refusal::Busy)).await;
            return;
        }
        let (cx, media, tx) = self.answering();
        let attached = self.children.get(&child).copied();
        self.spawn(async move {
            // An attached child offering again with its connection's fingerprint restarts ICE
            // (its network changed): answer on the connection it has.
            if let Some(id) = attached
                && let Some(r) = signal::answer_restart(&cx, &media, id, &offer).await
            {
                let resp = match r {
                    Ok(env) => ok_response(Some(env)),
                    Err(e) => refusal(&Refusal::Answer(e)),
                };
                let _ = reply.respond(resp).await;
                return;
            }
            match signal::answer_offer(&cx, &media, &offer).await {
                Ok((id, answer_env)) => {
                    let akey =
                        signal::signal_key(&cx.keys, child, cx.me, &offer.nonce, SdpKind::Answer);
                    let bytes = wire::encode(&answer_env);
                    let _ = reply.respond(ok_response(Some(answer_env))).await;
                    let _ = tx.send(Input::ChildAttached { child, id }).await;
                    let _ = cx.node.inner.net.put_record(akey.to_vec(), bytes).await;
                }
                Err(e) => {
                    let _ = reply.respond(refusal(&Refusal::Answer(e))).await;
                }
            }
        });
    }
}
