//! Ogg Opus (RFC 7845): pages are reassembled into packets by their lacing values; the first two
//! packets (OpusHead, OpusTags) are headers; each later packet is one Opus frame, its duration
//! read from the TOC byte (RFC 6716 §3.1).

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;

use super::{FrameParser, MAX_FRAME, Sample, SourceError, bad, read_full};
use crate::media::{Codec, MediaKind};

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
