//! Media sources: encoded frames from IVF (VP8/VP9/AV1), H.264 Annex-B or Ogg Opus, from a
//! file or any byte stream (stdin), paced in real time by their timestamps.
//!
//! Each container is parsed by a small synchronous parser over `std::io::Read` (the formats are
//! a few lines each and this keeps one code path for files and pipes). The parser runs on a
//! blocking thread and hands frames to the async side through a bounded channel; the async side
//! sleeps until each frame's presentation time, so a file plays at its natural rate and a pipe
//! is never read faster than it is sent (back-pressure through the bounded channel).
//!
//! rtc's `media::io` readers were considered: the IVF reader fits but the Ogg reader returns
//! whole pages (ffmpeg packs ~50 Opus packets per page) and the H.26x reader yields NAL units,
//! not access units, so both would need the same splitting code on top; one small parser per
//! format is simpler. Opus frame durations come from the TOC byte (RFC 6716 §3.1).

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Codec, MediaKind};

/// Frames buffered between the parser thread and the pacer.
const PARSED_QUEUE: usize = 32;
/// Largest frame accepted from a container (guards against corrupt length fields).
const MAX_FRAME: usize = 4 << 20;
/// Largest H.264 access unit buffered while looking for the next start code.
const MAX_ANNEXB_BUFFER: usize = 8 << 20;

/// One encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Audio or video.
    pub kind: MediaKind,
    /// The codec of `data`.
    pub codec: Codec,
    /// The encoded frame (one IVF frame, one Opus packet, one H.264 access unit in Annex-B).
    pub data: Bytes,
    /// Presentation time from the start of the stream.
    pub pts: Duration,
    /// How long the frame lasts.
    pub duration: Duration,
    /// Whether a decoder can start here.
    pub keyframe: bool,
}

/// Errors reading a source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// I/O error.
    #[error("source I/O: {0}")]
    Io(#[from] io::Error),
    /// The container is malformed or not what was expected.
    #[error("bad {format} stream: {reason}")]
    Format {
        /// Container name.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The file name or first bytes name no format we read.
    #[error("unknown media format: {0}")]
    UnknownFormat(String),
}

fn bad(format: &'static str, reason: impl Into<String>) -> SourceError {
    SourceError::Format {
        format,
        reason: reason.into(),
    }
}

/// A stream of encoded frames.
#[async_trait::async_trait]
pub trait MediaSource: Send {
    /// The codec of every sample.
    fn codec(&self) -> Codec;
    /// The next sample, at its presentation time; `None` at the end.
    async fn next_sample(&mut self) -> Result<Option<Sample>, SourceError>;
}

/// Container format of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// IVF (VP8, VP9, AV1).
    Ivf,
    /// Ogg with Opus.
    OggOpus,
    /// H.264 Annex-B byte stream.
    AnnexB,
}

impl Container {
    /// Guesses the container from a file name.
    pub fn from_path(path: &Path) -> Option<Container> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "ivf" => Some(Container::Ivf),
            "ogg" | "opus" | "oga" => Some(Container::OggOpus),
            "h264" | "264" | "avc" => Some(Container::AnnexB),
            _ => None,
        }
    }
}

/// Options of a [`FileSource`].
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Sleep until each frame's presentation time (true for live streaming).
    pub realtime: bool,
    /// Restart at the end of a file, this many times (`None`: no loop; pipes never loop).
    pub loops: Option<u32>,
    /// Frame rate assumed for H.264 (Annex-B has no timestamps).
    pub h264_fps: u32,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            realtime: true,
            loops: None,
            h264_fps: 30,
        }
    }
}

/// A source backed by a parser thread over a file or a pipe.
pub struct FileSource {
    codec: Codec,
    rx: mpsc::Receiver<Result<Sample, SourceError>>,
    realtime: bool,
    start: Option<Instant>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("codec", &self.codec)
            .finish()
    }
}

