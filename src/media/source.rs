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
//!
//! The container is known from the first bytes: IVF starts with `DKIF`, Ogg with `OggS`, an
//! H.264 Annex-B stream with a start code (`00 00 01` or `00 00 00 01`). A pipe is recognised by
//! them alone ([`FileSource::from_async_read_detect`]); a file's name extension must agree with
//! them, so an Ogg file named `.ivf` is refused with both names instead of failing deep in a
//! parser with "missing DKIF signature".

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Codec, MediaKind};

mod annexb;
mod ivf;
mod ogg;

pub use annexb::AnnexBParser;
pub use ivf::{IvfHeader, IvfParser};
pub(crate) use ivf::{av1_has_sequence_header, vp9_keyframe};
pub use ogg::{OggOpusParser, OpusHead, opus_packet_samples};

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
    /// The file could not be opened (no such file, no permission...).
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The path as given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file's name promises one container and its first bytes are another.
    #[error("{what} is named like {named} but holds {found}")]
    Mismatch {
        /// The file (or `stdin`).
        what: String,
        /// The container its name (or the caller) declared.
        named: &'static str,
        /// The container its first bytes show.
        found: &'static str,
    },
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
    /// Where the broadcaster passes keyframe requests (a new child, a viewer that lost
    /// packets), already coalesced: a live source that can make a keyframe on demand (a WebRTC
    /// publisher, see `crate::http`) returns a sender and gets `()` per request (dropped when
    /// full); a file cannot, and returns `None` (the default).
    fn keyframe_requests(&self) -> Option<mpsc::Sender<()>> {
        None
    }
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

    /// Recognises a container from the first bytes of a stream (4 are enough).
    pub fn sniff(head: &[u8]) -> Option<Container> {
        if head.starts_with(b"DKIF") {
            Some(Container::Ivf)
        } else if head.starts_with(b"OggS") {
            Some(Container::OggOpus)
        } else if head.starts_with(&[0, 0, 1]) || head.starts_with(&[0, 0, 0, 1]) {
            Some(Container::AnnexB)
        } else {
            None
        }
    }

    /// Whether the container carries video or audio.
    pub fn kind(self) -> MediaKind {
        match self {
            Container::Ivf | Container::AnnexB => MediaKind::Video,
            Container::OggOpus => MediaKind::Audio,
        }
    }

    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Container::Ivf => "IVF video",
            Container::OggOpus => "Ogg Opus audio",
            Container::AnnexB => "H.264 Annex-B video",
        }
    }
}

/// Bytes sniffed from the start of a stream.
const SNIFF_LEN: usize = 4;

/// Reads up to `n` bytes (fewer only at the end of the stream).
fn read_head(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(got);
    Ok(head)
}

/// The container to parse: what the first bytes show, checked against what was declared.
fn choose_container(
    what: &str,
    declared: Option<Container>,
    head: &[u8],
) -> Result<Container, SourceError> {
    match (declared, Container::sniff(head)) {
        (Some(d), Some(s)) if d != s => Err(SourceError::Mismatch {
            what: what.to_owned(),
            named: d.name(),
            found: s.name(),
        }),
        // A declared container with unrecognised bytes: its parser says what is wrong.
        (Some(d), _) => Ok(d),
        (None, Some(s)) => Ok(s),
        (None, None) if head.is_empty() => Err(bad("media", format!("{what} is empty"))),
        (None, None) => Err(SourceError::UnknownFormat(format!(
            "{what} starts with bytes {} (expected IVF `DKIF`, Ogg `OggS` or an H.264 Annex-B \
             start code)",
            hex::encode(head)
        ))),
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

/// Where the parser thread reports the codec (or why there is none).
type CodecReply = tokio::sync::oneshot::Sender<Result<Codec, SourceError>>;

/// A source backed by a parser thread over a file or a pipe.
pub struct FileSource {
    codec: Codec,
    rx: mpsc::Receiver<Result<Sample, SourceError>>,
    realtime: bool,
    start: Option<Instant>,
    /// How much earlier the clock may still move to catch up with a pipe (see
    /// [`PIPE_CATCH_UP`]); zero for a file.
    catch_up: Duration,
}

/// A pipe's writer runs on its own clock: frames it wrote while this process started (or was
/// busy) wait in the pipe, and pacing from the first one read would play every later frame late
/// by as much, for the whole stream (measured: the 0.5 s a broadcaster takes to start, added to
/// every frame's latency). When frames are already queued behind one that is not yet due, the
/// clock moves earlier so it plays at once, up to this much in all; a pipe fed from a file
/// (always queued) then runs at most this far ahead of its timestamps.
const PIPE_CATCH_UP: Duration = Duration::from_secs(1);

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("codec", &self.codec)
            .finish()
    }
}

