//! WHIP: a publisher (a browser, OBS, GStreamer) broadcasts a room through this node.
//!
//! The offer is answered at once (non-trickle, like every WHIP server); the room starts when
//! the publisher's tracks arrive: each track's RTP is put back in order and reassembled into
//! frames (the viewer's [`Reorder`] and [`FrameBuilder`], which know VP8, VP9, H.264, AV1 and
//! Opus), and the frames go to the node's broadcaster as an ordinary [`MediaSource`]
//! ([`ChannelSource`]), so they are encrypted and relayed into the tree exactly like a file's —
//! no transcoding. The clear frames also go to the room's [`Feed`], for players on this node.
//!
//! A browser sends a keyframe only when asked: every keyframe request the broadcaster receives
//! (a new child, a viewer that lost packets), a local player's, and this module's own after a
//! gap become a PLI to the publisher, at most one per [`PLI_INTERVAL`].
//!
//! The session ends when the publisher's connection fails or closes, or on `DELETE`: the
//! broadcast is then ended for every viewer, as when `waterfall broadcast` stops.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::feed::{ChannelSource, Feed};
use super::{
    GatewayEvent, MAX_SESSIONS, Role, RoomReport, Session, Shared, created, sdp_body, session_id,
};
use crate::media::e2ee::is_keyframe;
use crate::media::peer::{PEER_EVENT_QUEUE, Peer, PeerEvent, SdpKind, SignalBlob};
use crate::media::relay::{FrameBuilder, Reorder, sdp_send_codecs};
use crate::media::{Codec, MediaKind, MediaSource, Sample};
use crate::node::{RoomConfig, RoomEvent};

/// How long the publisher has to connect and send its first track.
pub const FIRST_TRACK_WAIT: Duration = Duration::from_secs(15);
/// After the first track, how long the others may take.
const MORE_TRACKS_WAIT: Duration = Duration::from_secs(2);
/// Keyframe requests to the publisher at most this often.
pub const PLI_INTERVAL: Duration = Duration::from_millis(500);
/// Frames queued between a track's reader and the broadcaster.
const SOURCE_QUEUE: usize = 64;
/// Packets queued between a track and its reassembly.
const PACKET_QUEUE: usize = 512;

/// A running WHIP session.
pub(crate) struct Ingest {
    stop: Arc<Notify>,
    _task: AbortHandle,
}

impl Ingest {
    /// Ends the session gracefully: the broadcast is ended for its viewers.
    pub(crate) fn stop(&self) {
        self.stop.notify_one();
    }
}

/// `POST /whip/ROOM`.
pub(super) async fn post(
    State(s): State<Arc<Shared>>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let offer = match sdp_body(&headers, &body) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let sending = sdp_send_codecs(&offer);
    if sending.is_empty() {
        return super::bad_request("the offer sends no audio or video this node can relay");
    }
    if s.sessions().len() >= MAX_SESSIONS {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many sessions\n").into_response();
    }
    let password = s.password_for(&room, &headers);
    // Holds the room's place while the publisher connects.
    let report = match s
        .board
        .report_from(&room, Role::Broadcaster, password.clone(), "whip")
    {
        Ok(r) => r,
        Err(e) => return (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
    };
    let (ev_tx, ev_rx) = mpsc::channel(PEER_EVENT_QUEUE);
    let peer = match Peer::new(&s.node.inner.media, ev_tx).await {
        Ok(p) => Arc::new(p),
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot create the session: {e}\n"),
            )
                .into_response();
        }
    };
    let answer = match peer
        .accept_offer(&SignalBlob {
            kind: SdpKind::Offer,
            sdp: offer,
        })
        .await
    {
        Ok(a) => a,
        Err(e) => {
            peer.close().await;
            return super::bad_request(&format!("the offer cannot be answered: {e}"));
        }
    };
    let id = session_id();
    let stop = Arc::new(Notify::new());
    let task = tokio::spawn(ingest(Run {
        s: Arc::clone(&s),
        id: id.clone(),
        room: room.clone(),
        password,
        peer,
        events: ev_rx,
        expected: sending.len(),
        report,
        stop: Arc::clone(&stop),
    }));
    s.board.sessions_changed(1, 0);
    s.add_session(
        id.clone(),
        room.clone(),
        Session::Whip(Ingest {
            stop,
            _task: task.abort_handle(),
        }),
    );
    created(&s.config, "whip", &room, &id, answer.sdp)
}