impl FileSource {
    /// Opens a file; the container is chosen from its extension.
    pub async fn open(path: impl AsRef<Path>, opts: SourceOptions) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        let container = Container::from_path(&path)
            .ok_or_else(|| SourceError::UnknownFormat(path.display().to_string()))?;
        let loops = opts.loops.unwrap_or(0);
        let p = path.clone();
        let open = move || -> io::Result<Box<dyn Read + Send>> {
            Ok(Box::new(io::BufReader::new(std::fs::File::open(&p)?)))
        };
        Self::spawn(container, open, loops, opts).await
    }

    /// Reads from any async byte stream (e.g. `tokio::io::stdin()`); never loops.
    pub async fn from_async_read<R>(
        reader: R,
        container: Container,
        opts: SourceOptions,
    ) -> Result<Self, SourceError>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let handle = tokio::runtime::Handle::current();
        let mut once = Some(Box::new(SyncBridge { reader, handle }) as Box<dyn Read + Send>);
        let open = move || -> io::Result<Box<dyn Read + Send>> {
            once.take()
                .ok_or_else(|| io::Error::other("a pipe cannot be reopened"))
        };
        Self::spawn(container, open, 0, opts).await
    }

    async fn spawn<F>(
        container: Container,
        mut open: F,
        loops: u32,
        opts: SourceOptions,
    ) -> Result<Self, SourceError>
    where
        F: FnMut() -> io::Result<Box<dyn Read + Send>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(PARSED_QUEUE);
        let (codec_tx, codec_rx) = tokio::sync::oneshot::channel();
        let fps = opts.h264_fps.max(1);
        std::thread::Builder::new()
            .name("waterfall-source".into())
            .spawn(move || {
                let mut codec_tx = Some(codec_tx);
                let mut offset = Duration::ZERO;
                for _ in 0..=loops {
                    let reader = match open() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e.into()));
                            return;
                        }
                    };
                    let mut parser: Box<dyn FrameParser> = match container {
                        Container::Ivf => match IvfParser::new(reader) {
                            Ok(p) => Box::new(p),
                            Err(e) => {
                                if let Some(c) = codec_tx.take() {
                                    let _ = c.send(Err(e));
                                }
                                return;
                            }
                        },
                        Container::OggOpus => match OggOpusParser::new(reader) {
                            Ok(p) => Box::new(p),
                            Err(e) => {
                                if let Some(c) = codec_tx.take() {
                                    let _ = c.send(Err(e));
                                }
                                return;
                            }
                        },
                        Container::AnnexB => Box::new(AnnexBParser::new(reader, fps)),
                    };
                    if let Some(c) = codec_tx.take() {
                        let _ = c.send(Ok(parser.codec()));
                    }
                    let mut end = offset;
                    loop {
                        match parser.next_frame() {
                            Ok(Some(mut s)) => {
                                s.pts += offset;
                                end = s.pts + s.duration;
                                if tx.blocking_send(Ok(s)).is_err() {
                                    return; // the source was dropped
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.blocking_send(Err(e));
                                return;
                            }
                        }
                    }
                    offset = end;
                }
            })
            .map_err(SourceError::Io)?;
        let codec = codec_rx
            .await
            .map_err(|_| bad("source", "parser thread ended before the header"))??;
        Ok(FileSource {
            codec,
            rx,
            realtime: opts.realtime,
            start: None,
        })
    }
}

#[async_trait::async_trait]
impl MediaSource for FileSource {
    fn codec(&self) -> Codec {
        self.codec
    }

    async fn next_sample(&mut self) -> Result<Option<Sample>, SourceError> {
        let Some(s) = self.rx.recv().await else {
            return Ok(None);
        };
        let s = s?;
        if self.realtime {
            let start = *self.start.get_or_insert_with(|| Instant::now() - s.pts);
            tokio::time::sleep_until(start + s.pts).await;
        }
        Ok(Some(s))
    }
}

/// Blocking `Read` over an `AsyncRead`, for the parser thread (never used on a runtime worker).
struct SyncBridge<R> {
    reader: R,
    handle: tokio::runtime::Handle,
}

