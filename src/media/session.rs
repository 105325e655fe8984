//! The node-facing API: a [`Broadcaster`] (root of the tree, fed by sources) and a [`Viewer`]
//! (receives from a parent, plays locally, relays to children).
//!
//! Signalling stays outside: the child calls [`Viewer::connect_parent`] for an offer, the
//! signalling layer carries it to the parent, whose `attach_child` returns the answer, which
//! comes back through [`Viewer::parent_answer`]. Repair is the same exchange with
//! [`Viewer::switch_parent`]; the children of the repaired node keep their connections.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp::packetizer::Payloader;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};
use webrtc::data_channel::DataChannelEvent;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::e2ee::{E2eeError, MediaKey, is_keyframe};
use super::peer::{MediaConfig, Peer, PeerError, PeerEvent, SignalBlob};
use super::relay::{FrameBuilder, Hub, Item, Reorder, keyframe_coalescer, sdp_send_codecs};
use super::sink::{DataSink, FrameSink, SinkTarget};
use super::source::{MediaSource, SourceError};
use super::{Codec, MediaKind};

/// Capacity of a session's event stream.
pub const EVENT_QUEUE: usize = 256;
/// Packets queued between the network and local playback.
const PLAYBACK_QUEUE: usize = 4096;
/// RTP payload budget (leaves room for SRTP and IP/UDP headers under a 1280-byte path MTU).
const RTP_MTU: usize = 1200;
/// How often a [`MediaEvent::Stats`] is emitted.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Identifies a child connection of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChildId(pub u64);

/// Why a child was removed from the fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CutReason {
    /// Its queue was full: it could not keep up.
    Slow,
    /// Its connection failed or closed.
    Disconnected,
}

/// What happens in a session. Delivered on a bounded channel; dropped if the consumer lags.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum MediaEvent {
    /// The connection to the parent is up.
    ParentConnected,
    /// The connection to the parent failed or closed: time to [`Viewer::switch_parent`].
    ParentLost,
    /// Nothing (no media, no RTCP report) arrived from the parent for a while although the
    /// room carries media: the parent is frozen, dead or cut off (see
    /// [`relay::PARENT_SILENT`](super::relay::PARENT_SILENT)). Time to switch parent, as for
    /// [`MediaEvent::ParentLost`].
    ParentStalled {
        /// How long nothing arrived.
        silent: Duration,
    },
    /// The first frame of a kind was written, this long after the session started.
    FirstFrame {
        /// Audio or video.
        kind: MediaKind,
        /// Time since the session was created.
        after: Duration,
    },
    /// A child's connection is up.
    ChildConnected(ChildId),
    /// A child was removed from the fan-out.
    ChildCut {
        /// Which child.
        id: ChildId,
        /// Why.
        reason: CutReason,
    },
    /// A frame or message did not decrypt (wrong media key?); nothing was written for it.
    DecryptFailed(E2eeError),
    /// A sink failed; it is disabled.
    SinkFailed(String),
    /// A source ended (or failed, with the reason).
    SourceEnded {
        /// Which track.
        kind: MediaKind,
        /// The error, if it did not end cleanly.
        error: Option<String>,
    },
    /// Periodic statistics.
    Stats(MediaStats),
}

/// Counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaStats {
    /// RTP packets received from the parent (or produced, at the broadcaster).
    pub packets_in: u64,
    /// Bytes of RTP payload received or produced.
    pub bytes_in: u64,
    /// Inbound bitrate over the last stats interval, bits per second.
    pub bitrate_bps: u64,
    /// Gaps (lost packets not repaired in time) seen by playback.
    pub gaps: u64,
    /// Packets handed to children's queues.
    pub packets_forwarded: u64,
    /// Video frames written to the sink.
    pub video_frames: u64,
    /// Audio frames written to the sink.
    pub audio_frames: u64,
    /// Frames dropped by playback (waiting for a keyframe, or queue overflow).
    pub frames_dropped: u64,
    /// Frames or messages that failed to decrypt.
    pub decrypt_failures: u64,
    /// Data messages received.
    pub data_messages: u64,
    /// Current children.
    pub children: u64,
    /// Children cut so far.
    pub children_cut: u64,
}

