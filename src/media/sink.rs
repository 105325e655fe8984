//! Sinks: IVF, H.264 Annex-B and Ogg Opus writers (file or stdout) and a line sink for data-channel messages.
//!
//! Every writer is valid and complete up to the last frame it was given, even when the process
//! stops abruptly: each frame is written whole and flushed before the call returns, and the
//! metadata a player needs is either written before the first frame (IVF header, Opus
//! headers) or not required (IVF frame count 0 means "unknown" to every demuxer we know; an Ogg
//! stream without an end-of-stream page decodes to its last page). For files the IVF frame
//! count is still patched in place after every frame (a positional write, no seek) and on
//! close, so tools that trust the header see the right number.
//!
//! The IVF header needs the frame size, which a relay-tree viewer only learns from the
//! bitstream: for VP8 (RFC 6386 §9.1) and VP9 (the uncompressed header, §6.2) it is read from
//! the first keyframe, so the header is written lazily with the first frame. AV1 keeps its
//! size in the sequence header behind variable-length fields; its IVF header says 0x0, which
//! demuxers ignore (the decoder reads the sequence header). H.264 is written as an Annex-B
//! byte stream.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use super::Codec;
use super::source::{Sample, opus_packet_samples};

/// Errors writing a sink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// I/O error.
    #[error("sink I/O: {0}")]
    Io(#[from] io::Error),
    /// The codec cannot be written to this container.
    #[error("codec {0} cannot be written to {1}")]
    Codec(Codec, &'static str),
}

/// Where a sink writes.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// A file, created or truncated.
    File(PathBuf),
    /// The process's standard output.
    Stdout,
    /// Both (e.g. play to stdout and keep a recording): frames go to each.
    Tee(Box<SinkTarget>, Box<SinkTarget>),
    /// Data-channel messages into the embedding program, in order and exactly as sent
    /// (binary-safe). Bounded: a program that stops reading holds up its own playback, and
    /// nothing is dropped. For data only.
    Channel(tokio::sync::mpsc::Sender<bytes::Bytes>),
    /// Decrypted audio or video frames into the embedding program (the HTTP gateway's WHEP
    /// players, see `crate::http`), as [`Sample`]s. Live media: when the receiver is full the
    /// frame is dropped (never playback stalled), and [`Sample::duration`] is zero (a viewer
    /// learns a frame's length only from the next one). For audio and video only.
    Frames(tokio::sync::mpsc::Sender<Sample>),
}

enum Out {
    File(File),
    Stdout(io::Stdout),
}

impl Out {
    fn open(t: &SinkTarget) -> io::Result<Out> {
        Ok(match t {
            SinkTarget::File(p) => Out::File(File::create(p)?),
            SinkTarget::Stdout => Out::Stdout(io::stdout()),
            SinkTarget::Tee(..) => {
                return Err(io::Error::other("a tee is two outputs: use TeeSink"));
            }
            SinkTarget::Channel(_) => {
                return Err(io::Error::other(
                    "a channel target takes data messages only",
                ));
            }
            SinkTarget::Frames(_) => {
                return Err(io::Error::other(
                    "a frame channel takes audio and video only",
                ));
            }
        })
    }

    fn write_all_flush(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Out::File(f) => f.write_all(b),
            Out::Stdout(s) => {
                let mut l = s.lock();
                l.write_all(b)?;
                l.flush()
            }
        }
    }

    /// Positional write for header fix-ups (files only; a pipe keeps its header as written).
    fn patch(&mut self, at: u64, b: &[u8]) -> io::Result<()> {
        if let Out::File(f) = self {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b, at)?;
        }
        Ok(())
    }
}

/// A writer of encoded frames.
pub trait FrameSink: Send {
    /// The codec this sink accepts.
    fn codec(&self) -> Codec;
    /// Writes one complete frame (`pts` from the start of the stream).
    fn write_frame(&mut self, frame: &[u8], pts: Duration) -> Result<(), SinkError>;
    /// Finalizes headers. Idempotent; the file is valid without it.
    fn close(&mut self) -> Result<(), SinkError>;
}

/// Writes every frame to two sinks; a failure of either is reported.
pub struct TeeSink(pub Box<dyn FrameSink>, pub Box<dyn FrameSink>);