impl<R: tokio::io::AsyncRead + Unpin> Read for SyncBridge<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        self.handle.block_on(self.reader.read(buf))
    }
}

/// A synchronous container parser.
pub trait FrameParser: Send {
    /// The codec of the stream.
    fn codec(&self) -> Codec;
    /// The next frame with its pts, or `None` at a clean end of stream.
    fn next_frame(&mut self) -> Result<Option<Sample>, SourceError>;
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------- IVF

/// IVF file header fields the pipeline needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvfHeader {
    /// Codec FourCC (`VP80`, `VP90`, `AV01`).
    pub fourcc: [u8; 4],
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
    /// Timebase denominator (units per second).
    pub timebase_den: u32,
    /// Timebase numerator.
    pub timebase_num: u32,
    /// Frame count field (0 when unknown).
    pub frames: u32,
}

/// IVF parser (VP8, VP9, AV1).
pub struct IvfParser {
    r: Box<dyn Read + Send>,
    header: IvfHeader,
    codec: Codec,
    first_ts: Option<u64>,
    last_pts: Option<Duration>,
}

impl IvfParser {
    /// Parses the 32-byte file header.
    pub fn new(mut r: Box<dyn Read + Send>) -> Result<Self, SourceError> {
        let mut h = [0u8; 32];
        if !read_full(&mut r, &mut h)? {
            return Err(bad("IVF", "empty stream"));
        }
        if &h[0..4] != b"DKIF" {
            return Err(bad("IVF", "missing DKIF signature"));
        }
        let header_len = u16::from_le_bytes([h[6], h[7]]) as usize;
        let header = IvfHeader {
            fourcc: [h[8], h[9], h[10], h[11]],
            width: u16::from_le_bytes([h[12], h[13]]),
            height: u16::from_le_bytes([h[14], h[15]]),
            timebase_den: u32::from_le_bytes([h[16], h[17], h[18], h[19]]),
            timebase_num: u32::from_le_bytes([h[20], h[21], h[22], h[23]]),
            frames: u32::from_le_bytes([h[24], h[25], h[26], h[27]]),
        };
        if header_len > 32 {
            let mut skip = vec![0u8; (header_len - 32).min(1024)];
            read_full(&mut r, &mut skip)?;
        }
        let codec = match &header.fourcc {
            b"VP80" => Codec::Vp8,
            b"VP90" => Codec::Vp9,
            b"AV01" => Codec::Av1,
            other => {
                return Err(bad(
                    "IVF",
                    format!("unsupported fourcc {}", String::from_utf8_lossy(other)),
                ));
            }
        };
        if header.timebase_den == 0 || header.timebase_num == 0 {
            return Err(bad("IVF", "zero timebase"));
        }
        Ok(IvfParser {
            r,
            header,
            codec,
            first_ts: None,
            last_pts: None,
        })
    }

    /// The file header.
    pub fn header(&self) -> IvfHeader {
        self.header
    }
}

impl FrameParser for IvfParser {
    fn codec(&self) -> Codec {
        self.codec
    }

    fn next_frame(&mut self) -> Result<Option<Sample>, SourceError> {
        let mut fh = [0u8; 12];
        if !read_full(&mut self.r, &mut fh)? {
            return Ok(None);
        }
        let size = u32::from_le_bytes([fh[0], fh[1], fh[2], fh[3]]) as usize;
        let ts = u64::from_le_bytes([fh[4], fh[5], fh[6], fh[7], fh[8], fh[9], fh[10], fh[11]]);
        if size == 0 || size > MAX_FRAME {
            return Err(bad("IVF", format!("frame size {size}")));
        }
        let mut data = vec![0u8; size];
        if !read_full(&mut self.r, &mut data)? {
            return Err(bad("IVF", "truncated frame"));
        }
        let first = *self.first_ts.get_or_insert(ts);
        let units = ts.saturating_sub(first);
        let nanos = (units as u128 * self.header.timebase_num as u128 * 1_000_000_000)
            / self.header.timebase_den as u128;
        let pts = Duration::from_nanos(nanos.min(u64::MAX as u128) as u64);
        let duration = match self.last_pts {
            Some(prev) if pts > prev => pts - prev,
            _ => Duration::from_millis(33),
        };
        self.last_pts = Some(pts);
        let keyframe = match self.codec {
            Codec::Vp8 => data[0] & 0x01 == 0,
            // VP9 uncompressed header: frame_marker(2) profile(2..3) show_existing(1) frame_type(1)
            Codec::Vp9 => vp9_keyframe(&data),
            // AV1: a sequence header OBU (type 1) starts every keyframe temporal unit ffmpeg writes.
            Codec::Av1 => av1_has_sequence_header(&data),
            _ => false,
        };
        Ok(Some(Sample {
            kind: self.codec.kind(),
            codec: self.codec,
            data: Bytes::from(data),
            pts,
            duration,
            keyframe,
        }))
    }
}