/// Errors of the session API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Peer connection or signalling error.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// No upstream track is known yet (a viewer must apply its parent's answer first).
    #[error("no upstream media yet: apply the parent's answer before attaching children")]
    NoUpstream,
    /// No parent connection is pending an answer.
    #[error("no parent offer is pending")]
    NoPendingParent,
    /// No connected parent to restart ICE with.
    #[error("no connected parent")]
    NoParent,
    /// No child with this id (gone, or cut).
    #[error("no such child")]
    NoSuchChild,
    /// The codec cannot be relayed end-to-end encrypted (see [`Codec::relayable`]).
    #[error("codec {0} cannot be relayed with end-to-end encryption yet")]
    UnsupportedCodec(Codec),
    /// Two sources of the same kind.
    #[error("two {0:?} sources")]
    DuplicateKind(MediaKind),
    /// Encryption failed.
    #[error(transparent)]
    E2ee(#[from] E2eeError),
    /// A source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl From<webrtc::error::Error> for SessionError {
    fn from(e: webrtc::error::Error) -> Self {
        SessionError::Peer(PeerError::WebRtc(e))
    }
}

fn snapshot(hub: &Hub, last_bytes: &mut u64, elapsed: Duration) -> MediaStats {
    let c = &hub.counters;
    let bytes = c.bytes_in.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-3);
    let bitrate = ((bytes.saturating_sub(*last_bytes)) as f64 * 8.0 / secs) as u64;
    *last_bytes = bytes;
    MediaStats {
        packets_in: c.packets_in.load(Ordering::Relaxed),
        bytes_in: bytes,
        bitrate_bps: bitrate,
        gaps: c.packets_lost.load(Ordering::Relaxed),
        packets_forwarded: c.packets_forwarded.load(Ordering::Relaxed),
        video_frames: c.frames_video.load(Ordering::Relaxed),
        audio_frames: c.frames_audio.load(Ordering::Relaxed),
        frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
        decrypt_failures: c.decrypt_failures.load(Ordering::Relaxed),
        data_messages: c.data_messages.load(Ordering::Relaxed),
        children: hub.child_count() as u64,
        children_cut: c.children_cut.load(Ordering::Relaxed),
    }
}

fn spawn_stats(hub: &Arc<Hub>) {
    let weak = Arc::downgrade(hub);
    let h = tokio::spawn(async move {
        let mut last = 0u64;
        let mut tick = tokio::time::interval(STATS_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(hub) = weak.upgrade() else { return };
            let s = snapshot(&hub, &mut last, STATS_INTERVAL);
            hub.emit(MediaEvent::Stats(s));
        }
    });
    hub.track_task(h.abort_handle());
}

/// Both roles show their tracks (keys, sources and sinks stay out of logs).
fn fmt_session(f: &mut std::fmt::Formatter<'_>, role: &str, hub: &Hub) -> std::fmt::Result {
    f.debug_struct(role).field("tracks", &hub.tracks()).finish()
}

// ------------------------------------------------------------------ broadcaster

/// The root of a tree: packetizes its sources' frames (encrypted) and fans them out.
pub struct Broadcaster {
    hub: Arc<Hub>,
    key: MediaKey,
    sources: StdMutex<Vec<Box<dyn MediaSource>>>,
}

impl std::fmt::Debug for Broadcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_session(f, "Broadcaster", &self.hub)
    }
}