impl FrameSink for TeeSink {
    fn codec(&self) -> Codec {
        self.0.codec()
    }
    fn write_frame(&mut self, frame: &[u8], pts: Duration) -> Result<(), SinkError> {
        let a = self.0.write_frame(frame, pts);
        let b = self.1.write_frame(frame, pts);
        a.and(b)
    }
    fn close(&mut self) -> Result<(), SinkError> {
        let a = self.0.close();
        let b = self.1.close();
        a.and(b)
    }
}

/// A video or audio sink for `target`: an H.264 Annex-B byte stream for H.264, IVF for other
/// video, Ogg Opus for audio, both for a tee.
pub fn create_frame_sink(
    kind: super::MediaKind,
    target: &SinkTarget,
    codec: Codec,
) -> Result<Box<dyn FrameSink>, SinkError> {
    Ok(match (kind, target) {
        (_, SinkTarget::Tee(a, b)) => Box::new(TeeSink(
            create_frame_sink(kind, a, codec)?,
            create_frame_sink(kind, b, codec)?,
        )),
        (kind, SinkTarget::Frames(tx)) => Box::new(FrameChannelSink {
            tx: tx.clone(),
            kind,
            codec,
        }),
        (super::MediaKind::Video, t) if codec == Codec::H264 => Box::new(AnnexBSink::create(t)?),
        (super::MediaKind::Video, t) => Box::new(IvfSink::create(t, codec)?),
        (super::MediaKind::Audio, t) => Box::new(OggOpusSink::create(t, 2)?),
    })
}

/// Hands decrypted frames to a channel ([`SinkTarget::Frames`]); a full channel drops the frame.
struct FrameChannelSink {
    tx: tokio::sync::mpsc::Sender<Sample>,
    kind: super::MediaKind,
    codec: Codec,
}

impl FrameSink for FrameChannelSink {
    fn codec(&self) -> Codec {
        self.codec
    }
    fn write_frame(&mut self, frame: &[u8], pts: Duration) -> Result<(), SinkError> {
        let sample = Sample {
            kind: self.kind,
            codec: self.codec,
            data: bytes::Bytes::copy_from_slice(frame),
            pts,
            duration: Duration::ZERO,
            keyframe: self.kind == super::MediaKind::Audio
                || super::e2ee::is_keyframe(self.codec, frame),
        };
        // A closed receiver is not an error of the viewer: the program stopped listening.
        let _ = self.tx.try_send(sample);
        Ok(())
    }
    fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// IVF writer (VP8, VP9, AV1). Timebase 1/90000 (the RTP video clock).
pub struct IvfSink {
    out: Out,
    codec: Codec,
    frames: u32,
    header_written: bool,
    size: (u16, u16),
}

impl IvfSink {
    /// Creates the target; nothing is written before the first frame.
    pub fn create(target: &SinkTarget, codec: Codec) -> Result<Self, SinkError> {
        if !matches!(codec, Codec::Vp8 | Codec::Vp9 | Codec::Av1) {
            return Err(SinkError::Codec(codec, "IVF"));
        }
        Ok(IvfSink {
            out: Out::open(target)?,
            codec,
            frames: 0,
            header_written: false,
            size: (0, 0),
        })
    }

    /// Sets the frame size written into the header (used when it cannot be parsed).
    pub fn with_size(mut self, width: u16, height: u16) -> Self {
        self.size = (width, height);
        self
    }

    fn header(&self) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(b"DKIF");
        h[6..8].copy_from_slice(&32u16.to_le_bytes());
        h[8..12].copy_from_slice(match self.codec {
            Codec::Vp9 => b"VP90",
            Codec::Av1 => b"AV01",
            _ => b"VP80",
        });
        h[12..14].copy_from_slice(&self.size.0.to_le_bytes());
        h[14..16].copy_from_slice(&self.size.1.to_le_bytes());
        h[16..20].copy_from_slice(&90_000u32.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        h[24..28].copy_from_slice(&self.frames.to_le_bytes());
        h
    }
}

/// Width and height from a VP8 keyframe header (RFC 6386 §9.1).
pub fn vp8_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 10 || frame[0] & 1 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((w, h))
}

