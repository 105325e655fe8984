//! WHEP: a player pulls a room through this node.
//!
//! The frames come from the room's [`Feed`]: the one its owner put on the board (the CLI's
//! `watch` or `broadcast`, a WHIP publisher), or else a membership the gateway makes for the
//! purpose ([`Membership`]: the node joins the room as a viewer whose decrypted frames go into a
//! feed). Every player of a room shares that one membership; the gateway leaves the room
//! [`MEMBERSHIP_IDLE`] after its last player went.
//!
//! Each player gets its own peer connection with one `TrackLocalStaticRTP` per kind, and the
//! frames are packetized for it here (the payloaders the broadcaster uses), with RTP
//! timestamps from the frames' presentation times. Video starts at a keyframe: a new player,
//! or one that fell behind the feed, drops frames until one comes and asks the feed's owner for
//! it. The player's own keyframe requests (PLI) are passed on the same way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp::packetizer::Payloader;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::{broadcast, mpsc};
use tokio::task::AbortHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::RTCPeerConnectionState;

use super::feed::Feed;
use super::{MAX_SESSIONS, Role, Session, Shared, created, sdp_body, session_id};
use crate::media::peer::{PEER_EVENT_QUEUE, Peer, PeerEvent, SdpKind, SignalBlob};
use crate::media::relay::{promote_payload_type, rtp_codec};
use crate::media::{Codec, MediaKind, Sample, Sinks};
use crate::node::{NodeError, RoomEvent, WatchConfig, WatchTarget};

/// How long a player waits for the room's first frames (a join, a parent's answer and the
/// broadcaster's start take a few seconds).
pub const FIRST_MEDIA_WAIT: Duration = Duration::from_secs(20);
/// How long the gateway stays in a room it joined for players after the last one left (a
/// page reload comes back within it).
pub const MEMBERSHIP_IDLE: Duration = Duration::from_secs(20);
/// RTP payload budget, as the broadcaster's.
const RTP_MTU: usize = 1200;

/// A room the gateway joined for its players.
pub(crate) struct Membership {
    feed: Feed,
    task: AbortHandle,
}

impl Membership {
    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One player.
pub(crate) struct Player {
    task: AbortHandle,
}

impl Player {
    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

/// `POST /whep/ROOM`.
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
    if s.sessions().len() >= MAX_SESSIONS {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many sessions\n").into_response();
    }
    let feed = match feed_for(&s, &room, &headers).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let tracks = feed.tracks_within(FIRST_MEDIA_WAIT).await;
    if tracks.is_empty() {
        return (
            StatusCode::GATEWAY_TIMEOUT,
            "the room sent no media in time\n",
        )
            .into_response();
    }
    let (ev_tx, ev_rx) = mpsc::channel(PEER_EVENT_QUEUE);
    let peer = match Peer::new(&s.node.inner.media, ev_tx).await {
        Ok(p) => Arc::new(p),
        Err(e) => return internal(e),
    };
    let mut locals = Vec::new();
    for (kind, codec) in &tracks {
        let ssrc: u32 = rand::random();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "waterfall".to_owned(),
            format!("{kind:?}-{ssrc}").to_lowercase(),
            format!("{kind:?}").to_lowercase(),
            match kind {
                MediaKind::Video => RtpCodecKind::Video,
                MediaKind::Audio => RtpCodecKind::Audio,
            },
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: rtp_codec(*codec),
                ..Default::default()
            }],
        )));
        match peer
            .pc
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await
        {
            Ok(sender) => locals.push((*kind, *codec, ssrc, track, sender)),
            Err(e) => return internal(e),
        }
    }
    let mut answer = match peer
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
    let mut outs = Vec::new();
    for (kind, codec, ssrc, track, sender) in locals {
        // The payload type the player gave this codec (write_rtp drops packets with another).
        let pt = sender.get_parameters().await.ok().and_then(|p| {
            let mime = |c: &&RTCRtpCodecParameters| {
                c.rtp_codec
                    .mime_type
                    .eq_ignore_ascii_case(codec.mime_type())
            };
            let want = rtp_codec(codec);
            let codecs = &p.rtp_parameters.codecs;
            codecs
                .iter()
                .filter(mime)
                .find(|c| c.rtp_codec.sdp_fmtp_line == want.sdp_fmtp_line)
                .or(codecs.iter().find(mime))
                .map(|c| c.payload_type)
        });
        let Some(pt) = pt else {
            // The player cannot decode the room's codec for this kind: it gets the others.
            tracing::debug!(%codec, "WHEP player did not accept the room's codec");
            continue;
        };
        answer.sdp = promote_payload_type(&answer.sdp, kind, pt);
        outs.push(Out::new(kind, codec, ssrc, pt, track));
    }
    if outs.is_empty() {
        peer.close().await;
        return super::bad_request("the offer accepts none of the room's codecs");
    }
    let id = session_id();
    let task = tokio::spawn(play(Arc::clone(&s), id.clone(), peer, feed, outs, ev_rx));
    s.board.sessions_changed(0, 1);
    s.add_session(
        id.clone(),
        room.clone(),
        Session::Whep(Player {
            task: task.abort_handle(),
        }),
    );
    created(&s.config, "whep", &room, &id, answer.sdp)
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot create the session: {e}\n"),
    )
        .into_response()
}