/// `attach_child` and `detach_child`, the same in both roles: each hands the child to the hub.
macro_rules! child_methods {
    ($attach_doc:literal) => {
        #[doc = $attach_doc]
        pub async fn attach_child(
            &self,
            offer: &SignalBlob,
        ) -> Result<(ChildId, SignalBlob), SessionError> {
            self.hub.attach_child(offer).await
        }

        /// Answers a child's offer that restarts ICE on its connection (see
        /// [`Viewer::restart_parent`]).
        pub async fn restart_child(
            &self,
            id: ChildId,
            offer: &SignalBlob,
        ) -> Result<SignalBlob, SessionError> {
            self.hub.restart_child(id, offer).await
        }

        /// Disconnects a child. Returns whether it existed.
        pub fn detach_child(&self, id: ChildId) -> bool {
            self.hub.remove_child(id)
        }
    };
}
impl Broadcaster {
    /// A broadcaster of `sources` (at most one video and one audio). Media flows once
    /// [`start`](Self::start) is called, so children attached before it get every frame.
    pub fn new(
        sources: Vec<Box<dyn MediaSource>>,
        media_key: MediaKey,
        config: MediaConfig,
    ) -> Result<(Broadcaster, mpsc::Receiver<MediaEvent>), SessionError> {
        let mut tracks = Vec::new();
        for s in &sources {
            let c = s.codec();
            if !c.relayable() {
                return Err(SessionError::UnsupportedCodec(c));
            }
            if tracks.iter().any(|(k, _)| *k == c.kind()) {
                return Err(SessionError::DuplicateKind(c.kind()));
            }
            tracks.push((c.kind(), c));
        }
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (hub, mut kf_rx) = Hub::new(config, ev_tx);
        hub.set_tracks(tracks);
        // A file source cannot produce a keyframe on demand: its requests are absorbed here; a
        // live source that can (a WebRTC publisher) gets them.
        let kf_sinks: Vec<mpsc::Sender<()>> = sources
            .iter()
            .filter_map(|s| s.keyframe_requests())
            .collect();
        hub.track_task(
            tokio::spawn(async move {
                while kf_rx.recv().await.is_some() {
                    for k in &kf_sinks {
                        let _ = k.try_send(());
                    }
                }
            })
            .abort_handle(),
        );
        spawn_stats(&hub);
        Ok((
            Broadcaster {
                hub,
                key: media_key,
                sources: StdMutex::new(sources),
            },
            ev_rx,
        ))
    }

    child_methods!("Accepts a child's offer; returns its id and the answer to send back.");

    /// Starts reading the sources (once; later calls do nothing).
    pub fn start(&self) {
        let sources = std::mem::take(&mut *self.sources.lock().expect("lock"));
        for src in sources {
            let hub = Arc::clone(&self.hub);
            let key = self.key.clone();
            let h = tokio::spawn(pump(src, key, Arc::downgrade(&hub)));
            self.hub.track_task(h.abort_handle());
        }
    }

