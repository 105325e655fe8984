//! H.264 Annex-B: NAL units between start codes, grouped into access units (one per frame).
//! The stream carries no timestamps, so frames are paced at a configured rate.

use std::io::{self, Read};
use std::time::Duration;

use bytes::Bytes;

use super::{FrameParser, MAX_ANNEXB_BUFFER, Sample, SourceError, bad};
use crate::media::{Codec, MediaKind};

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