impl FileSource {
    /// Opens a file. Its first bytes name the container; a known extension (`.ivf`, `.ogg`,
    /// `.h264`...) must agree with them ([`SourceError::Mismatch`] otherwise).
    pub async fn open(path: impl AsRef<Path>, opts: SourceOptions) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        let declared = Container::from_path(&path);
        let loops = opts.loops.unwrap_or(0);
        let p = path.clone();
        let open = move || -> Result<Box<dyn Read + Send>, SourceError> {
            let f = std::fs::File::open(&p).map_err(|source| SourceError::Open {
                path: p.clone(),
                source,
            })?;
            Ok(Box::new(io::BufReader::new(f)))
        };
        Self::spawn(path.display().to_string(), declared, open, loops, opts).await
    }

    /// Reads from any async byte stream (e.g. `tokio::io::stdin()`) holding `container`; never
    /// loops. A stream whose first bytes show another container is refused.
    pub async fn from_async_read<R>(
        reader: R,
        container: Container,
        opts: SourceOptions,
    ) -> Result<Self, SourceError>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        Self::from_pipe(reader, Some(container), opts).await
    }

    /// Reads from any async byte stream, the container recognised from its first bytes (IVF,
    /// Ogg Opus or H.264 Annex-B); never loops.
    pub async fn from_async_read_detect<R>(
        reader: R,
        opts: SourceOptions,
    ) -> Result<Self, SourceError>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        Self::from_pipe(reader, None, opts).await
    }

    async fn from_pipe<R>(
        reader: R,
        declared: Option<Container>,
        opts: SourceOptions,
    ) -> Result<Self, SourceError>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let handle = tokio::runtime::Handle::current();
        let mut once = Some(Box::new(SyncBridge { reader, handle }) as Box<dyn Read + Send>);
        let open = move || -> Result<Box<dyn Read + Send>, SourceError> {
            once.take()
                .ok_or_else(|| io::Error::other("a pipe cannot be reopened").into())
        };
        let mut source = Self::spawn("stdin".into(), declared, open, 0, opts).await?;
        source.catch_up = PIPE_CATCH_UP;
        Ok(source)
    }

    /// Runs the parser thread; returns once the header is read (or refused), so every error a
    /// user can fix (no such file, wrong format) comes back from `open`, not later.
    async fn spawn<F>(
        what: String,
        declared: Option<Container>,
        mut open: F,
        loops: u32,
        opts: SourceOptions,
    ) -> Result<Self, SourceError>
    where
        F: FnMut() -> Result<Box<dyn Read + Send>, SourceError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(PARSED_QUEUE);
        let (codec_tx, codec_rx) = tokio::sync::oneshot::channel();
        let fps = opts.h264_fps.max(1);
        std::thread::Builder::new()
            .name("waterfall-source".into())
            .spawn(move || {
                let mut codec_tx = Some(codec_tx);
                // Before the header is parsed, errors go to `spawn`'s caller; after, to the
                // frame stream.
                let fail = |codec_tx: &mut Option<CodecReply>, e: SourceError| match codec_tx.take()
                {
                    Some(c) => {
                        let _ = c.send(Err(e));
                    }
                    None => {
                        let _ = tx.blocking_send(Err(e));
                    }
                };
                let mut offset = Duration::ZERO;
                let mut container = declared;
                for _ in 0..=loops {
                    let parser = open().and_then(|mut reader| {
                        let head = read_head(&mut reader, SNIFF_LEN)?;
                        let c = choose_container(&what, container, &head)?;
                        container = Some(c);
                        let reader: Box<dyn Read + Send> =
                            Box::new(io::Cursor::new(head).chain(reader));
                        Ok(match c {
                            Container::Ivf => {
                                Box::new(IvfParser::new(reader)?) as Box<dyn FrameParser>
                            }
                            Container::OggOpus => Box::new(OggOpusParser::new(reader)?),
                            Container::AnnexB => Box::new(AnnexBParser::new(reader, fps)),
                        })
                    });
                    let mut parser = match parser {
                        Ok(p) => p,
                        Err(e) => return fail(&mut codec_tx, e),
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
            .map_err(|_| bad("source", "the parser thread stopped before the header"))??;
        Ok(FileSource {
            codec,
            rx,
            realtime: opts.realtime,
            start: None,
            catch_up: Duration::ZERO,
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
            let now = Instant::now();
            let mut start = *self.start.get_or_insert_with(|| now - s.pts);
            let due = start + s.pts;
            if due > now && !self.catch_up.is_zero() && self.rx.len() >= 2 {
                let shift = (due - now).min(self.catch_up);
                start -= shift;
                self.catch_up -= shift;
                self.start = Some(start);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An IVF stream of `n` tiny VP8 frames at 30 fps.
    fn ivf(n: u64) -> Vec<u8> {
        let mut v = b"DKIF".to_vec();
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&32u16.to_le_bytes());
        v.extend_from_slice(b"VP80");
        v.extend_from_slice(&320u16.to_le_bytes());
        v.extend_from_slice(&240u16.to_le_bytes());
        v.extend_from_slice(&30u32.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&(n as u32).to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        for ts in 0..n {
            v.extend_from_slice(&3u32.to_le_bytes());
            v.extend_from_slice(&ts.to_le_bytes());
            v.extend_from_slice(&[0x10, 0, 0]);
        }
        v
    }

    /// Frames that waited in a pipe are played at once, the clock moving earlier by at most
    /// `PIPE_CATCH_UP`; a file is paced from its first frame as before.
    #[tokio::test]
    async fn a_pipe_catches_up_with_frames_that_waited_and_a_file_does_not() {
        let data = ivf(45);
        let mut pipe = FileSource::from_async_read_detect(
            std::io::Cursor::new(data.clone()),
            SourceOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(pipe.catch_up, PIPE_CATCH_UP);
        let mut n = 0;
        while pipe.next_sample().await.unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 45);
        // The whole 1.5 s stream was queued: the clock used all of its allowance.
        assert_eq!(pipe.catch_up, Duration::ZERO);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.ivf");
        std::fs::write(&path, &data).unwrap();
        let file = FileSource::open(&path, SourceOptions::default())
            .await
            .unwrap();
        assert_eq!(file.catch_up, Duration::ZERO);
    }
}