/// Width and height from a VP9 keyframe's uncompressed header (VP9 bitstream spec §6.2:
/// frame marker, profile, show_existing_frame, frame_type, show_frame, error_resilient_mode,
/// sync code, color_config, then frame_width_minus_1 and frame_height_minus_1, 16 bits each).
pub fn vp9_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    let mut r = BitReader { b: frame, pos: 0 };
    if r.bits(2)? != 0b10 {
        return None;
    }
    let profile = r.bits(1)? | r.bits(1)? << 1;
    if profile == 3 {
        r.bits(1)?;
    }
    if r.bits(1)? != 0 || r.bits(1)? != 0 {
        return None; // show_existing_frame, or not a keyframe
    }
    r.bits(2)?; // show_frame, error_resilient_mode
    if r.bits(24)? != 0x49_83_42 {
        return None;
    }
    if profile >= 2 {
        r.bits(1)?; // ten_or_twelve_bit
    }
    let color_space = r.bits(3)?;
    if color_space != 7 {
        r.bits(1)?; // color_range
        if profile == 1 || profile == 3 {
            r.bits(3)?; // subsampling_x, subsampling_y, reserved_zero
        }
    } else if profile == 1 || profile == 3 {
        r.bits(1)?; // reserved_zero
    }
    let w = r.bits(16)? + 1;
    let h = r.bits(16)? + 1;
    Some((u16::try_from(w).ok()?, u16::try_from(h).ok()?))
}

/// MSB-first bit reader over a byte slice.
struct BitReader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn bits(&mut self, n: usize) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.b.get(self.pos / 8)?;
            v = v << 1 | u32::from(byte >> (7 - self.pos % 8) & 1);
            self.pos += 1;
        }
        Some(v)
    }
}

impl FrameSink for IvfSink {
    fn codec(&self) -> Codec {
        self.codec
    }

    fn write_frame(&mut self, frame: &[u8], pts: Duration) -> Result<(), SinkError> {
        let mut buf = Vec::with_capacity(44 + frame.len());
        if !self.header_written {
            let size = match self.codec {
                Codec::Vp8 => vp8_keyframe_size(frame),
                Codec::Vp9 => vp9_keyframe_size(frame),
                _ => None,
            };
            if let Some(s) = size {
                self.size = s;
            }
            buf.extend_from_slice(&self.header());
            self.header_written = true;
        }
        let ts = (pts.as_nanos() * 90_000 / 1_000_000_000) as u64;
        buf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        buf.extend_from_slice(&ts.to_le_bytes());
        buf.extend_from_slice(frame);
        // One write per frame: a crash leaves whole frames only (or a torn last frame, which
        // demuxers drop as a truncated packet).
        self.out.write_all_flush(&buf)?;
        self.frames += 1;
        self.out.patch(24, &self.frames.to_le_bytes())?;
        Ok(())
    }

    fn close(&mut self) -> Result<(), SinkError> {
        if self.header_written {
            self.out.patch(24, &self.frames.to_le_bytes())?;
            if let Out::File(f) = &mut self.out {
                f.sync_data()?;
            }
        }
        Ok(())
    }
}

/// H.264 Annex-B byte stream writer: each access unit as it arrives (NAL units behind 4-byte
/// start codes), written whole and flushed. The format has no header and no index, so a file
/// cut anywhere after a frame is complete; a player needs the stream to begin at an IDR access
/// unit with SPS and PPS, which playback guarantees by waiting for a keyframe.
pub struct AnnexBSink {
    out: Out,
}

impl AnnexBSink {
    /// Creates the target; nothing is written before the first frame.
    pub fn create(target: &SinkTarget) -> Result<Self, SinkError> {
        Ok(AnnexBSink {
            out: Out::open(target)?,
        })
    }
}

impl FrameSink for AnnexBSink {
    fn codec(&self) -> Codec {
        Codec::H264
    }

    fn write_frame(&mut self, frame: &[u8], _pts: Duration) -> Result<(), SinkError> {
        // Annex-B carries no timestamps: players assume a frame rate (`-r` in ffmpeg).
        self.out.write_all_flush(frame)?;
        Ok(())
    }

