//! The relay: fan-out of RTP and data to children, and the viewer's local playback.
//!
//! **Fan-out.** Every node (broadcaster or viewer) owns one `Hub`. Upstream packets enter
//! it once (`forward`) and are copied, by reference-counted `Bytes`, into one bounded queue per
//! child with `try_send`. A child whose queue is full is *cut*: removed from the fan-out and its
//! connection closed, so a slow peer can never stall its siblings or the upstream. Each child
//! has a writer task and one `TrackLocalStaticRTP` per media kind (webrtc 0.21 binds a local
//! track to one connection); the writer rewrites SSRC and payload type to the child's
//! negotiated values and strips header extensions (their ids are per-connection) before
//! `write_rtp`. Sequence numbers and timestamps are the broadcaster's, unchanged all the way
//! down the tree, so a child that switches parent sees a continuous sequence space with a gap.
//!
//! **Loss repair.** Each child connection runs webrtc's NACK responder interceptor, which keeps
//! a per-stream history of what was sent to that child and retransmits on NACK: that is the
//! per-child packet history. Keyframe requests (PLI/FIR) from children reach the hub through
//! [`KeyframeRequestForwarder`](super::peer::KeyframeRequestForwarder); they are coalesced and
//! sent upstream at most once per [`KEYFRAME_REQUEST_INTERVAL`]; attaching a child requests one
//! too, so it can start decoding quickly.
//!
//! **Playback.** A viewer's packets also go to a playback task: a reorder buffer (bounded in
//! packets, its wait for a missing packet learnt from how late repairs arrive), depacketization into frames, decryption, then the sinks. VP8
//! and VP9 descriptors mark the first packet of a frame; for H.264 and AV1 a frame is the
//! packets of one RTP timestamp after the previous marker. After any gap, video frames are
//! dropped until the next keyframe of the codec (and one is requested), so files never contain
//! undecodable frames.
//!
//! **Liveness.** `parent_watchdog` tells a frozen or dead parent (nothing at all arrives, not
//! even the reports a live sender makes without media) from a starving one, and
//! [`STALE_AFTER`] keeps media that waited out a stall of this node from reaching children late.
//!
//! The file is long (about half of it tests over real payloads) because fan-out, playback and
//! their liveness rules share the hub's types and counters; splitting them would expose those.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp::packetizer::Depacketizer;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::peer::{MediaConfig, Peer, PeerEvent, SignalBlob};
use super::session::{ChildId, CutReason, MediaEvent, SessionError};
use super::{Codec, MediaKind};

/// Items a child's queue holds (RTP packets and data messages share it, so order is kept).
pub const CHILD_QUEUE: usize = 1024;
/// Minimum spacing of keyframe requests sent upstream.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// Media queued for a child longer than this is dropped, not sent late: after this node was
/// stopped or starved, a burst of stale packets would only make the child's playback stutter
/// (its reorder buffer has given them up) and flood its link.
pub const STALE_AFTER: Duration = Duration::from_secs(1);
/// A parent from which nothing (no RTP, no RTCP report) arrived for this long is frozen, dead or
/// cut off: the child repairs ([`MediaEvent::ParentStalled`]). A live parent that merely has no
/// media to forward still sends a report every `peer::SENDER_REPORT_INTERVAL` (250 ms).
pub const PARENT_SILENT: Duration = Duration::from_millis(600);
/// A new parent from which nothing at all arrived this long after the offer is given up (the
/// room layer's own parent-connect deadline, 10 s, normally acts first and better: it also
/// avoids that parent for a while).
pub const PARENT_NEVER_HEARD: Duration = Duration::from_secs(15);
/// How often the parent watchdog looks.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);
/// A watchdog tick this late means this process was not running (stopped, or starved of CPU):
/// packets may be waiting unread in its own sockets, so the parent's silence is not evidence.
const WATCHDOG_LATE: Duration = Duration::from_millis(200);
/// Data messages held for a child whose data channel is not open yet.
const PENDING_DATA: usize = 256;

/// One item of the fan-out.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    Rtp(MediaKind, rtp::Packet),
    Data(Bytes),
}

/// Counters shared by a node's tasks.
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub packets_lost: AtomicU64,
    pub packets_forwarded: AtomicU64,
    pub frames_video: AtomicU64,
    pub frames_audio: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub decrypt_failures: AtomicU64,
    pub data_messages: AtomicU64,
    pub children_cut: AtomicU64,
}

struct ChildSlot {
    /// Items with the instant they were queued (see [`STALE_AFTER`]).
    queue: mpsc::Sender<(Instant, Item)>,
    peer: Arc<Peer>,
    tasks: Vec<AbortHandle>,
}

