//! Clients of the node's HTTP door for the tests: a minimal HTTP/1.1 client (one request per
//! connection, `Connection: close`, so the answer is what comes before the close), and WHIP and
//! WHEP clients built on webrtc-rs (the same stack OBS's peers and players interoperate with):
//! the publisher plays the fixture clip, the player writes what it receives to IVF and Ogg.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rtc::media::io::Writer;
use rtc::media::io::ivf_writer::IVFWriter;
use rtc::media::io::ogg_writer::OggWriter;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use waterfall::media::peer::{Peer, PeerEvent, SdpKind, SignalBlob};
use waterfall::media::{Codec, MediaConfig, MediaSource};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::TrackRemoteEvent;
use webrtc::peer_connection::RTCPeerConnectionState;

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header of that name.
    pub fn headers(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request to `addr` (loopback), its answer within 60 s.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        s.write_all(body).await.expect("write body");
        // Until the close, or the end the headers announce (some servers, Chromium's DevTools
        // among them, keep the connection open).
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if complete(&raw) {
                break;
            }
        }
        parse(&raw)
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {path}: no answer within 60 s"))
}

/// Whether `raw` holds a whole answer by its `Content-Length` or its last chunk.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

fn parse(raw: &[u8]) -> Answer {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..nl])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = nl + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// `POST` of an SDP offer.
pub async fn post_sdp(addr: SocketAddr, path: &str, extra: &[(&str, &str)], sdp: &str) -> Answer {
    let mut h = vec![("Content-Type", "application/sdp")];
    h.extend_from_slice(extra);
    request(addr, "POST", path, &h, sdp.as_bytes()).await
}

/// A webrtc-rs peer for a client: loopback, no ICE servers.
async fn client_peer() -> (Peer, mpsc::Receiver<PeerEvent>) {
    let (tx, rx) = mpsc::channel(64);
    let p = Peer::new(&MediaConfig::default(), tx)
        .await
        .expect("client peer");
    (p, rx)
}

/// A complete offer that only receives audio and video (a WHEP player's), and its peer.
pub async fn player_offer() -> (Peer, mpsc::Receiver<PeerEvent>, String) {
    let (p, rx) = client_peer().await;
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        p.pc.add_transceiver_from_kind(
            kind,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            }),
        )
        .await
        .expect("transceiver");
    }
    let offer = p.create_offer().await.expect("offer");
    (p, rx, offer.sdp)
}

/// What a WHEP player got.
#[derive(Debug, Default, Clone, Copy)]
pub struct Received {
    pub video_packets: u64,
    pub audio_packets: u64,
}

/// Plays a WHEP session: applies `answer`, writes the video to `video` (IVF) and the audio to
/// `audio` (Ogg Opus) for `secs` seconds, and counts what came.
pub async fn play(
    peer: Peer,
    mut events: mpsc::Receiver<PeerEvent>,
    answer: &str,
    video: &Path,
    audio: &Path,
    secs: u64,
) -> Received {
    peer.apply_answer(&SignalBlob {
        kind: SdpKind::Answer,
        sdp: answer.to_owned(),
    })
    .await
    .expect("answer applies");
    let (count_tx, mut count_rx) = mpsc::channel::<RtpCodecKind>(4096);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut got = Received::default();
    let mut readers = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            Some(k) = count_rx.recv() => match k {
                RtpCodecKind::Video => got.video_packets += 1,
                _ => got.audio_packets += 1,
            },
            ev = events.recv() => match ev {
                Some(PeerEvent::Track(t)) => {
                    let kind = t.kind().await;
                    let path = if kind == RtpCodecKind::Video { video } else { audio }.to_owned();
                    let count = count_tx.clone();
                    readers.push(tokio::spawn(async move {
                        let f = std::fs::File::create(&path).expect("create output");
                        let mut w: Box<dyn Writer + Send> = if kind == RtpCodecKind::Video {
                            Box::new(IVFWriter::new(f, &rtc::media::io::ivf_reader::IVFFileHeader {
                                signature: *b"DKIF",
                                version: 0,
                                header_size: 32,
                                four_cc: *b"VP80",
                                width: 320,
                                height: 240,
                                timebase_denominator: 90_000,
                                timebase_numerator: 1,
                                num_frames: 0,
                                unused: 0,
                            }).expect("ivf writer"))
                        } else {
                            Box::new(OggWriter::new(f, 48_000, 2).expect("ogg writer"))
                        };
                        while let Some(ev) = t.poll().await {
                            if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                                let _ = w.write_rtp(&p);
                                let _ = count.try_send(kind);
                            }
                        }
                    }));
                }
                Some(PeerEvent::State(RTCPeerConnectionState::Failed)) => panic!("WHEP connection failed"),
                Some(_) => {}
                None => break,
            },
        }
    }
    peer.close().await;
    for r in readers {
        r.abort();
        let _ = r.await;
    }
    got
}