    /// Sends an application message down the tree (encrypted, ordered, reliable per hop).
    pub fn send_data(&self, msg: &[u8]) -> Result<(), SessionError> {
        let p = self.key.encrypt_data(msg)?;
        self.hub.forward(Item::Data(p));
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> MediaStats {
        snapshot(&self.hub, &mut 0, Duration::from_secs(1))
    }
}

impl Drop for Broadcaster {
    fn drop(&mut self) {
        self.hub.shutdown();
    }
}

async fn pump(mut src: Box<dyn MediaSource>, key: MediaKey, hub: std::sync::Weak<Hub>) {
    let codec = src.codec();
    let kind = codec.kind();
    let mut payloader: Box<dyn Payloader> = match codec {
        Codec::Vp8 => {
            let mut p = rtp::codec::vp8::Vp8Payloader::default();
            p.enable_picture_id = true;
            Box::new(p)
        }
        Codec::Vp9 => Box::new(rtp::codec::vp9::Vp9Payloader::default()),
        Codec::H264 => Box::new(rtp::codec::h264::H264Payloader::default()),
        Codec::Av1 => Box::new(rtp::codec::av1::Av1Payloader::default()),
        Codec::Opus => Box::new(rtp::codec::opus::OpusPayloader),
    };
    let mut seq: u16 = rand::random();
    let ts_base: u32 = rand::random();
    let clock = codec.clock_rate() as u128;
    let result: Result<(), String> = async {
        while let Some(s) = src.next_sample().await.map_err(|e| e.to_string())? {
            let Some(hub) = hub.upgrade() else {
                return Ok(());
            };
            let enc = match key.encrypt_frame(codec, &s.data) {
                Ok(e) => e,
                // A frame with nothing the RTP path can carry (say, an access unit delimiter
                // alone) is skipped, not fatal.
                Err(e @ E2eeError::Malformed(..)) => {
                    warn!(%codec, "frame skipped: {e}");
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let payloads = payloader
                .payload(RTP_MTU, &enc)
                .map_err(|e| e.to_string())?;
            let ts = ts_base.wrapping_add((s.pts.as_nanos() * clock / 1_000_000_000) as u32);
            let n = payloads.len();
            for (i, payload) in payloads.into_iter().enumerate() {
                let pkt = rtp::Packet {
                    header: rtp::header::Header {
                        version: 2,
                        marker: kind == MediaKind::Video && i + 1 == n,
                        sequence_number: seq,
                        timestamp: ts,
                        ..Default::default()
                    },
                    payload,
                };
                seq = seq.wrapping_add(1);
                hub.counters.packets_in.fetch_add(1, Ordering::Relaxed);
                hub.counters
                    .bytes_in
                    .fetch_add(pkt.payload.len() as u64, Ordering::Relaxed);
                hub.forward(Item::Rtp(kind, pkt));
            }
            let frames = match kind {
                MediaKind::Video => &hub.counters.frames_video,
                MediaKind::Audio => &hub.counters.frames_audio,
            };
            frames.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    if let Some(hub) = hub.upgrade() {
        hub.emit(MediaEvent::SourceEnded {
            kind,
            error: result.err(),
        });
    }
}

// ------------------------------------------------------------------ viewer

/// Where a viewer writes what it receives. Each sink is created on its first valid frame, so a
/// wrong key leaves no file at all.
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    /// Video output: IVF for VP8, VP9 and AV1, an Annex-B byte stream for H.264.
    pub video: Option<SinkTarget>,
    /// Ogg Opus output for audio.
    pub audio: Option<SinkTarget>,
    /// Line output for data-channel messages.
    pub data: Option<SinkTarget>,
}

enum Play {
    Rtp(MediaKind, rtp::Packet),
    Data(Bytes),
    Close(tokio::sync::oneshot::Sender<()>),
}

type UpstreamVideo = Arc<StdMutex<Option<(Arc<dyn TrackRemote>, u32)>>>;

struct ParentLink {
    peer: Arc<Peer>,
    tasks: Vec<AbortHandle>,
    answered: bool,
}

impl ParentLink {
    fn close(self) {
        for t in &self.tasks {
            t.abort();
        }
        let peer = self.peer;
        tokio::spawn(async move { peer.close().await });
    }
}

/// A viewer: receives from one parent, plays into sinks, relays to children.
pub struct Viewer {
    hub: Arc<Hub>,
    parent: tokio::sync::Mutex<Option<ParentLink>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    play_tx: mpsc::Sender<Play>,
    upstream_video: UpstreamVideo,
    started: Instant,
}

impl std::fmt::Debug for Viewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_session(f, "Viewer", &self.hub)
    }
}

impl Viewer {
    /// A viewer decrypting with `media_key` into `sinks`.
    pub fn new(
        media_key: MediaKey,
        sinks: Sinks,
        config: MediaConfig,
    ) -> (Viewer, mpsc::Receiver<MediaEvent>) {
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (hub, kf_rx) = Hub::new(config, ev_tx);
        let upstream_video: UpstreamVideo = Arc::new(StdMutex::new(None));
        let up = Arc::clone(&upstream_video);
        let kf = tokio::spawn(keyframe_coalescer(kf_rx, move || {
            let target = up.lock().expect("lock").clone();
            async move {
                if let Some((track, ssrc)) = target {
                    let pli = PictureLossIndication {
                        sender_ssrc: 0,
                        media_ssrc: ssrc,
                    };
                    let _ = track.write_rtcp(vec![Box::new(pli)]).await;
                }
            }
        }));
        hub.track_task(kf.abort_handle());
        let (play_tx, play_rx) = mpsc::channel(PLAYBACK_QUEUE);
        let started = Instant::now();
        let p = tokio::spawn(playback(
            play_rx,
            Arc::downgrade(&hub),
            media_key,
            sinks,
            started,
        ));
        hub.track_task(p.abort_handle());
        spawn_stats(&hub);
        (
            Viewer {
                hub,
                parent: tokio::sync::Mutex::new(None),
                generation: Arc::new(0.into()),
                play_tx,
                upstream_video,
                started,
            },
            ev_rx,
        )
    }

    /// Opens a connection to a (new) parent and returns the offer to send it. Any previous
    /// parent connection is closed; children stay attached.
    pub async fn connect_parent(&self) -> Result<SignalBlob, SessionError> {
        let gen_id = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (ev_tx, ev_rx) = mpsc::channel(super::peer::PEER_EVENT_QUEUE);
        let peer = Arc::new(Peer::new(&self.hub.config, ev_tx).await?);
        for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
            peer.pc
                .add_transceiver_from_kind(
                    kind,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Recvonly,
                        ..Default::default()
                    }),
                )
                .await?;
        }
        let dc = peer.pc.create_data_channel("waterfall", None).await?;
        let offer = peer.create_offer().await?;
        let mut tasks = Vec::new();
        // Data from the parent: forward down, then play.
        {
            let hub = Arc::downgrade(&self.hub);
            let play = self.play_tx.clone();
            tasks.push(
                tokio::spawn(async move {
                    while let Some(ev) = dc.poll().await {
                        match ev {
                            DataChannelEvent::OnMessage(m) => {
                                let b = m.data.freeze();
                                if let Some(h) = hub.upgrade() {
                                    h.counters.data_messages.fetch_add(1, Ordering::Relaxed);
                                    h.forward(Item::Data(b.clone()));
                                }
                                // Awaited: data lines must not be lost; this back-pressures SCTP.
                                if play.send(Play::Data(b)).await.is_err() {
                                    return;
                                }
                            }
                            DataChannelEvent::OnClose => return,
                            _ => {}
                        }
                    }
                })
                .abort_handle(),
            );
        }
        tasks.push(
            tokio::spawn(parent_events(
                ev_rx,
                Arc::downgrade(&self.hub),
                self.play_tx.clone(),
                Arc::clone(&self.upstream_video),
                Arc::clone(&self.generation),
                gen_id,
            ))
            .abort_handle(),
        );
        // A frozen or dead parent sends nothing, not even a failure: the watchdog notices.
        {
            let generation = Arc::clone(&self.generation);
            tasks.push(
                tokio::spawn(super::relay::parent_watchdog(
                    Arc::downgrade(&peer),
                    Arc::downgrade(&self.hub),
                    move || generation.load(Ordering::SeqCst) == gen_id,
                ))
                .abort_handle(),
            );
        }
        let old = self.parent.lock().await.replace(ParentLink {
            peer,
            tasks,
            answered: false,
        });
        if let Some(old) = old {
            old.close();
        }
        Ok(offer)
    }

    /// Repair: the same as [`connect_parent`](Self::connect_parent), named for intent.
    pub async fn switch_parent(&self) -> Result<SignalBlob, SessionError> {
        self.connect_parent().await
    }

    /// Restarts ICE with the current parent (this node's network changed) and returns the offer
    /// to send it; its answer goes to [`parent_answer`](Self::parent_answer). The connection
    /// (DTLS, tracks, the children relayed from it) is kept, and the parent watchdog allows
    /// [`ICE_RESTART_QUIET`](super::peer::ICE_RESTART_QUIET) of silence meanwhile: a restart
    /// that does not bring media back within it ends in a repair as usual.
    pub async fn restart_parent(&self) -> Result<SignalBlob, SessionError> {
        let mut guard = self.parent.lock().await;
        let link = guard.as_mut().ok_or(SessionError::NoParent)?;
        if !link.answered {
            return Err(SessionError::NoParent);
        }
        link.peer.expect_quiet(super::peer::ICE_RESTART_QUIET);
        let offer = link.peer.restart_offer().await?;
        link.answered = false;
        Ok(offer)
    }

    /// Applies the parent's answer to the pending offer.
    pub async fn parent_answer(&self, answer: &SignalBlob) -> Result<(), SessionError> {
        let mut guard = self.parent.lock().await;
        let link = guard.as_mut().ok_or(SessionError::NoPendingParent)?;
        if link.answered {
            return Err(SessionError::NoPendingParent);
        }
        link.peer.apply_answer(answer).await?;
        link.answered = true;
        let tracks: Vec<(MediaKind, Codec)> = sdp_send_codecs(&answer.sdp)
            .into_iter()
            .filter(|(_, c)| c.relayable())
            .collect();
        // No track at all is a data-only room: children still attach for the data channel.
        self.hub.set_tracks(tracks);
        Ok(())
    }

    child_methods!("Accepts a child's offer (requires the parent's answer to have been applied).");

    /// Asks the parent for a keyframe (coalesced with the children's requests): a local
    /// consumer of the decrypted frames (a WHEP player) that starts now needs one to decode.
    pub fn request_keyframe(&self) {
        self.hub.request_keyframe();
    }

    /// Current counters.
    pub fn stats(&self) -> MediaStats {
        snapshot(&self.hub, &mut 0, Duration::from_secs(1))
    }

    /// Time since this viewer was created.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops playback and closes the sinks (fixing up headers); connections are closed too.
    pub async fn close(self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.play_tx.send(Play::Close(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.hub.shutdown();
        if let Ok(mut p) = self.parent.try_lock()
            && let Some(link) = p.take()
        {
            link.close();
        }
    }
}

async fn parent_events(
    mut rx: mpsc::Receiver<PeerEvent>,
    hub: std::sync::Weak<Hub>,
    play: mpsc::Sender<Play>,
    upstream_video: UpstreamVideo,
    generation: Arc<std::sync::atomic::AtomicU64>,
    gen_id: u64,
) {
    let mut readers: Vec<AbortHandle> = Vec::new();
    while let Some(ev) = rx.recv().await {
        let current = generation.load(Ordering::SeqCst) == gen_id;
        let Some(h) = hub.upgrade() else { break };
        match ev {
            PeerEvent::State(RTCPeerConnectionState::Connected) if current => {
                info!("parent connected");
                h.emit(MediaEvent::ParentConnected);
            }
            PeerEvent::State(RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed)
                if current =>
            {
                warn!("parent lost");
                h.emit(MediaEvent::ParentLost);
            }
            PeerEvent::Track(track) => {
                let kind = match track.kind().await {
                    RtpCodecKind::Audio => MediaKind::Audio,
                    _ => MediaKind::Video,
                };
                if kind == MediaKind::Video {
                    let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
                    *upstream_video.lock().expect("lock") = Some((Arc::clone(&track), ssrc));
                    h.request_keyframe();
                }
                let hub = hub.clone();
                let play = play.clone();
                readers.push(
                    tokio::spawn(async move {
                        while let Some(ev) = track.poll().await {
                            match ev {
                                TrackRemoteEvent::OnRtpPacket(p) => {
                                    let Some(h) = hub.upgrade() else { return };
                                    h.counters.packets_in.fetch_add(1, Ordering::Relaxed);
                                    h.counters
                                        .bytes_in
                                        .fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                                    h.forward(Item::Rtp(kind, p.clone()));
                                    if play.try_send(Play::Rtp(kind, p)).is_err() {
                                        h.counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                TrackRemoteEvent::OnEnded => return,
                                _ => {}
                            }
                        }
                    })
                    .abort_handle(),
                );
            }
            _ => {}
        }
    }
    for r in readers {
        r.abort();
    }
}

struct PlayTrack {
    reorder: Reorder,
    builder: Option<FrameBuilder>,
    need_keyframe: bool,
    first_ts: Option<u32>,
    sink: Option<Box<dyn FrameSink>>,
    target: Option<SinkTarget>,
    written: bool,
}

async fn playback(
    mut rx: mpsc::Receiver<Play>,
    hub: std::sync::Weak<Hub>,
    key: MediaKey,
    sinks: Sinks,
    started: Instant,
) {
    let mk = |target: Option<SinkTarget>| PlayTrack {
        reorder: Reorder::new(),
        builder: None,
        need_keyframe: true,
        first_ts: None,
        sink: None,
        target,
        written: false,
    };
    let mut video = mk(sinks.video.clone());
    let mut audio = mk(sinks.audio.clone());
    let mut data_target = sinks.data.clone();
    let mut data_sink: Option<DataSink> = None;
    let mut decrypt_errors = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let (kind, ready) = tokio::select! {
            m = rx.recv() => match m {
                None => break,
                Some(Play::Close(done)) => {
                    for t in [&mut video, &mut audio] {
                        if let Some(s) = t.sink.as_mut() { let _ = s.close(); }
                    }
                    let _ = done.send(());
                    return;
                }
                Some(Play::Data(b)) => {
                    let Some(h) = hub.upgrade() else { return };
                    match key.decrypt_data(&b) {
                        Ok(msg) => {
                            if let Some(SinkTarget::Channel(tx)) = &data_target {
                                // In order, nothing dropped: wait for the program to read.
                                if tx.send(msg.clone()).await.is_err() {
                                    data_target = None;
                                }
                                continue;
                            }
                            if data_sink.is_none() && let Some(t) = data_target.take() {
                                match DataSink::create(&t) {
                                    Ok(s) => data_sink = Some(s),
                                    Err(e) => h.emit(MediaEvent::SinkFailed(e.to_string())),
                                }
                            }
                            if let Some(s) = data_sink.as_mut() && let Err(e) = s.write_message(&msg) {
                                h.emit(MediaEvent::SinkFailed(e.to_string()));
                                data_sink = None;
                            }
                        }
                        Err(e) => {
                            h.counters.decrypt_failures.fetch_add(1, Ordering::Relaxed);
                            if decrypt_errors.is_multiple_of(100) { h.emit(MediaEvent::DecryptFailed(e)); }
                            decrypt_errors += 1;
                        }
                    }
                    continue;
                }
                Some(Play::Rtp(kind, p)) => {
                    let now = Instant::now();
                    let t = if kind == MediaKind::Video { &mut video } else { &mut audio };
                    (kind, t.reorder.push(p, now))
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let v = video.reorder.drain(now);
                let a = audio.reorder.drain(now);
                if !v.is_empty() { handle_ready(MediaKind::Video, &mut video, v, &hub, &key, started, &mut decrypt_errors); }
                if !a.is_empty() { handle_ready(MediaKind::Audio, &mut audio, a, &hub, &key, started, &mut decrypt_errors); }
                continue;
            }
        };
        let t = if kind == MediaKind::Video {
            &mut video
        } else {
            &mut audio
        };
        handle_ready(kind, t, ready, &hub, &key, started, &mut decrypt_errors);
    }
}

fn handle_ready(
    kind: MediaKind,
    t: &mut PlayTrack,
    ready: Vec<(rtp::Packet, bool)>,
    hub: &std::sync::Weak<Hub>,
    key: &MediaKey,
    started: Instant,
    decrypt_errors: &mut u64,
) {
    let Some(h) = hub.upgrade() else { return };
    let Some(codec) = h
        .tracks()
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, c)| c)
    else {
        return;
    };
    let builder = t.builder.get_or_insert_with(|| FrameBuilder::new(codec));
    for (p, gap) in ready {
        if gap {
            h.counters.packets_lost.fetch_add(1, Ordering::Relaxed);
        }
        let Some(frame) = builder.push(&p, gap) else {
            continue;
        };
        let plain = match key.decrypt_frame(codec, &frame.data) {
            Ok(p) => p,
            Err(_) if frame.uncertain => {
                // Probably a frame whose first packets were never received: not a key problem.
                h.counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
                t.need_keyframe = true;
                continue;
            }
            Err(e) => {
                h.counters.decrypt_failures.fetch_add(1, Ordering::Relaxed);
                if decrypt_errors.is_multiple_of(100) {
                    h.emit(MediaEvent::DecryptFailed(e));
                }
                *decrypt_errors += 1;
                continue;
            }
        };
        if kind == MediaKind::Video {
            if frame.after_gap {
                t.need_keyframe = true;
            }
            if t.need_keyframe {
                if !is_keyframe(codec, &plain) {
                    h.counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
                    h.request_keyframe();
                    continue;
                }
                t.need_keyframe = false;
            }
        }
        if t.sink.is_none()
            && let Some(target) = t.target.take()
        {
            let made = super::sink::create_frame_sink(kind, &target, codec);
            match made {
                Ok(s) => t.sink = Some(s),
                Err(e) => h.emit(MediaEvent::SinkFailed(e.to_string())),
            }
        }
        let first = *t.first_ts.get_or_insert(frame.rtp_ts);
        let units = frame.rtp_ts.wrapping_sub(first) as u64;
        let pts = Duration::from_nanos(units * 1_000_000_000 / codec.clock_rate() as u64);
        if let Some(s) = t.sink.as_mut()
            && let Err(e) = s.write_frame(&plain, pts)
        {
            h.emit(MediaEvent::SinkFailed(e.to_string()));
            t.sink = None;
        }
        let counter = match kind {
            MediaKind::Video => &h.counters.frames_video,
            MediaKind::Audio => &h.counters.frames_audio,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !t.written {
            t.written = true;
            h.emit(MediaEvent::FirstFrame {
                kind,
                after: started.elapsed(),
            });
        }
    }
}