struct Run {
    s: Arc<Shared>,
    id: String,
    room: String,
    password: Option<String>,
    peer: Arc<Peer>,
    events: mpsc::Receiver<PeerEvent>,
    expected: usize,
    report: RoomReport,
    stop: Arc<Notify>,
}

/// One publisher track.
struct Incoming {
    kind: MediaKind,
    codec: Codec,
    ssrc: u32,
    track: Arc<dyn TrackRemote>,
}

async fn ingest(mut r: Run) {
    let why = run(&mut r).await;
    tracing::info!(room = %r.room, "WHIP session ended: {why}");
    r.s.board.sessions_changed(-1, 0);
    r.s.sessions().remove(&r.id);
    let _ = r.s.events.send(GatewayEvent::PublishEnded {
        room: r.room.clone(),
        why,
    });
    r.peer.close().await;
}

/// The session from the first track to its end; returns why it ended.
async fn run(r: &mut Run) -> String {
    let mut tracks: Vec<Incoming> = Vec::new();
    let mut deadline = Instant::now() + FIRST_TRACK_WAIT;
    while tracks.len() < r.expected {
        tokio::select! {
            ev = r.events.recv() => match ev {
                Some(PeerEvent::Track(t)) => {
                    if let Some(i) = incoming(t).await
                        && !tracks.iter().any(|x| x.kind == i.kind)
                    {
                        tracks.push(i);
                        deadline = deadline.min(Instant::now() + MORE_TRACKS_WAIT);
                    }
                }
                Some(PeerEvent::State(RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed))
                | None => return "the publisher's connection closed before media".into(),
                Some(_) => {}
            },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = r.stop.notified() => return "deleted before media".into(),
        }
    }
    if tracks.is_empty() {
        return "no track from the publisher in time".into();
    }
    let (feed, mut feed_kf) = Feed::new(tracks.iter().map(|t| (t.kind, t.codec)).collect());
    r.report.feed(feed.clone());
    let (kf_tx, mut kf_rx) = mpsc::channel::<()>(4);
    let mut cfg = RoomConfig::new(r.room.clone()).data(false);
    if let Some(pw) = &r.password {
        cfg = cfg.password(pw.clone());
    }
    let mut readers = Readers(Vec::new());
    let mut video = None;
    for t in &tracks {
        let (tx, rx) = mpsc::channel(SOURCE_QUEUE);
        let src: Box<dyn MediaSource> = Box::new(ChannelSource {
            codec: t.codec,
            rx,
            keyframe: kf_tx.clone(),
        });
        cfg = cfg.source(src);
        if t.kind == MediaKind::Video {
            video = Some((Arc::clone(&t.track), t.ssrc));
        }
        readers.0.push(
            tokio::spawn(read_track(
                Arc::clone(&t.track),
                t.kind,
                t.codec,
                tx,
                feed.clone(),
                kf_tx.clone(),
            ))
            .abort_handle(),
        );
    }
    let (room, mut events) = match r.s.node.broadcast(cfg).await {
        Ok(b) => b,
        Err(e) => return format!("cannot broadcast: {e}"),
    };
    let _ = r.s.events.send(GatewayEvent::Publishing {
        room: r.room.clone(),
        ticket: room.ticket().clone(),
    });
    let mut last_pli: Option<Instant> = None;
    let mut pli_due: Option<Instant> = Some(Instant::now());
    let why = loop {
        let pli_timer = async {
            match pli_due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break "the room closed".to_owned() };
                r.report.event(&ev);
                if matches!(ev, RoomEvent::Media(crate::media::MediaEvent::Stats(_)))
                    && let Ok(st) = room.status().await
                {
                    r.report.status(&st);
                }
                if matches!(ev, RoomEvent::Ended) {
                    break "the room ended".to_owned();
                }
            }
            Some(()) = kf_rx.recv() => {
                pli_due.get_or_insert_with(|| next_pli(last_pli));
            }
            Some(()) = feed_kf.recv() => {
                pli_due.get_or_insert_with(|| next_pli(last_pli));
            }
            _ = pli_timer => {
                pli_due = None;
                last_pli = Some(Instant::now());
                if let Some((track, ssrc)) = &video {
                    let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: *ssrc };
                    let _ = track.write_rtcp(vec![Box::new(pli)]).await;
                }
            }
            ev = r.events.recv() => match ev {
                Some(PeerEvent::State(RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed))
                | None => break "the publisher's connection closed".to_owned(),
                Some(_) => {}
            },
            _ = r.stop.notified() => break "deleted".to_owned(),
        }
    };
    drop(readers);
    room.leave().await;
    why
}

