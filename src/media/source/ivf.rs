//! IVF (VP8, VP9, AV1): a 32-byte file header, then frames of `size(4) | timestamp(8) | data`,
//! little endian, timestamps in the header's timebase. Keyframes are read from each codec's
//! first payload bytes (VP8 frame tag, VP9 uncompressed header, an AV1 sequence header OBU).
//!
//! A timestamp that jumps ahead by more than [`MAX_TS_GAP`] (a splice, a corrupt or hostile
//! file) would make the real-time pacer wait that long before the next frame, silently: the
//! timeline is rebased instead, so the frame follows its predecessor by one frame duration,
//! and a warning says so.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;

use super::{FrameParser, MAX_FRAME, Sample, SourceError, bad, read_full};
use crate::media::Codec;

/// Largest forward timestamp step taken as is; more is a discontinuity (see the module docs).
pub const MAX_TS_GAP: Duration = Duration::from_secs(5);
/// Frame duration assumed when nothing better is known (30 fps).
const DEFAULT_FRAME: Duration = Duration::from_millis(33);

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
    /// The last frame's duration (the step used across a discontinuity).
    last_step: Duration,
    /// Subtracted from every timestamp since the discontinuities seen so far.
    rebase: Duration,
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
            last_step: DEFAULT_FRAME,
            rebase: Duration::ZERO,
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
        let mut pts =
            Duration::from_nanos(nanos.min(u64::MAX as u128) as u64).saturating_sub(self.rebase);
        if let Some(prev) = self.last_pts
            && pts > prev + MAX_TS_GAP
        {
            let jump = pts - prev;
            let next = prev + self.last_step;
            self.rebase += pts - next;
            pts = next;
            tracing::warn!(
                "IVF timestamp jumps ahead by {:.1} s: treated as a discontinuity, the stream \
                 goes on without waiting",
                jump.as_secs_f64()
            );
        }
        let duration = match self.last_pts {
            Some(prev) if pts > prev => pts - prev,
            _ => DEFAULT_FRAME,
        };
        self.last_step = duration;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ivf(timestamps: &[u64]) -> Vec<u8> {
        let mut v = b"DKIF".to_vec();
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&32u16.to_le_bytes());
        v.extend_from_slice(b"VP80");
        v.extend_from_slice(&320u16.to_le_bytes());
        v.extend_from_slice(&240u16.to_le_bytes());
        v.extend_from_slice(&30u32.to_le_bytes()); // timebase 1/30
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&(timestamps.len() as u32).to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        for ts in timestamps {
            v.extend_from_slice(&3u32.to_le_bytes());
            v.extend_from_slice(&ts.to_le_bytes());
            v.extend_from_slice(&[0x10, 0, 0]);
        }
        v
    }

    #[test]
    fn a_timestamp_jump_is_a_discontinuity_not_a_stall() {
        // Frames 0, 1, then a jump of a day, then on from there.
        let day = 30 * 86_400;
        let data = ivf(&[0, 1, day, day + 1]);
        let mut p = IvfParser::new(Box::new(std::io::Cursor::new(data))).unwrap();
        let pts: Vec<Duration> = std::iter::from_fn(|| p.next_frame().unwrap())
            .map(|s| s.pts)
            .collect();
        let frame = Duration::from_nanos(1_000_000_000 / 30);
        assert_eq!(pts.len(), 4);
        assert_eq!(pts[1], frame);
        assert_eq!(pts[2], frame * 2, "the jump becomes one frame step");
        assert_eq!(pts[3], frame * 3, "and the timeline goes on from there");
    }
}