/// The fan-out of one node.
pub(crate) struct Hub {
    children: Mutex<BTreeMap<ChildId, ChildSlot>>,
    next_id: AtomicU64,
    /// Codecs of the upstream tracks (known from the source or the parent's answer).
    /// `None` until known (a viewer learns them from its parent's answer); `Some(empty)` is a
    /// data-only room.
    tracks: Mutex<Option<Vec<(MediaKind, Codec)>>>,
    keyframe_tx: mpsc::Sender<()>,
    pub events: mpsc::Sender<MediaEvent>,
    pub config: MediaConfig,
    pub counters: Counters,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Hub {
    pub fn new(
        config: MediaConfig,
        events: mpsc::Sender<MediaEvent>,
    ) -> (Arc<Hub>, mpsc::Receiver<()>) {
        let (keyframe_tx, keyframe_rx) = mpsc::channel(1);
        (
            Arc::new(Hub {
                children: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                tracks: Mutex::new(None),
                keyframe_tx,
                events,
                config,
                counters: Counters::default(),
                tasks: Mutex::new(Vec::new()),
            }),
            keyframe_rx,
        )
    }

    pub fn emit(&self, ev: MediaEvent) {
        // Never block media on a slow event consumer: events are dropped when it lags.
        let _ = self.events.try_send(ev);
    }

    pub fn track_task(&self, h: AbortHandle) {
        let mut t = self
            .tasks
            .lock()
            .expect("hub task list lock is never poisoned");
        t.retain(|h| !h.is_finished());
        t.push(h);
    }

    pub fn set_tracks(&self, tracks: Vec<(MediaKind, Codec)>) {
        *self.tracks.lock().expect("hub lock") = Some(tracks);
    }

    pub fn tracks(&self) -> Vec<(MediaKind, Codec)> {
        self.tracks
            .lock()
            .expect("hub lock")
            .clone()
            .unwrap_or_default()
    }

    /// Whether the tracks are known (possibly none: a data-only room).
    pub fn tracks_known(&self) -> bool {
        self.tracks.lock().expect("hub lock").is_some()
    }

    pub fn request_keyframe(&self) {
        let _ = self.keyframe_tx.try_send(());
    }

    pub fn child_count(&self) -> usize {
        self.children.lock().expect("hub lock").len()
    }

    /// Copies an item to every child; cuts children whose queue is full.
    pub fn forward(&self, item: Item) {
        let mut cut = Vec::new();
        let now = Instant::now();
        {
            let mut children = self.children.lock().expect("hub lock");
            for (id, c) in children.iter() {
                match c.queue.try_send((now, item.clone())) {
                    Ok(()) => {
                        self.counters
                            .packets_forwarded
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => cut.push((*id, CutReason::Slow)),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        cut.push((*id, CutReason::Disconnected))
                    }
                }
            }
            for (id, _) in &cut {
                if let Some(slot) = children.remove(id) {
                    close_slot(slot);
                }
            }
        }
        for (id, reason) in cut {
            self.counters.children_cut.fetch_add(1, Ordering::Relaxed);
            warn!(child = id.0, ?reason, "child cut from the fan-out");
            self.emit(MediaEvent::ChildCut { id, reason });
        }
    }

    /// Removes a child (no event).
    pub fn remove_child(&self, id: ChildId) -> bool {
        let slot = self.children.lock().expect("hub lock").remove(&id);
        match slot {
            Some(s) => {
                close_slot(s);
                true
            }
            None => false,
        }
    }

    fn cut(&self, id: ChildId, reason: CutReason) {
        if self.remove_child(id) {
            self.counters.children_cut.fetch_add(1, Ordering::Relaxed);
            self.emit(MediaEvent::ChildCut { id, reason });
        }
    }

    /// Answers an offer that restarts ICE on a child's connection (its network changed): the
    /// connection, its tracks and its place in the fan-out are kept.
    pub async fn restart_child(
        &self,
        id: ChildId,
        offer: &SignalBlob,
    ) -> Result<SignalBlob, SessionError> {
        let peer = {
            let children = self.children.lock().expect("hub lock");
            let slot = children.get(&id).ok_or(SessionError::NoSuchChild)?;
            Arc::clone(&slot.peer)
        };
        Ok(peer.accept_restart(offer).await?)
    }

    /// Accepts a child's offer: one connection, one local track per upstream kind.
    pub async fn attach_child(
        self: &Arc<Self>,
        offer: &SignalBlob,
    ) -> Result<(ChildId, SignalBlob), SessionError> {
        if !self.tracks_known() {
            return Err(SessionError::NoUpstream);
        }
        let tracks = self.tracks();
        let id = ChildId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (ev_tx, ev_rx) = mpsc::channel(super::peer::PEER_EVENT_QUEUE);
        let peer = Arc::new(Peer::new(&self.config, ev_tx).await?);
        let mut locals = Vec::new();
        for (kind, codec) in &tracks {
            let ssrc: u32 = rand::random();
            let rtc_kind = match kind {
                MediaKind::Video => RtpCodecKind::Video,
                MediaKind::Audio => RtpCodecKind::Audio,
            };
            let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                "waterfall".to_owned(),
                format!("{kind:?}-{ssrc}").to_lowercase(),
                format!("{kind:?}").to_lowercase(),
                rtc_kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: rtp_codec(*codec),
                    ..Default::default()
                }],
            )));
            let sender = peer
                .pc
                .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
                .await
                .map_err(super::peer::PeerError::from)?;
            locals.push((*kind, *codec, ssrc, track, sender));
        }
        let mut answer = match peer.accept_offer(offer).await {
            Ok(a) => a,
            Err(e) => {
                peer.close().await;
                return Err(e.into());
            }
        };
        let mut outs = Vec::new();
        for (kind, codec, ssrc, track, sender) in locals {
            // The payload type the child negotiated for this codec: write_rtp silently drops
            // packets whose SSRC or PT do not match the sender.
            // Several H.264 and VP9 formats share a MIME type: the one with our fmtp first.
            let params = sender.get_parameters().await.ok();
            let want = rtp_codec(codec);
            let pt = params
                .as_ref()
                .and_then(|p| {
                    let codecs = &p.rtp_parameters.codecs;
                    let mime = |c: &&RTCRtpCodecParameters| {
                        c.rtp_codec
                            .mime_type
                            .eq_ignore_ascii_case(codec.mime_type())
                    };
                    codecs
                        .iter()
                        .filter(mime)
                        .find(|c| c.rtp_codec.sdp_fmtp_line == want.sdp_fmtp_line)
                        .or(codecs.iter().find(mime))
                        .or(codecs.first())
                        .map(|c| c.payload_type)
                })
                .unwrap_or(match codec {
                    Codec::Opus => 111,
                    _ => 96,
                });
            // The child learns the codec from the first payload type of the answer's m-section
            // (`sdp_send_codecs`), and webrtc-rs answers in the offer's order (VP8 first,
            // whatever the track carries): the one it sends moves to the front. The answer's
            // semantics are unchanged (the same formats, only the preference order).
            answer.sdp = promote_payload_type(&answer.sdp, kind, pt);
            outs.push(ChildTrack {
                kind,
                ssrc,
                pt,
                track,
            });
        }
        let (q_tx, q_rx) = mpsc::channel(CHILD_QUEUE);
        let mut tasks = Vec::new();
        // Keyframe requests from this child.
        for t in &outs {
            if t.kind == MediaKind::Video {
                let hub = Arc::downgrade(self);
                let track = Arc::clone(&t.track);
                tasks.push(
                    tokio::spawn(async move {
                        // poll() returns None until the track is bound; bounded retries.
                        for _ in 0..600 {
                            while let Some(ev) = track.poll().await {
                                let TrackLocalEvent::OnRtcpPacket(_) = ev else {
                                    continue;
                                };
                                match hub.upgrade() {
                                    Some(h) => h.request_keyframe(),
                                    None => return,
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    })
                    .abort_handle(),
                );
            }
        }
        let writer = ChildWriter {
            id,
            hub: Arc::downgrade(self),
            tracks: outs,
            dc: None,
            pending: VecDeque::new(),
        };
        tasks.push(tokio::spawn(writer.run(q_rx, ev_rx)).abort_handle());
        self.children.lock().expect("hub lock").insert(
            id,
            ChildSlot {
                queue: q_tx,
                peer,
                tasks,
            },
        );
        // A new child needs a keyframe to start decoding.
        self.request_keyframe();
        Ok((id, answer))
    }

    /// Closes every child (on drop of the owning session).
    pub fn shutdown(&self) {
        let slots: Vec<ChildSlot> = std::mem::take(&mut *self.children.lock().expect("hub lock"))
            .into_values()
            .collect();
        for s in slots {
            close_slot(s);
        }
        for t in self.tasks.lock().expect("hub lock").drain(..) {
            t.abort();
        }
    }
}

fn close_slot(slot: ChildSlot) {
    for t in &slot.tasks {
        t.abort();
    }
    let peer = slot.peer;
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(async move { peer.close().await });
    }
}