/// A publisher's track: its local track, its sender (for the negotiated payload type) and the
/// clip it plays.
type OutTrack = (
    Arc<TrackLocalStaticSample>,
    Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    Box<dyn MediaSource>,
);

/// A WHIP publisher of the fixture clip (VP8 + Opus) over webrtc-rs.
pub struct Publisher {
    pub peer: Arc<Peer>,
    events: mpsc::Receiver<PeerEvent>,
    tracks: Vec<OutTrack>,
    pub offer: String,
}

impl Publisher {
    /// Tracks for `video` (IVF) and `audio` (Ogg), played `loops` times more, and the offer.
    pub async fn new(video: &Path, audio: &Path, loops: u32) -> Publisher {
        let (p, events) = client_peer().await;
        let mut tracks = Vec::new();
        for (path, kind, codec) in [
            (video, RtpCodecKind::Video, Codec::Vp8),
            (audio, RtpCodecKind::Audio, Codec::Opus),
        ] {
            let src = waterfall::FileSource::open(
                path,
                waterfall::SourceOptions {
                    loops: Some(loops),
                    ..Default::default()
                },
            )
            .await
            .expect("clip opens");
            let ssrc: u32 = rand::random();
            let track = Arc::new(
                TrackLocalStaticSample::new(
                    std::time::Instant::now(),
                    MediaStreamTrack::new(
                        "publisher".into(),
                        format!("{kind}"),
                        format!("{kind}"),
                        kind,
                        vec![RTCRtpEncodingParameters {
                            rtp_coding_parameters: RTCRtpCodingParameters {
                                ssrc: Some(ssrc),
                                ..Default::default()
                            },
                            codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
                                mime_type: codec.mime_type().into(),
                                clock_rate: codec.clock_rate(),
                                channels: if codec == Codec::Opus { 2 } else { 0 },
                                sdp_fmtp_line: if codec == Codec::Opus {
                                    "minptime=10;useinbandfec=1".into()
                                } else {
                                    String::new()
                                },
                                rtcp_feedback: vec![],
                            },
                            ..Default::default()
                        }],
                    ),
                )
                .expect("sample track"),
            );
            let sender =
                p.pc.add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
                    .await
                    .expect("add track");
            tracks.push((track, sender, Box::new(src) as Box<dyn MediaSource>));
        }
        let offer = p.create_offer().await.expect("offer").sdp;
        Publisher {
            peer: Arc::new(p),
            events,
            tracks,
            offer,
        }
    }

    /// Applies the answer and plays the clip in real time until it ends (or `limit`).
    pub async fn play(self, answer: &str, limit: Duration) -> Arc<Peer> {
        self.play_with(answer, limit, |_, _| {}).await
    }

    /// [`Publisher::play`], telling `on_frame` each frame just before it is sent.
    pub async fn play_with(
        mut self,
        answer: &str,
        limit: Duration,
        on_frame: impl Fn(waterfall::media::MediaKind, &bytes::Bytes) + Send + Sync + 'static,
    ) -> Arc<Peer> {
        let on_frame = Arc::new(on_frame);
        self.peer
            .apply_answer(&SignalBlob {
                kind: SdpKind::Answer,
                sdp: answer.to_owned(),
            })
            .await
            .expect("answer applies");
        // Media once connected.
        let connected = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(ev) = self.events.recv().await {
                if let PeerEvent::State(RTCPeerConnectionState::Connected) = ev {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(matches!(connected, Ok(true)), "WHIP publisher connects");
        let mut tasks = Vec::new();
        for (track, sender, mut src) in self.tracks {
            let params = sender.get_parameters().await.expect("sender parameters");
            let mime = src.codec().mime_type();
            let pt = params
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
                .expect("the clip's codec was negotiated")
                .payload_type;
            let ssrc = params
                .encodings
                .first()
                .and_then(|e| e.rtp_coding_parameters.ssrc)
                .expect("an ssrc");
            let on_frame = Arc::clone(&on_frame);
            tasks.push(tokio::spawn(async move {
                let mut last = Duration::ZERO;
                while let Ok(Some(s)) = src.next_sample().await {
                    on_frame(s.kind, &s.data);
                    let duration = if s.duration > Duration::ZERO {
                        s.duration
                    } else {
                        s.pts.saturating_sub(last)
                    };
                    last = s.pts;
                    let sample = rtc::media::Sample {
                        data: s.data.clone(),
                        timestamp: std::time::Instant::now(),
                        duration,
                        packet_timestamp: 0,
                        prev_dropped_packets: 0,
                        prev_padding_packets: 0,
                    };
                    let _ = track.write_sample(ssrc, pt, &sample, &[]).await;
                }
            }));
        }
        let _ = tokio::time::timeout(limit, futures::future::join_all(tasks)).await;
        self.peer
    }
}