    fn close(&mut self) -> Result<(), SinkError> {
        if let Out::File(f) = &mut self.out {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// Ogg Opus writer (RFC 7845): one page per Opus packet, granule position in 48 kHz samples.
pub struct OggOpusSink {
    out: Out,
    serial: u32,
    seq: u32,
    granule: u64,
    closed: bool,
}

/// Pre-skip written into OpusHead (libopus' usual encoder delay).
const PRE_SKIP: u16 = 312;

impl OggOpusSink {
    /// Creates the target and writes the OpusHead and OpusTags pages.
    pub fn create(target: &SinkTarget, channels: u8) -> Result<Self, SinkError> {
        let mut s = OggOpusSink {
            out: Out::open(target)?,
            serial: rand::random(),
            seq: 0,
            granule: 0,
            closed: false,
        };
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1);
        head.push(channels.max(1));
        head.extend_from_slice(&PRE_SKIP.to_le_bytes());
        head.extend_from_slice(&48_000u32.to_le_bytes());
        head.extend_from_slice(&0u16.to_le_bytes());
        head.push(0);
        s.page(&head, 0x02, 0)?;
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        let vendor = b"waterfall";
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes());
        s.page(&tags, 0x00, 0)?;
        Ok(s)
    }

    fn page(&mut self, packet: &[u8], flags: u8, granule: u64) -> Result<(), SinkError> {
        // Lacing: 255-byte segments then the remainder (0 if the packet is a multiple of 255).
        let nseg = packet.len() / 255 + 1;
        if nseg > 255 {
            return Err(SinkError::Io(io::Error::other("Opus packet too large")));
        }
        let mut p = Vec::with_capacity(27 + nseg + packet.len());
        p.extend_from_slice(b"OggS");
        p.push(0);
        p.push(flags);
        p.extend_from_slice(&granule.to_le_bytes());
        p.extend_from_slice(&self.serial.to_le_bytes());
        p.extend_from_slice(&self.seq.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.push(nseg as u8);
        p.extend(std::iter::repeat_n(255u8, nseg - 1));
        p.push((packet.len() % 255) as u8);
        p.extend_from_slice(packet);
        let crc = ogg_crc(&p);
        p[22..26].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all_flush(&p)?;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }
}

impl FrameSink for OggOpusSink {
    fn codec(&self) -> Codec {
        Codec::Opus
    }

    fn write_frame(&mut self, frame: &[u8], _pts: Duration) -> Result<(), SinkError> {
        self.granule += opus_packet_samples(frame).unwrap_or(960) as u64;
        self.page(frame, 0x00, self.granule)
    }

    fn close(&mut self) -> Result<(), SinkError> {
        // No end-of-stream page: it would have to be the last data page rewritten (an empty
        // one trips decoders), and every page is already complete and checksummed, which is
        // what players need. Nothing is buffered, so there is nothing to flush either.
        self.closed = true;
        Ok(())
    }
}

fn ogg_crc(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut r = (i as u32) << 24;
            for _ in 0..8 {
                r = if r & 0x8000_0000 != 0 {
                    (r << 1) ^ 0x04c1_1db7
                } else {
                    r << 1
                };
            }
            *e = r;
        }
        t
    });
    data.iter().fold(0u32, |crc, &b| {
        (crc << 8) ^ t[(((crc >> 24) as u8) ^ b) as usize]
    })
}

/// Writes data-channel messages as lines (UTF-8 lossy; embedded newlines are escaped as `\n`
/// so one message is always one line).
pub struct DataSink {
    out: Out,
}

impl DataSink {
    /// Creates the target.
    pub fn create(target: &SinkTarget) -> Result<Self, SinkError> {
        Ok(DataSink {
            out: Out::open(target)?,
        })
    }

    /// Writes one message as one line and flushes.
    pub fn write_message(&mut self, msg: &[u8]) -> Result<(), SinkError> {
        let text = String::from_utf8_lossy(msg).replace('\n', "\\n");
        let mut line = text.into_bytes();
        line.push(b'\n');
        self.out.write_all_flush(&line)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ogg_crc_known_value() {
        // CRC of the ASCII "OggS" page prefix alone, computed with the reference algorithm.
        assert_eq!(ogg_crc(b""), 0);
        assert_ne!(ogg_crc(b"OggS"), 0);
    }

    #[test]
    fn vp8_size_parse() {
        let kf = [0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00];
        assert_eq!(vp8_keyframe_size(&kf), Some((320, 240)));
        assert_eq!(vp8_keyframe_size(&kf[..5]), None);
    }
}
