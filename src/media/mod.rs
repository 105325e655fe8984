//! WebRTC media shell: sources, sinks, peer connections, the RTP relay and end-to-end encryption.
//!
//! The shell never sees libp2p: signalling reaches it as plain [`SignalBlob`] values (an SDP and
//! its type) and everything it has to say comes out of a bounded [`MediaEvent`] stream.
//!
//! Data path (one node):
//!
//! ```text
//!  MediaSource ──encrypt──packetize──┐                       ┌─► child 1 (own track, SSRC/PT rewritten)
//!                                    ├─► Hub (fan-out) ──────┼─► child 2
//!  parent PeerConnection ─RTP────────┘        │              └─► child N   (bounded queue each; full => cut)
//!                                             └─► local playback: reorder, depacketize, decrypt, sink
//! ```
//!
//! * [`source`]: IVF (VP8/VP9/AV1), H.264 Annex-B and Ogg Opus readers, paced in real time.
//! * [`sink`]: IVF, H.264 Annex-B and Ogg Opus writers that stay valid when stopped abruptly,
//!   and a line sink.
//! * [`e2ee`]: per-frame XChaCha20-Poly1305 with what the RTP payloaders parse left in clear (a
//!   prefix for VP8/VP9/Opus, NAL and OBU headers for H.264/AV1, as in WebRTC insertable-streams
//!   E2EE and SFrame), so relays forward ciphertext they cannot read.
//! * [`peer`]: building a `webrtc` 0.21 peer connection and non-trickle offer/answer.
//! * [`relay`]: the fan-out hub, per-child writers and the viewer's playback pipeline.
//! * [`session`]: the API for the node: [`Broadcaster`] and [`Viewer`].

pub mod e2ee;
pub mod peer;
pub mod relay;
pub mod session;
pub mod sink;
pub mod source;

pub use e2ee::{E2eeError, MediaKey};
pub use peer::{MediaConfig, PeerError, SdpKind, SignalBlob};
pub use session::{Broadcaster, ChildId, MediaEvent, MediaStats, SessionError, Sinks, Viewer};
pub use sink::{AnnexBSink, DataSink, FrameSink, IvfSink, OggOpusSink, SinkError, SinkTarget};
pub use source::{FileSource, MediaSource, Sample, SourceError, SourceOptions};

use std::fmt;

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MediaKind {
    /// A video track.
    Video,
    /// An audio track.
    Audio,
}

/// The codecs the shell can read, carry and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// VP8 (IVF `VP80`).
    Vp8,
    /// VP9 (IVF `VP90`).
    Vp9,
    /// AV1 (IVF `AV01`).
    Av1,
    /// H.264 Annex-B.
    H264,
    /// Opus (Ogg).
    Opus,
}

impl Codec {
    /// Audio or video.
    pub fn kind(self) -> MediaKind {
        match self {
            Codec::Opus => MediaKind::Audio,
            _ => MediaKind::Video,
        }
    }

    /// RTP clock rate.
    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            _ => 90_000,
        }
    }

    /// The MIME type webrtc-rs uses for this codec.
    pub fn mime_type(self) -> &'static str {
        match self {
            Codec::Vp8 => "video/VP8",
            Codec::Vp9 => "video/VP9",
            Codec::Av1 => "video/AV1",
            Codec::H264 => "video/H264",
            Codec::Opus => "audio/opus",
        }
    }

    /// Inverse of [`Codec::mime_type`], case-insensitive.
    pub fn from_mime_type(mime: &str) -> Option<Codec> {
        [Codec::Vp8, Codec::Vp9, Codec::Av1, Codec::H264, Codec::Opus]
            .into_iter()
            .find(|c| c.mime_type().eq_ignore_ascii_case(mime))
    }

    /// Whether the relay tree can carry this codec end-to-end encrypted. Every codec can now:
    /// VP8, VP9 and Opus keep a short clear prefix, H.264 and AV1 are encrypted per NAL unit
    /// and per OBU with their headers in clear, so the payloaders still parse them (see
    /// [`e2ee`]).
    pub fn relayable(self) -> bool {
        matches!(
            self,
            Codec::Vp8 | Codec::Vp9 | Codec::Av1 | Codec::H264 | Codec::Opus
        )
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mime_type())
    }
}