/// When the next PLI may go.
fn next_pli(last: Option<Instant>) -> Instant {
    let now = Instant::now();
    last.map_or(now, |l| (l + PLI_INTERVAL).max(now))
}

/// Reader tasks, aborted together.
struct Readers(Vec<AbortHandle>);

impl Drop for Readers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A remote track's kind, codec and SSRC; `None` for a codec the tree cannot carry.
async fn incoming(track: Arc<dyn TrackRemote>) -> Option<Incoming> {
    let kind = match track.kind().await {
        RtpCodecKind::Audio => MediaKind::Audio,
        RtpCodecKind::Video => MediaKind::Video,
        _ => return None,
    };
    let ssrc = track.ssrcs().await.first().copied()?;
    let codec = track.codec(ssrc).await?;
    let codec = Codec::from_mime_type(&codec.mime_type).filter(|c| c.relayable())?;
    if codec.kind() != kind {
        return None;
    }
    Some(Incoming {
        kind,
        codec,
        ssrc,
        track,
    })
}

/// Reassembles a publisher track's frames and hands them to the broadcaster and the feed.
async fn read_track(
    track: Arc<dyn TrackRemote>,
    kind: MediaKind,
    codec: Codec,
    out: mpsc::Sender<Sample>,
    feed: Feed,
    keyframe: mpsc::Sender<()>,
) {
    let (tx, mut rx) = mpsc::channel::<rtp::Packet>(PACKET_QUEUE);
    // The track's events are read by a task of their own, so the reassembly's timer never
    // cancels a read in progress.
    let pump = tokio::spawn(async move {
        while let Some(ev) = track.poll().await {
            match ev {
                TrackRemoteEvent::OnRtpPacket(p) => {
                    // A full queue drops the packet (live media); a closed one ends the pump.
                    let closed =
                        matches!(tx.try_send(p), Err(mpsc::error::TrySendError::Closed(_)));
                    if closed {
                        return;
                    }
                }
                TrackRemoteEvent::OnEnded => return,
                _ => {}
            }
        }
    });
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _pump = AbortOnDrop(pump);
    let mut reorder = Reorder::new();
    let mut builder = FrameBuilder::new(codec);
    let mut first_ts: Option<u32> = None;
    let mut need_keyframe = kind == MediaKind::Video;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let ready = tokio::select! {
            p = rx.recv() => match p {
                Some(p) => reorder.push(p, Instant::now()),
                None => return,
            },
            _ = tick.tick() => reorder.drain(Instant::now()),
        };
        for (p, gap) in ready {
            let Some(frame) = builder.push(&p, gap) else {
                continue;
            };
            let key = kind == MediaKind::Audio || is_keyframe(codec, &frame.data);
            if kind == MediaKind::Video {
                if frame.after_gap {
                    need_keyframe = true;
                }
                if need_keyframe {
                    if !key {
                        let _ = keyframe.try_send(());
                        continue;
                    }
                    need_keyframe = false;
                }
            }
            let first = *first_ts.get_or_insert(frame.rtp_ts);
            let units = frame.rtp_ts.wrapping_sub(first) as u64;
            let sample = Sample {
                kind,
                codec,
                data: frame.data,
                pts: Duration::from_nanos(units * 1_000_000_000 / codec.clock_rate() as u64),
                duration: Duration::ZERO,
                keyframe: key,
            };
            feed.push(sample.clone());
            // Live media: a broadcaster that cannot keep up loses frames, never the publisher.
            let _ = out.try_send(sample);
        }
    }
}