pub(crate) fn vp9_keyframe(d: &[u8]) -> bool {
    let Some(&b) = d.first() else { return false };
    if b >> 6 != 0b10 {
        return false;
    }
    let profile = ((b >> 5) & 1) | (((b >> 4) & 1) << 1);
    let mut bit = 4;
    if profile == 3 {
        bit += 1;
    }
    let show_existing = (b >> (7 - bit)) & 1;
    if show_existing == 1 {
        return false;
    }
    bit += 1;
    if bit > 7 {
        return d.get(1).is_some_and(|b1| b1 >> 7 == 0);
    }
    (b >> (7 - bit)) & 1 == 0
}

pub(crate) fn av1_has_sequence_header(d: &[u8]) -> bool {
    let mut i = 0;
    let mut guard = 0;
    while i < d.len() && guard < 16 {
        guard += 1;
        let h = d[i];
        let obu_type = (h >> 3) & 0x0f;
        if obu_type == 1 {
            return true;
        }
        let has_ext = h & 0x04 != 0;
        let has_size = h & 0x02 != 0;
        i += 1 + usize::from(has_ext);
        if !has_size {
            return false;
        }
        let mut size: usize = 0;
        let mut shift = 0;
        loop {
            let Some(&b) = d.get(i) else { return false };
            i += 1;
            size |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 || shift > 56 {
                break;
            }
        }
        i = i.saturating_add(size);
    }
    false
}

// ---------------------------------------------------------------- Ogg Opus

/// OpusHead fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpusHead {
    /// Channel count.
    pub channels: u8,
    /// Samples (at 48 kHz) to discard at the start.
    pub pre_skip: u16,
    /// Original input sample rate (informational).
    pub input_rate: u32,
}

/// Ogg Opus parser: pages -> packets (lacing), OpusHead and OpusTags skipped.
pub struct OggOpusParser {
    r: Box<dyn Read + Send>,
    pending: std::collections::VecDeque<Vec<u8>>,
    partial: Vec<u8>,
    head: OpusHead,
    samples: u64,
    eos: bool,
}

impl OggOpusParser {
    /// Reads the identification and comment headers.
    pub fn new(r: Box<dyn Read + Send>) -> Result<Self, SourceError> {
        let mut p = OggOpusParser {
            r,
            pending: Default::default(),
            partial: Vec::new(),
            head: OpusHead {
                channels: 2,
                pre_skip: 0,
                input_rate: 48_000,
            },
            samples: 0,
            eos: false,
        };
        let id = p.next_packet()?.ok_or_else(|| bad("Ogg", "no OpusHead"))?;
        if id.len() < 19 || &id[..8] != b"OpusHead" {
            return Err(bad("Ogg", "first packet is not OpusHead"));
        }
        p.head = OpusHead {
            channels: id[9],
            pre_skip: u16::from_le_bytes([id[10], id[11]]),
            input_rate: u32::from_le_bytes([id[12], id[13], id[14], id[15]]),
        };
        let tags = p.next_packet()?.ok_or_else(|| bad("Ogg", "no OpusTags"))?;
        if tags.len() < 8 || &tags[..8] != b"OpusTags" {
            return Err(bad("Ogg", "second packet is not OpusTags"));
        }
        Ok(p)
    }