/// The RTP codec description webrtc-rs needs for a local track.
pub(crate) fn rtp_codec(codec: Codec) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: codec.mime_type().to_owned(),
        clock_rate: codec.clock_rate(),
        channels: if codec == Codec::Opus { 2 } else { 0 },
        // The fmtp lines of webrtc-rs's default codecs, so the track matches one exactly.
        // H.264 needs packetization-mode=1: the payloader sends FU-A and STAP-A.
        sdp_fmtp_line: match codec {
            Codec::Opus => "minptime=10;useinbandfec=1",
            Codec::H264 => "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            Codec::Vp9 | Codec::Av1 => "profile-id=0",
            _ => "",
        }
        .to_owned(),
        rtcp_feedback: vec![],
    }
}

struct ChildTrack {
    kind: MediaKind,
    ssrc: u32,
    pt: u8,
    track: Arc<TrackLocalStaticRTP>,
}

struct ChildWriter {
    id: ChildId,
    hub: std::sync::Weak<Hub>,
    tracks: Vec<ChildTrack>,
    dc: Option<Arc<dyn DataChannel>>,
    pending: VecDeque<Bytes>,
}

impl ChildWriter {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<(Instant, Item)>,
        mut events: mpsc::Receiver<PeerEvent>,
    ) {
        loop {
            tokio::select! {
                item = queue.recv() => {
                    let Some((queued, item)) = item else { return };
                    // Media that waited this long (this process was stopped or starved) is
                    // dropped rather than burst out late; data stays (ordered, reliable).
                    if matches!(item, Item::Rtp(..)) && queued.elapsed() > STALE_AFTER {
                        continue;
                    }
                    self.write(item).await;
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    match ev {
                        PeerEvent::State(RTCPeerConnectionState::Connected) => {
                            if let Some(h) = self.hub.upgrade() {
                                h.emit(MediaEvent::ChildConnected(self.id));
                                h.request_keyframe();
                            }
                        }
                        PeerEvent::State(RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) => {
                            if let Some(h) = self.hub.upgrade() {
                                h.cut(self.id, CutReason::Disconnected);
                            }
                            return;
                        }
                        PeerEvent::DataChannel(dc) => {
                            // Drain the channel's events (nothing is expected from a child).
                            let d = Arc::clone(&dc);
                            if let Some(h) = self.hub.upgrade() {
                                h.track_task(tokio::spawn(async move {
                                    while let Some(ev) = d.poll().await {
                                        if matches!(ev, DataChannelEvent::OnClose) { break; }
                                    }
                                }).abort_handle());
                            }
                            self.dc = Some(dc);
                            while let Some(m) = self.pending.pop_front() {
                                self.send_data(m).await;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    async fn write(&mut self, item: Item) {
        match item {
            Item::Rtp(kind, mut pkt) => {
                let Some(t) = self.tracks.iter().find(|t| t.kind == kind) else {
                    return;
                };
                pkt.header.ssrc = t.ssrc;
                pkt.header.payload_type = t.pt;
                pkt.header.extension = false;
                pkt.header.extension_profile = 0;
                pkt.header.extensions.clear();
                pkt.header.extensions_padding = 0;
                if let Err(e) = t.track.write_rtp(pkt).await {
                    debug!(child = self.id.0, "write_rtp: {e}");
                }
            }
            Item::Data(b) => {
                if self.dc.is_some() {
                    self.send_data(b).await;
                } else if self.pending.len() < PENDING_DATA {
                    self.pending.push_back(b);
                }
            }
        }
    }

    async fn send_data(&mut self, b: Bytes) {
        if let Some(dc) = &self.dc
            && let Err(e) = dc.send(BytesMut::from(&b[..])).await
        {
            debug!(child = self.id.0, "data send: {e}");
        }
    }
}

/// Watches one parent connection: emits [`MediaEvent::ParentStalled`] once (and returns) when
/// nothing arrived from the parent for [`PARENT_SILENT`] after something did, or for
/// [`PARENT_NEVER_HEARD`] after the offer. It returns quietly when the connection is replaced
/// (`current` turns false) or gone. Armed only while the room carries media (a data-only room
/// has no reports to hear). A tick that comes late by more than the bound means this process
/// itself was not running (stopped, starved; see [`WATCHDOG_LATE`]): the silence is then not
/// the parent's fault, and the count restarts.
pub(crate) async fn parent_watchdog(
    peer: std::sync::Weak<Peer>,
    hub: std::sync::Weak<Hub>,
    current: impl Fn() -> bool,
) {
    let start = Instant::now();
    let mut last_tick = start;
    let mut baseline = start;
    loop {
        tokio::time::sleep(WATCHDOG_TICK).await;
        let now = Instant::now();
        if now.duration_since(last_tick) > WATCHDOG_TICK + WATCHDOG_LATE {
            baseline = now;
        }
        last_tick = now;
        if !current() {
            return;
        }
        let (Some(hub), Some(peer)) = (hub.upgrade(), peer.upgrade()) else {
            return;
        };
        if hub.tracks().is_empty() {
            baseline = now;
            continue;
        }
        // An ICE restart under way (see `Peer::expect_quiet`) silences the parent for a while.
        if let Some(q) = peer.quiet_until() {
            baseline = baseline.max(Instant::from_std(q));
        }
        let (since, bound) = match peer.heard_at() {
            Some(t) => (Instant::from_std(t).max(baseline), PARENT_SILENT),
            None => (start.max(baseline), PARENT_NEVER_HEARD),
        };
        let silent = now.duration_since(since);
        if silent > bound {
            info!(
                silent_ms = silent.as_millis() as u64,
                "parent silent: repairing"
            );
            hub.emit(MediaEvent::ParentStalled { silent });
            return;
        }
    }
}

/// Sends keyframe requests upstream, at most once per interval (coalescing).
pub(crate) async fn keyframe_coalescer<F, Fut>(mut rx: mpsc::Receiver<()>, mut send: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut last: Option<Instant> = None;
    while rx.recv().await.is_some() {
        if let Some(l) = last {
            let next = l + KEYFRAME_REQUEST_INTERVAL;
            if Instant::now() < next {
                tokio::time::sleep_until(next).await;
            }
        }
        // Requests that arrived while waiting are satisfied by this one.
        while rx.try_recv().is_ok() {}
        send().await;
        last = Some(Instant::now());
    }
}

// ------------------------------------------------------------------ playback

/// Packets held while waiting for a missing one (beyond it, the gap is declared at once).
const REORDER_PACKETS: usize = 1024;
/// The wait for a missing packet adapts between these bounds (see [`Reorder`]).
const REORDER_WAIT_MIN: Duration = Duration::from_millis(250);
const REORDER_WAIT_MAX: Duration = Duration::from_secs(2);
/// The wait a viewer starts with: a few NACK rounds (`peer::NACK_INTERVAL`) at a depth or two.
const REORDER_WAIT_START: Duration = Duration::from_millis(600);
/// Gaps (single packets) remembered after they were given up, to learn from late arrivals.
const GIVEN_UP_MEMORY: usize = 256;
/// A longer run of missing packets is a jump (a new parent, a stall), not loss to learn from.
const LEARN_GAP_MAX: u64 = 64;
/// How often the wait may shrink towards what repairs actually took.
const REORDER_DECAY_WINDOW: Duration = Duration::from_secs(20);

/// In-order delivery of a packet stream with bounded waiting for missing packets.
///
/// The wait is measured, not fixed: how long a repair takes depends on the round-trip time of
/// every hop above the viewer and on how many NACK rounds a lossy hop needs, which nobody
/// configures. A packet given up and then arriving late shows the wait was too short: the wait
/// grows to cover that repair with a margin (up to [`REORDER_WAIT_MAX`]). Every
/// [`REORDER_DECAY_WINDOW`] without such a late arrival, the wait shrinks a quarter of the way
/// towards 1.5 times the slowest repair that arrived in time (never below
/// [`REORDER_WAIT_MIN`]), so a viewer that moved up the tree or whose links got better stops
/// paying for the old delay. The wait only delays local playback: relaying never waits.
pub(crate) struct Reorder {
    next: Option<u64>,
    buf: BTreeMap<u64, rtp::Packet>,
    waiting_since: Option<Instant>,
    wait: Duration,
    /// Packets given up as lost, with the instant their wait began (bounded).
    given_up: VecDeque<(u64, Instant)>,
    /// The slowest repair that arrived in time in this decay window.
    slowest_repair: Duration,
    window_start: Option<Instant>,
    late_in_window: bool,
}

impl Reorder {
    pub fn new() -> Self {
        Reorder {
            next: None,
            buf: BTreeMap::new(),
            waiting_since: None,
            wait: REORDER_WAIT_START,
            given_up: VecDeque::new(),
            slowest_repair: Duration::ZERO,
            window_start: None,
            late_in_window: false,
        }
    }

    /// The current wait for a missing packet.
    #[cfg(test)]
    pub fn wait(&self) -> Duration {
        self.wait
    }

    fn unwrap_seq(&self, seq: u16) -> u64 {
        match self.next {
            None => (1u64 << 32) + seq as u64,
            Some(n) => {
                let diff = seq.wrapping_sub(n as u16) as i16 as i64;
                (n as i64 + diff).max(0) as u64
            }
        }
    }

    /// Adds a packet; returns packets now in order, each with "a gap precedes it".
    pub fn push(&mut self, p: rtp::Packet, now: Instant) -> Vec<(rtp::Packet, bool)> {
        let ext = self.unwrap_seq(p.header.sequence_number);
        if self.next.is_some_and(|n| ext < n) {
            // Duplicate, or too late: if it was given up, the wait was too short.
            if let Some(i) = self.given_up.iter().position(|(s, _)| *s == ext) {
                let (_, since) = self.given_up.remove(i).expect("index just found");
                let needed = now.duration_since(since);
                let want = (needed + needed / 4 + Duration::from_millis(50)).min(REORDER_WAIT_MAX);
                if want > self.wait {
                    debug!(wait_ms = want.as_millis() as u64, "reorder wait raised");
                    self.wait = want;
                }
                self.late_in_window = true;
            }
            return Vec::new();
        }
        if self.next == Some(ext)
            && let Some(since) = self.waiting_since
        {
            self.slowest_repair = self.slowest_repair.max(now.duration_since(since));
        }
        self.buf.insert(ext, p);
        self.drain(now)
    }

    fn decay(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) < REORDER_DECAY_WINDOW {
            return;
        }
        if !self.late_in_window {
            let target = (self.slowest_repair * 3 / 2).max(REORDER_WAIT_MIN);
            if target < self.wait {
                self.wait -= (self.wait - target) / 4;
            }
        }
        self.window_start = Some(now);
        self.slowest_repair = Duration::ZERO;
        self.late_in_window = false;
    }

    /// Releases packets whose wait expired.
    pub fn drain(&mut self, now: Instant) -> Vec<(rtp::Packet, bool)> {
        self.decay(now);
        let mut out = Vec::new();
        let mut gap = false;
        while let Some((&first, _)) = self.buf.first_key_value() {
            let expected = self.next.unwrap_or(first);
            if first == expected {
                let p = self.buf.remove(&first).expect("key just seen");
                self.next = Some(first + 1);
                out.push((p, gap));
                gap = false;
                self.waiting_since = None;
                continue;
            }
            let since = *self.waiting_since.get_or_insert(now);
            if self.buf.len() > REORDER_PACKETS || now.duration_since(since) >= self.wait {
                if first - expected <= LEARN_GAP_MAX {
                    for seq in expected..first {
                        if self.given_up.len() == GIVEN_UP_MEMORY {
                            self.given_up.pop_front();
                        }
                        self.given_up.push_back((seq, since));
                    }
                }
                self.next = Some(first);
                self.waiting_since = None;
                gap = true;
                continue;
            }
            break;
        }
        out
    }
}

/// Reassembles frames from in-order packets of one codec.
pub(crate) struct FrameBuilder {
    codec: Codec,
    cur: Option<(u32, BytesMut)>,
    broken: bool,
    vp8: rtp::codec::vp8::Vp8Packet,
    /// VP9, H.264, AV1: the frame being built and its depacketizer.
    multi: Option<MultiFrame>,
    /// The previous in-order packet ended a frame (RTP marker): the next one starts a frame.
    prev_marker: bool,
}

/// A frame of a codec whose start is not always visible in its payload descriptor.
struct MultiFrame {
    ts: u32,
    buf: BytesMut,
    depack: Box<dyn Depacketizer + Send>,
    certain: bool,
}

/// A reassembled frame.
pub(crate) struct Frame {
    pub rtp_ts: u32,
    pub data: Bytes,
    /// Something was lost before this frame.
    pub after_gap: bool,
    /// The frame may lack its first packets (joined mid-stream, or resumed after a gap on a
    /// codec whose descriptor cannot prove a frame start): a decryption failure then means
    /// "incomplete", not "wrong key".
    pub uncertain: bool,
}

impl FrameBuilder {
    pub fn new(codec: Codec) -> Self {
        FrameBuilder {
            codec,
            cur: None,
            broken: false,
            vp8: Default::default(),
            multi: None,
            prev_marker: false,
        }
    }

    fn depacketizer(codec: Codec) -> Box<dyn Depacketizer + Send> {
        match codec {
            Codec::H264 => Box::new(rtp::codec::h264::H264Packet::default()),
            Codec::Av1 => Box::new(rtp::codec::av1::Av1Depacketizer::default()),
            _ => Box::new(rtp::codec::vp9::Vp9Packet::default()),
        }
    }

    /// VP9, H.264, AV1: frames are the packets of one RTP timestamp up to the marker. A frame
    /// starts after a marker; otherwise (first packet, or after a gap) only where the payload
    /// allows it: VP9's B bit is exact, an H.264 packet that is not a middle FU-A fragment or
    /// an AV1 packet not continuing an OBU (Z = 0) may be a start and is marked uncertain.
    fn push_multi(&mut self, p: &rtp::Packet, gap: bool) -> Option<Frame> {
        let prev_marker = std::mem::replace(&mut self.prev_marker, p.header.marker) && !gap;
        if gap && self.multi.take().is_some() {
            self.broken = true;
        }
        if self
            .multi
            .as_ref()
            .is_some_and(|m| m.ts != p.header.timestamp)
        {
            // The previous frame never got its marker.
            self.multi = None;
            self.broken = true;
        }
        if self.multi.is_none() {
            let depack = Self::depacketizer(self.codec);
            let exact_head = self.codec == Codec::Vp9 && depack.is_partition_head(&p.payload);
            let maybe_head = match self.codec {
                Codec::Vp9 => exact_head,
                _ => depack.is_partition_head(&p.payload),
            };
            if !(prev_marker || maybe_head) {
                self.broken = true;
                return None;
            }
            self.multi = Some(MultiFrame {
                ts: p.header.timestamp,
                buf: BytesMut::new(),
                depack,
                certain: prev_marker || exact_head,
            });
        }
        let m = self.multi.as_mut()?;
        match depacketize_guarded(self.codec, m.depack.as_mut(), &p.payload) {
            Some(part) => m.buf.extend_from_slice(&part),
            None => {
                self.multi = None;
                self.broken = true;
                return None;
            }
        }
        if p.header.marker {
            let m = self.multi.take()?;
            return Some(Frame {
                rtp_ts: m.ts,
                data: m.buf.freeze(),
                after_gap: std::mem::take(&mut self.broken),
                uncertain: !m.certain,
            });
        }
        None
    }

    pub fn push(&mut self, p: &rtp::Packet, gap: bool) -> Option<Frame> {
        if matches!(self.codec, Codec::Vp9 | Codec::H264 | Codec::Av1) {
            return self.push_multi(p, gap);
        }
        if gap {
            self.cur = None;
            self.broken = true;
        }
        match self.codec {
            Codec::Opus => {
                let after_gap = std::mem::take(&mut self.broken);
                if p.payload.is_empty() {
                    return None;
                }
                Some(Frame {
                    rtp_ts: p.header.timestamp,
                    data: p.payload.clone(),
                    after_gap,
                    uncertain: false,
                })
            }
            Codec::Vp8 => {
                let head = self.vp8.is_partition_head(&p.payload);
                let Ok(part) = self.vp8.depacketize(&p.payload) else {
                    self.cur = None;
                    self.broken = true;
                    return None;
                };
                if head {
                    if self.cur.is_some() {
                        self.broken = true; // previous frame never finished
                    }
                    self.cur = Some((p.header.timestamp, BytesMut::new()));
                }
                match &mut self.cur {
                    Some((ts, buf)) if *ts == p.header.timestamp => buf.extend_from_slice(&part),
                    _ => {
                        self.cur = None;
                        self.broken = true;
                        return None;
                    }
                }
                if p.header.marker {
                    let (ts, buf) = self.cur.take()?;
                    return Some(Frame {
                        rtp_ts: ts,
                        data: buf.freeze(),
                        after_gap: std::mem::take(&mut self.broken),
                        uncertain: false,
                    });
                }
                None
            }
            _ => None,
        }
    }
}

/// Depacketizes one payload from the network. rtc 0.21's depacketizers index past the end of
/// some malformed payloads (an H.264 STAP-A cut inside a length field, an AV1 OBU element
/// shorter than its header): those are rejected first, and any other panic inside the library
/// is caught, so a bad parent costs a frame, never the node.
fn depacketize_guarded(codec: Codec, d: &mut dyn Depacketizer, payload: &Bytes) -> Option<Bytes> {
    if !payload_sane(codec, payload) {
        return None;
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.depacketize(payload)))
        .ok()?
        .ok()
}

fn payload_sane(codec: Codec, p: &[u8]) -> bool {
    match codec {
        Codec::H264 if p.first().is_some_and(|b| b & 0x1f == 24) => {
            let mut at = 1;
            while at < p.len() {
                let Some(len) = p.get(at..at + 2) else {
                    return false;
                };
                at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                if at > p.len() {
                    return false;
                }
            }
            true
        }
        Codec::Av1 => {
            let Some(&agg) = p.first() else { return false };
            let (z, w) = (agg & 0x80 != 0, usize::from((agg >> 4) & 0x03));
            let mut at = 1;
            let mut idx = 0;
            while at < p.len() {
                let len = if w == 0 || idx + 1 < w {
                    let mut v = 0usize;
                    let mut n = 0;
                    loop {
                        let Some(&b) = p.get(at + n) else {
                            return false;
                        };
                        v |= usize::from(b & 0x7f) << (7 * n);
                        n += 1;
                        if b & 0x80 == 0 {
                            break;
                        }
                        if n >= 4 {
                            return false;
                        }
                    }
                    at += n;
                    v
                } else {
                    p.len() - at
                };
                let Some(el) = p.get(at..at + len) else {
                    return false;
                };
                if z && idx == 0 {
                    // A continuation joins a buffered head of at least one byte: an empty one
                    // could leave that head shorter than its extension header.
                    if el.is_empty() {
                        return false;
                    }
                } else if el.first().is_some_and(|h| h & 0x04 != 0) && el.len() < 2 {
                    return false;
                }
                at += len;
                idx += 1;
                if w != 0 && idx == w {
                    break;
                }
            }
            true
        }
        _ => true,
    }
}

/// Moves payload type `pt` to the front of the format list of the first `kind` m-section.
pub(crate) fn promote_payload_type(sdp: &str, kind: MediaKind, pt: u8) -> String {
    let prefix = match kind {
        MediaKind::Video => "m=video ",
        MediaKind::Audio => "m=audio ",
    };
    let mut done = false;
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        if !done && line.starts_with(prefix) {
            done = true;
            let body = line.trim_end_matches(['\r', '\n']);
            let ending = &line[body.len()..];
            let mut f: Vec<&str> = body.split(' ').collect();
            let pt = pt.to_string();
            if let Some(i) = f.iter().skip(3).position(|x| *x == pt) {
                let v = f.remove(3 + i);
                f.insert(3, v);
            }
            out.push_str(&f.join(" "));
            out.push_str(ending);
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Codecs of the sending m-sections of a remote description (`sendonly`/`sendrecv`, port != 0):
/// the first payload type of each, resolved through its `a=rtpmap`.
pub(crate) fn sdp_send_codecs(sdp: &str) -> Vec<(MediaKind, Codec)> {
    struct Section {
        kind: Option<MediaKind>,
        first_pt: Option<String>,
        sending: bool,
        codec: Option<Codec>,
    }
    fn finish(s: &Section, out: &mut Vec<(MediaKind, Codec)>) {
        if let (Some(k), Some(c), true) = (s.kind, s.codec, s.sending)
            && !out.iter().any(|(kk, _)| *kk == k)
        {
            out.push((k, c));
        }
    }
    let mut out = Vec::new();
    let mut cur: Option<Section> = None;
    for line in sdp.lines().take(10_000) {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            if let Some(s) = &cur {
                finish(s, &mut out);
            }
            let f: Vec<&str> = m.split_whitespace().collect();
            let kind = match f.first() {
                Some(&"video") => Some(MediaKind::Video),
                Some(&"audio") => Some(MediaKind::Audio),
                _ => None,
            };
            let port_ok = f.get(1).is_some_and(|p| *p != "0");
            cur = Some(Section {
                kind: if port_ok { kind } else { None },
                first_pt: f.get(3).map(|s| s.to_string()),
                sending: false,
                codec: None,
            });
        } else if let Some(s) = cur.as_mut() {
            if line == "a=sendonly" || line == "a=sendrecv" {
                s.sending = true;
            } else if let Some(r) = line.strip_prefix("a=rtpmap:") {
                let mut it = r.splitn(2, ' ');
                let pt = it.next().unwrap_or("");
                let name = it.next().unwrap_or("").split('/').next().unwrap_or("");
                if s.first_pt.as_deref() == Some(pt) {
                    s.codec = match name.to_ascii_lowercase().as_str() {
                        "vp8" => Some(Codec::Vp8),
                        "vp9" => Some(Codec::Vp9),
                        "av1" => Some(Codec::Av1),
                        "h264" => Some(Codec::H264),
                        "opus" => Some(Codec::Opus),
                        _ => None,
                    };
                }
            }
        }
    }
    if let Some(s) = &cur {
        finish(s, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16, ts: u32, marker: bool, payload: &[u8]) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                sequence_number: seq,
                timestamp: ts,
                marker,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn reorder_waits_then_skips() {
        let mut r = Reorder::new();
        let t0 = Instant::now();
        assert_eq!(r.push(pkt(65535, 0, false, b"a"), t0).len(), 1);
        assert!(r.push(pkt(1, 0, false, b"c"), t0).is_empty()); // 0 missing
        let out = r.push(pkt(0, 0, false, b"b"), t0);
        assert_eq!(out.len(), 2);
        assert!(!out[0].1 && !out[1].1);
        assert!(r.push(pkt(3, 0, false, b"e"), t0).is_empty()); // 2 missing
        let wait = r.wait();
        let out = r.drain(t0 + wait);
        assert_eq!(out.len(), 1);
        assert!(out[0].1, "gap flagged");
        // The missing packet comes after it was given up: dropped, and the wait grows to
        // cover such a repair next time.
        let late = t0 + wait + Duration::from_millis(400);
        assert!(
            r.push(pkt(2, 0, false, b"late"), late).is_empty(),
            "late dropped"
        );
        assert!(
            r.wait() >= wait + Duration::from_millis(400),
            "{:?}",
            r.wait()
        );
        assert!(r.wait() <= REORDER_WAIT_MAX);
        // Later, with repairs arriving quickly, it shrinks back towards them.
        let grown = r.wait();
        let mut t = late;
        for seq in 4u16..14 {
            t += REORDER_DECAY_WINDOW;
            assert_eq!(r.push(pkt(seq, 0, false, b"x"), t).len(), 1);
        }
        assert!(
            r.wait() < grown && r.wait() >= REORDER_WAIT_MIN,
            "{:?}",
            r.wait()
        );
    }

    #[test]
    fn vp8_frames_assemble() {
        let mut b = FrameBuilder::new(Codec::Vp8);
        // VP8 descriptor 0x10 = S bit, PID 0; 0x00 = continuation.
        // (The depacketizer wants at least 4 payload bytes.)
        assert!(
            b.push(&pkt(1, 90, false, &[0x10, 1, 2, 3]), false)
                .is_none()
        );
        let f = b.push(&pkt(2, 90, true, &[0x00, 4, 5, 6]), false).unwrap();
        assert_eq!(&f.data[..], &[1, 2, 3, 4, 5, 6]);
        assert!(!f.after_gap);
        // Lost head: the continuation is dropped and the next frame is flagged.
        assert!(b.push(&pkt(4, 180, true, &[0x00, 9, 9, 9]), true).is_none());
        let f = b.push(&pkt(5, 270, true, &[0x10, 7, 7, 7]), false).unwrap();
        assert!(f.after_gap);
    }

    #[test]
    fn malformed_payloads_do_not_panic() {
        let cases: [(Codec, &[u8]); 6] = [
            (Codec::H264, &[0x78, 0x00, 0x02, 0x67, 0x42, 0x00]), // STAP-A cut in a length
            (Codec::H264, &[0x78, 0x00, 0x09, 0x67]),             // STAP-A length past the end
            (Codec::Av1, &[0x10, 0x0c]),                          // OBU with extension bit, 1 byte
            (Codec::Av1, &[0x00, 0x01, 0x0e]),                    // same, length-prefixed
            (Codec::Av1, &[0x10, 0x0e]),                          // same with size bit
            (Codec::Vp9, &[0xff]),
        ];
        for (codec, payload) in cases {
            let mut b = FrameBuilder::new(codec);
            assert!(
                b.push(&pkt(1, 0, true, payload), false).is_none(),
                "{codec}"
            );
        }
        // Random payloads: never a panic.
        let mut x = 0x9e37_79b9_u32;
        for codec in [Codec::H264, Codec::Av1, Codec::Vp9] {
            let mut b = FrameBuilder::new(codec);
            for i in 0..3000u16 {
                let len = (x % 40) as usize;
                let payload: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                let _ = b.push(&pkt(i, u32::from(i / 3), i % 3 == 2, &payload), i % 50 == 0);
            }
        }
    }

    #[test]
    fn promote_pt() {
        let sdp = "v=0\r\nm=audio 9 X 111 9\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 98 125 97\r\na=x\r\n";
        let out = promote_payload_type(sdp, MediaKind::Video, 125);
        assert_eq!(
            out,
            "v=0\r\nm=audio 9 X 111 9\r\nm=video 9 UDP/TLS/RTP/SAVPF 125 96 98 97\r\na=x\r\n"
        );
        assert_eq!(promote_payload_type(sdp, MediaKind::Video, 7), sdp);
    }

    #[test]
    fn sdp_codecs() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=rtpmap:96 VP8/90000\r\na=sendonly\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=sendonly\r\n\
                   m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
        assert_eq!(
            sdp_send_codecs(sdp),
            vec![
                (MediaKind::Video, Codec::Vp8),
                (MediaKind::Audio, Codec::Opus)
            ]
        );
    }

    /// (decrypted frame if it decrypts, after_gap, uncertain, source frame index)
    type Reassembled = (Option<Bytes>, bool, bool, u32);

    /// Packetizes every frame of a fixture as the broadcaster does, optionally dropping
    /// packets, and reassembles with [`FrameBuilder`]: returns (source index, decrypted frame,
    /// after_gap, uncertain) for every frame that comes out.
    fn through_rtp(
        name: &str,
        codec: Codec,
        drop: impl Fn(usize) -> bool,
    ) -> (Vec<Bytes>, Vec<Reassembled>) {
        use crate::media::e2ee::MediaKey;
        use rtc::rtp::packetizer::Payloader;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let frames = crate::media::source::read_all_frames(path).unwrap();
        let key = MediaKey::new([5; 32]);
        let mut pay: Box<dyn Payloader> = match codec {
            Codec::H264 => Box::new(rtp::codec::h264::H264Payloader::default()),
            Codec::Av1 => Box::new(rtp::codec::av1::Av1Payloader::default()),
            _ => Box::new(rtp::codec::vp9::Vp9Payloader::default()),
        };
        let mut b = FrameBuilder::new(codec);
        let mut r = Reorder::new();
        let t0 = Instant::now();
        let (mut seq, mut n) = (0u16, 0usize);
        let mut out = Vec::new();
        let (mut plain_bytes, mut enc_bytes, mut rtp_bytes) = (0, 0, 0);
        for (i, f) in frames.iter().enumerate() {
            let enc = key.encrypt_frame(codec, &f.data).unwrap();
            let payloads = pay.payload(1200, &enc).unwrap();
            plain_bytes += f.data.len();
            enc_bytes += enc.len();
            rtp_bytes += payloads.iter().map(|p| p.len()).sum::<usize>();
            let last = payloads.len() - 1;
            for (j, payload) in payloads.into_iter().enumerate() {
                let p = pkt(seq, 3000 * i as u32, j == last, &payload);
                seq = seq.wrapping_add(1);
                n += 1;
                if drop(n - 1) {
                    continue;
                }
                // A lost packet is declared a gap once its wait expires.
                for (p, gap) in r
                    .push(p, t0)
                    .into_iter()
                    .chain(r.drain(t0 + REORDER_WAIT_MAX))
                {
                    if let Some(fr) = b.push(&p, gap) {
                        let plain = key.decrypt_frame(codec, &fr.data).ok();
                        out.push((plain, fr.after_gap, fr.uncertain, fr.rtp_ts / 3000));
                    }
                }
            }
        }
        eprintln!(
            "{name}: {} frames, {plain_bytes} B plain, {enc_bytes} B protected, \
             {rtp_bytes} B in {n} RTP payloads",
            frames.len()
        );
        (frames.into_iter().map(|f| f.data).collect(), out)
    }

    #[test]
    fn h264_vp9_av1_through_payloaders_byte_identical() {
        for (name, codec) in [
            ("f.h264", Codec::H264),
            ("f_vp9.ivf", Codec::Vp9),
            ("f_av1.ivf", Codec::Av1),
        ] {
            let (src, got) = through_rtp(name, codec, |_| false);
            assert_eq!(got.len(), src.len(), "{name}: every frame comes out");
            for (i, (plain, gap, _, idx)) in got.iter().enumerate() {
                assert_eq!(*idx as usize, i);
                assert!(!gap);
                assert_eq!(plain.as_ref(), Some(&src[i]), "{name} frame {i}");
            }
        }
    }

    #[test]
    fn lost_packets_never_yield_a_wrong_frame() {
        for (name, codec) in [
            ("f.h264", Codec::H264),
            ("f_vp9.ivf", Codec::Vp9),
            ("f_av1.ivf", Codec::Av1),
        ] {
            // Drop every 7th packet: frames are lost, none is corrupted.
            let (src, got) = through_rtp(name, codec, |n| n % 7 == 3);
            assert!(!got.is_empty() && got.len() < src.len(), "{name}");
            let mut ok = 0;
            for (plain, _, uncertain, idx) in &got {
                match plain {
                    Some(p) => {
                        assert_eq!(p, &src[*idx as usize], "{name} frame {idx}");
                        ok += 1;
                    }
                    // Only a frame whose start could not be proven may fail to decrypt.
                    None => assert!(uncertain, "{name} frame {idx} failed to decrypt"),
                }
            }
            assert!(ok > 0, "{name}");
        }
    }
}