/// The room's feed: its owner's, or the gateway's own membership (joined now if need be).
async fn feed_for(s: &Arc<Shared>, room: &str, headers: &HeaderMap) -> Result<Feed, Response> {
    if let Some((feed, _)) = s.board.feed(room) {
        return Ok(feed);
    }
    let mut ms = s.memberships.lock().await;
    if let Some(m) = ms.get(room) {
        return Ok(m.feed.clone());
    }
    if s.board.has(room) {
        // In the room, but its owner shares no frames (a data-only room, an embedder).
        return Err((
            StatusCode::CONFLICT,
            "this node is in the room but does not share its frames\n",
        )
            .into_response());
    }
    let password = s.password_for(room, headers);
    let (feed, kf_rx) = Feed::new(Vec::new());
    let sinks = Sinks {
        video: Some(feed.sink_target()),
        audio: Some(feed.sink_target()),
        data: None,
    };
    let cfg = WatchConfig::new()
        .password_opt(password.clone())
        .sinks(sinks);
    let (watch, events) = match s.node.watch(WatchTarget::Name(room.to_owned()), cfg).await {
        Ok(w) => w,
        Err(e) => return Err(watch_error(room, e)),
    };
    let report = s
        .board
        .report_from(room, Role::Viewer, password, "whep")
        .map_err(|e| (StatusCode::CONFLICT, format!("{e}\n")).into_response())?;
    report.feed(feed.clone());
    let task = tokio::spawn(membership(
        Arc::clone(s),
        room.to_owned(),
        watch,
        events,
        report,
        feed.clone(),
        kf_rx,
    ));
    ms.insert(
        room.to_owned(),
        Arc::new(Membership {
            feed: feed.clone(),
            task: task.abort_handle(),
        }),
    );
    Ok(feed)
}

fn watch_error(room: &str, e: NodeError) -> Response {
    let code = match &e {
        NodeError::RoomNotFound { .. }
        | NodeError::WrongPassword { .. }
        | NodeError::RoomExpired { .. } => StatusCode::NOT_FOUND,
        NodeError::AlreadyJoined(_) => StatusCode::CONFLICT,
        NodeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    tracing::info!(room, "WHEP: cannot watch: {e}");
    (code, format!("{e}\n")).into_response()
}

/// Runs a membership: reports the room, passes keyframe requests to the parent, and leaves
/// once no player has been left for [`MEMBERSHIP_IDLE`] or the room ended.
async fn membership(
    s: Arc<Shared>,
    room: String,
    watch: crate::node::Watch,
    mut events: crate::node::RoomEvents,
    report: super::RoomReport,
    feed: Feed,
    mut kf_rx: mpsc::Receiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut idle_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                report.event(&ev);
                if matches!(ev, RoomEvent::Media(crate::media::MediaEvent::Stats(_)))
                    && let Ok(st) = watch.status().await
                {
                    report.status(&st);
                }
                if matches!(ev, RoomEvent::Ended) {
                    break;
                }
            }
            Some(()) = kf_rx.recv() => watch.request_keyframe(),
            // A room whose report went (the gateway is shutting down) is left.
            _ = feed.ended() => break,
            _ = tick.tick() => {
                if feed.players() > 0 {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(tokio::time::Instant::now).elapsed()
                    >= MEMBERSHIP_IDLE
                {
                    break;
                }
            }
        }
    }
    s.memberships.lock().await.remove(&room);
    drop(report);
    watch.leave().await;
}