    /// The OpusHead of the stream.
    pub fn head(&self) -> OpusHead {
        self.head
    }

    fn next_packet(&mut self) -> Result<Option<Vec<u8>>, SourceError> {
        let mut pages = 0;
        while self.pending.is_empty() {
            if self.eos || pages > 1024 {
                return Ok(None);
            }
            pages += 1;
            let mut h = [0u8; 27];
            if !read_full(&mut self.r, &mut h)? {
                return Ok(None);
            }
            if &h[..4] != b"OggS" {
                return Err(bad("Ogg", "missing OggS capture pattern"));
            }
            self.eos = h[5] & 0x04 != 0;
            let nseg = h[26] as usize;
            let mut lacing = vec![0u8; nseg];
            if !read_full(&mut self.r, &mut lacing)? && nseg > 0 {
                return Err(bad("Ogg", "truncated page"));
            }
            let total: usize = lacing.iter().map(|&l| l as usize).sum();
            let mut body = vec![0u8; total];
            if total > 0 && !read_full(&mut self.r, &mut body)? {
                return Err(bad("Ogg", "truncated page"));
            }
            let mut at = 0;
            for &l in &lacing {
                self.partial.extend_from_slice(&body[at..at + l as usize]);
                at += l as usize;
                if self.partial.len() > MAX_FRAME {
                    return Err(bad("Ogg", "packet too large"));
                }
                if l < 255 {
                    self.pending.push_back(std::mem::take(&mut self.partial));
                }
            }
        }
        Ok(self.pending.pop_front())
    }
}

impl FrameParser for OggOpusParser {
    fn codec(&self) -> Codec {
        Codec::Opus
    }

    fn next_frame(&mut self) -> Result<Option<Sample>, SourceError> {
        loop {
            let Some(pkt) = self.next_packet()? else {
                return Ok(None);
            };
            if pkt.is_empty() {
                continue;
            }
            let n = opus_packet_samples(&pkt).unwrap_or(960);
            let pts = Duration::from_nanos(self.samples * 1_000_000_000 / 48_000);
            self.samples += n as u64;
            return Ok(Some(Sample {
                kind: MediaKind::Audio,
                codec: Codec::Opus,
                data: Bytes::from(pkt),
                pts,
                duration: Duration::from_nanos(n as u64 * 1_000_000_000 / 48_000),
                keyframe: true,
            }));
        }
    }
}

/// Samples at 48 kHz in one Opus packet, from its TOC byte (RFC 6716 §3.1).
pub fn opus_packet_samples(pkt: &[u8]) -> Option<u32> {
    let toc = *pkt.first()?;
    let config = toc >> 3;
    let per_frame: u32 = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize],
        12..=15 => [480, 960][(config % 2) as usize],
        _ => [120, 240, 480, 960][(config % 4) as usize],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => (*pkt.get(1)? & 0x3f) as u32,
    };
    Some(per_frame * frames)
}

// ---------------------------------------------------------------- H.264 Annex-B

/// H.264 Annex-B parser: splits NAL units at start codes and groups them into access units.
pub struct AnnexBParser {
    r: Box<dyn Read + Send>,
    buf: Vec<u8>,
    eof: bool,
    au: Vec<u8>,
    au_has_vcl: bool,
    au_key: bool,
    frame: u64,
    fps: u32,
}

impl AnnexBParser {
    /// A parser assuming `fps` frames per second.
    pub fn new(r: Box<dyn Read + Send>, fps: u32) -> Self {
        AnnexBParser {
            r,
            buf: Vec::new(),
            eof: false,
            au: Vec::new(),
            au_has_vcl: false,
            au_key: false,
            frame: 0,
            fps: fps.max(1),
        }
    }

    /// Next NAL unit without its start code.
    fn next_nal(&mut self) -> Result<Option<Vec<u8>>, SourceError> {
        loop {
            // Find the first start code, then the next one.
            if let Some(s) = find_start(&self.buf, 0) {
                let body = s.0 + s.1;
                if let Some(e) = find_start(&self.buf, body) {
                    let nal = self.buf[body..e.0].to_vec();
                    self.buf.drain(..e.0);
                    return Ok(Some(nal));
                }
                if self.eof {
                    let nal = self.buf[body..].to_vec();
                    self.buf.clear();
                    return Ok(if nal.is_empty() { None } else { Some(nal) });
                }
            } else if self.eof {
                return Ok(None);
            }
            if self.buf.len() > MAX_ANNEXB_BUFFER {
                return Err(bad("H.264", "NAL unit too large"));
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = loop {
                match self.r.read(&mut chunk) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn take_au(&mut self) -> Sample {
        let pts = Duration::from_nanos(self.frame * 1_000_000_000 / self.fps as u64);
        self.frame += 1;
        let s = Sample {
            kind: MediaKind::Video,
            codec: Codec::H264,
            data: Bytes::from(std::mem::take(&mut self.au)),
            pts,
            duration: Duration::from_nanos(1_000_000_000 / self.fps as u64),
            keyframe: self.au_key,
        };
        self.au_has_vcl = false;
        self.au_key = false;
        s
    }
}

/// (position, start code length) of the next `00 00 01` / `00 00 00 01` at or after `from`.
fn find_start(b: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 3 <= b.len() {
        if b[i] == 0 && b[i + 1] == 0 {
            if b[i + 2] == 1 {
                return Some((i, 3));
            }
            if b[i + 2] == 0 && i + 3 < b.len() && b[i + 3] == 1 {
                return Some((i, 4));
            }
        }
        i += 1;
    }
    None
}

impl FrameParser for AnnexBParser {
    fn codec(&self) -> Codec {
        Codec::H264
    }

    fn next_frame(&mut self) -> Result<Option<Sample>, SourceError> {
        loop {
            let Some(nal) = self.next_nal()? else {
                if self.au_has_vcl {
                    return Ok(Some(self.take_au()));
                }
                return Ok(None);
            };
            let Some(&h) = nal.first() else { continue };
            let t = h & 0x1f;
            let vcl = t == 1 || t == 5;
            // A new access unit starts at an AUD/SPS/PPS/SEI, or at a slice whose
            // first_mb_in_slice is 0 (ue(v) == 0 <=> first bit 1), once a VCL NAL was seen.
            let starts_au =
                matches!(t, 6..=9) || (vcl && nal.get(1).is_some_and(|b| b & 0x80 != 0));
            let out = if self.au_has_vcl && starts_au {
                Some(self.take_au())
            } else {
                None
            };
            self.au.extend_from_slice(&[0, 0, 0, 1]);
            self.au.extend_from_slice(&nal);
            self.au_has_vcl |= vcl;
            self.au_key |= t == 5;
            if out.is_some() {
                return Ok(out);
            }
        }
    }
}

/// Reads a whole file with the parser of its container (used by tests and tools).
pub fn read_all_frames(path: impl AsRef<Path>) -> Result<Vec<Sample>, SourceError> {
    let path: PathBuf = path.as_ref().to_path_buf();
    let container = Container::from_path(&path)
        .ok_or_else(|| SourceError::UnknownFormat(path.display().to_string()))?;
    let r: Box<dyn Read + Send> = Box::new(io::BufReader::new(std::fs::File::open(&path)?));
    let mut p: Box<dyn FrameParser> = match container {
        Container::Ivf => Box::new(IvfParser::new(r)?),
        Container::OggOpus => Box::new(OggOpusParser::new(r)?),
        Container::AnnexB => Box::new(AnnexBParser::new(r, 30)),
    };
    let mut out = Vec::new();
    while let Some(s) = p.next_frame()? {
        out.push(s);
        if out.len() > 10_000_000 {
            return Err(bad("source", "too many frames"));
        }
    }
    Ok(out)
}