/// One outbound track of a player: packetizes frames into its RTP stream.
struct Out {
    kind: MediaKind,
    ssrc: u32,
    pt: u8,
    clock: u64,
    track: Arc<TrackLocalStaticRTP>,
    payloader: Box<dyn Payloader + Send>,
    seq: u16,
    ts_base: u32,
}

impl Out {
    fn new(
        kind: MediaKind,
        codec: Codec,
        ssrc: u32,
        pt: u8,
        track: Arc<TrackLocalStaticRTP>,
    ) -> Out {
        let payloader: Box<dyn Payloader + Send> = match codec {
            Codec::Vp8 => {
                let mut p = rtp::codec::vp8::Vp8Payloader::default();
                p.enable_picture_id = true;
                Box::new(p)
            }
            Codec::Vp9 => Box::new(rtp::codec::vp9::Vp9Payloader::default()),
            Codec::H264 => Box::new(rtp::codec::h264::H264Payloader::default()),
            Codec::Av1 => Box::new(rtp::codec::av1::Av1Payloader::default()),
            _ => Box::new(rtp::codec::opus::OpusPayloader),
        };
        Out {
            kind,
            ssrc,
            pt,
            clock: codec.clock_rate() as u64,
            track,
            payloader,
            seq: rand::random(),
            ts_base: rand::random(),
        }
    }

    async fn write(&mut self, s: &Sample) {
        let Ok(payloads) = self.payloader.payload(RTP_MTU, &s.data) else {
            return;
        };
        let ts = self
            .ts_base
            .wrapping_add((s.pts.as_nanos() as u64 * self.clock / 1_000_000_000) as u32);
        let n = payloads.len();
        for (i, payload) in payloads.into_iter().enumerate() {
            let pkt = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    marker: self.kind == MediaKind::Video && i + 1 == n,
                    sequence_number: self.seq,
                    timestamp: ts,
                    ssrc: self.ssrc,
                    payload_type: self.pt,
                    ..Default::default()
                },
                payload,
            };
            self.seq = self.seq.wrapping_add(1);
            if let Err(e) = self.track.write_rtp(pkt).await {
                tracing::trace!("WHEP write_rtp: {e}");
            }
        }
    }
}

/// Plays the feed to one player until its connection ends or the session is deleted.
async fn play(
    s: Arc<Shared>,
    id: String,
    peer: Arc<Peer>,
    feed: Feed,
    mut outs: Vec<Out>,
    mut events: mpsc::Receiver<PeerEvent>,
) {
    struct Ended(Arc<Shared>, String, Arc<Peer>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.board.sessions_changed(0, -1);
            self.0.sessions().remove(&self.1);
            let peer = Arc::clone(&self.2);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move { peer.close().await });
            }
        }
    }
    let _ended = Ended(Arc::clone(&s), id, Arc::clone(&peer));
    let mut frames = feed.subscribe();
    // The player's keyframe requests (PLI, FIR) go to the feed's owner.
    let mut pli_tasks: HashMap<u32, AbortHandle> = HashMap::new();
    for o in outs.iter().filter(|o| o.kind == MediaKind::Video) {
        let track = Arc::clone(&o.track);
        let feed = feed.clone();
        let t = tokio::spawn(async move {
            // poll() returns None until the track is bound; bounded retries.
            for _ in 0..600 {
                while let Some(ev) = track.poll().await {
                    if let TrackLocalEvent::OnRtcpPacket(_) = ev {
                        feed.request_keyframe();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        pli_tasks.insert(o.ssrc, t.abort_handle());
    }
    struct Abort(HashMap<u32, AbortHandle>);
    impl Drop for Abort {
        fn drop(&mut self) {
            for t in self.0.values() {
                t.abort();
            }
        }
    }
    let _pli = Abort(pli_tasks);
    let mut need_keyframe = true;
    feed.request_keyframe();
    loop {
        tokio::select! {
            f = frames.recv() => match f {
                Ok(sample) => {
                    if sample.kind == MediaKind::Video && need_keyframe {
                        if !sample.keyframe {
                            continue;
                        }
                        need_keyframe = false;
                    }
                    if let Some(o) = outs.iter_mut().find(|o| o.kind == sample.kind) {
                        o.write(&sample).await;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    need_keyframe = true;
                    feed.request_keyframe();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = feed.ended() => return,
            ev = events.recv() => match ev {
                None => return,
                Some(PeerEvent::State(RTCPeerConnectionState::Connected)) => {
                    feed.request_keyframe();
                }
                Some(PeerEvent::State(
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed,
                )) => return,
                Some(_) => {}
            },
        }
    }
}
