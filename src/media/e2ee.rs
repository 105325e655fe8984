//! End-to-end frame encryption.
//!
//! Modelled on WebRTC insertable-streams E2EE and SFrame (RFC 9605): each encoded frame is
//! encrypted *before* RTP packetization, so every relay forwards ciphertext it cannot read, and
//! only holders of the 32-byte media key (derived from the room password by the crypto module)
//! can decode. One XChaCha20-Poly1305 AEAD protects each frame, with a random 192-bit nonce
//! (collisions are negligible without any counter state, which matters because a relay tree
//! has no single writer to coordinate with). Whatever stays in clear is authenticated as
//! associated data, so tampering with it is detected too.
//!
//! The RTP payloaders differ in what they need to see, so the layout depends on the codec.
//!
//! **VP8, VP9, Opus: clear prefix.** The payloaders do not parse the frame (VP8's and VP9's
//! descriptors are built from the packetizer's own state), so the frame stays one blob whose
//! first bytes are left in clear for keyframe detection without the key: VP8 keyframe 10 bytes
//! (frame tag, start code, dimensions), VP8 delta frame 3 bytes, VP9 keyframe 10 bytes (frame
//! marker, profile, frame type, sync code, colour config and frame size fit in 74 bits), VP9
//! other frames 1 byte (frame type), Opus 1 byte (the TOC).
//!
//! ```text
//! clear header | ciphertext | 16-byte Poly1305 tag | 24-byte XChaCha20 nonce
//! ```
//!
//! **H.264 (Annex-B): per NAL unit.** The payloader splits the access unit at start codes,
//! reads each NAL header (type, NRI) to choose single-NAL, STAP-A or FU-A packets, and holds SPS
//! and PPS back to aggregate them. So each NAL header byte stays in clear and only the NAL
//! payloads are encrypted, all of them under one AEAD (their concatenation), the tag and nonce
//! going to the end of the last NAL unit. The ciphertext then gets H.264 emulation prevention
//! (`00 00 x` with x <= 3 becomes `00 00 03 x`), so no start code can appear inside it, and a
//! `0x80` terminator (like `rbsp_stop_one_bit`), so a payload never ends in a zero byte that the
//! next start code would absorb and is never empty:
//!
//! ```text
//! 00 00 00 01 | NAL header | EP(ciphertext_1) | 80      ... for every NAL unit but the last
//! 00 00 00 01 | NAL header | EP(ciphertext_n | tag | nonce) | 80
//! ```
//!
//! The associated data lists every NAL header and payload length, so order and boundaries are
//! authenticated too. The receiver splits the depacketized access unit at start codes, strips
//! terminator and emulation bytes and decrypts. NAL units the RTP path cannot carry are left
//! out by the sender: access unit delimiters and filler (the payloader drops them anyway),
//! header-only NAL units (end of sequence/stream: a 1-byte NAL unit is rejected by the
//! depacketizer) and the unspecified types 0 and 24..=31 (RTP reuses them for STAP/FU).
//!
//! **AV1: per OBU.** The payloader parses the OBU headers and leb128 sizes of the temporal
//! unit and drops temporal delimiters, tile lists and padding; the depacketizer gives every OBU
//! a size field. So OBU headers (and extension bytes) stay in clear, the OBU payloads are
//! encrypted under one AEAD as for H.264, and each size field is rewritten for its piece of
//! ciphertext (the last one grows by tag and nonce). Sequence headers are encrypted too: neither
//! the depacketizer nor anything before decryption reads them (the `N` bit of the aggregation
//! header only needs the clear OBU type). The receiver restores the temporal delimiter every
//! temporal unit starts with (AV1 §7.5), so what it writes is byte-identical to what a
//! low-overhead-format source (libaom, ffmpeg's IVF) produced.
//!
//! Data-channel messages use the clear-prefix construction with no clear header and a
//! domain-separating associated-data prefix, so a media frame cannot be replayed as a data
//! message or vice versa; the structured schemes add a codec label to their associated data.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroize;

use super::Codec;

/// Bytes appended to every protected frame (tag + nonce).
pub const OVERHEAD: usize = TAG_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 24;

/// Domain-separation prefixes for the associated data.
const AD_MEDIA: &[u8] = b"waterfall/v1/frame";
const AD_DATA: &[u8] = b"waterfall/v1/data";

/// Errors of frame protection.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum E2eeError {
    /// The frame does not authenticate: wrong media key, or tampered in transit.
    #[error("frame does not authenticate (wrong media key or tampered frame)")]
    Authentication,
    /// The protected frame is shorter than its header and trailer.
    #[error("protected frame too short ({0} bytes)")]
    Truncated(usize),
    /// The frame cannot be parsed as the codec's bitstream (H.264 NAL units, AV1 OBUs), or
    /// has nothing the RTP path can carry.
    #[error("malformed {0} frame: {1}")]
    Malformed(Codec, &'static str),
    /// Encryption itself failed (only on absurd lengths).
    #[error("encryption failed")]
    Encrypt,
}

/// The 32-byte media key of a room. Zeroized on drop; `Debug` does not print it.
#[derive(Clone)]
pub struct MediaKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaKey(..)")
    }
}

impl MediaKey {
    /// Wraps raw key bytes (the caller's copy is left alone; zeroize it if you own it).
    pub fn new(key: [u8; 32]) -> MediaKey {
        let mut k = key;
        let cipher = XChaCha20Poly1305::new(&k.into());
        k.zeroize();
        MediaKey { cipher }
    }

    /// Encrypts one encoded frame, leaving the codec header in clear.
    pub fn encrypt_frame(&self, codec: Codec, frame: &[u8]) -> Result<Bytes, E2eeError> {
        match codec {
            Codec::H264 => return self.encrypt_h264(frame),
            Codec::Av1 => return self.encrypt_av1(frame),
            _ => {}
        }
        let clear = clear_len(codec, frame);
        self.seal(AD_MEDIA, &frame[..clear], &frame[clear..])
    }

    /// Decrypts one protected frame. A wrong key yields [`E2eeError::Authentication`] and no
    /// bytes at all, so nothing undecodable ever reaches a file.
    pub fn decrypt_frame(&self, codec: Codec, protected: &[u8]) -> Result<Bytes, E2eeError> {
        match codec {
            Codec::H264 => return self.decrypt_h264(protected),
            Codec::Av1 => return self.decrypt_av1(protected),
            _ => {}
        }
        if protected.len() < OVERHEAD {
            return Err(E2eeError::Truncated(protected.len()));
        }
        // The clear header length is a function of the clear bytes only, so the receiver
        // recomputes it exactly as the sender did.
        let body_len = protected.len() - OVERHEAD;
        let clear = clear_len(codec, &protected[..body_len]).min(body_len);
        self.open(AD_MEDIA, protected, clear)
    }

    /// Encrypts one data-channel message.
    pub fn encrypt_data(&self, msg: &[u8]) -> Result<Bytes, E2eeError> {
        self.seal(AD_DATA, &[], msg)
    }

    /// Decrypts one data-channel message.
    pub fn decrypt_data(&self, protected: &[u8]) -> Result<Bytes, E2eeError> {
        if protected.len() < OVERHEAD {
            return Err(E2eeError::Truncated(protected.len()));
        }
        self.open(AD_DATA, protected, 0)
    }

    fn seal(&self, domain: &[u8], clear: &[u8], secret: &[u8]) -> Result<Bytes, E2eeError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = XNonce::from(nonce_bytes);
        let aad = associated_data(domain, clear);
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: secret,
                    aad: &aad,
                },
            )
            .map_err(|_| E2eeError::Encrypt)?;
        let mut out = BytesMut::with_capacity(clear.len() + ct.len() + NONCE_LEN);
        out.put_slice(clear);
        out.put_slice(&ct);
        out.put_slice(&nonce_bytes);
        Ok(out.freeze())
    }

    fn open(&self, domain: &[u8], protected: &[u8], clear: usize) -> Result<Bytes, E2eeError> {
        let nonce_at = protected.len() - NONCE_LEN;
        let nonce_bytes: [u8; NONCE_LEN] = protected[nonce_at..]
            .try_into()
            .map_err(|_| E2eeError::Truncated(protected.len()))?;
        let nonce = XNonce::from(nonce_bytes);
        let aad = associated_data(domain, &protected[..clear]);
        let pt = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &protected[clear..nonce_at],
                    aad: &aad,
                },
            )
            .map_err(|_| E2eeError::Authentication)?;
        let mut out = BytesMut::with_capacity(clear + pt.len());
        out.put_slice(&protected[..clear]);
        out.put_slice(&pt);
        Ok(out.freeze())
    }
}

fn associated_data(domain: &[u8], clear: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(domain.len() + clear.len());
    aad.extend_from_slice(domain);
    aad.extend_from_slice(clear);
    aad
}

/// How many leading bytes of a VP8, VP9 or Opus frame stay in clear (H.264 and AV1 use the
/// structured schemes of [`MediaKey::encrypt_frame`] instead and return 0 here).
pub fn clear_len(codec: Codec, frame: &[u8]) -> usize {
    let want = match codec {
        Codec::Vp8 => {
            if is_vp8_keyframe(frame) {
                10
            } else {
                3
            }
        }
        // The uncompressed header's first byte holds frame_marker, profile, show_existing_frame
        // and frame_type; a keyframe's first 10 bytes also reach past the sync code, colour
        // config and frame size (at most 74 bits), as VP8's 10 do.
        Codec::Vp9 => {
            if super::source::vp9_keyframe(frame) {
                10
            } else {
                1
            }
        }
        Codec::Opus => 1,
        _ => 0,
    };
    want.min(frame.len())
}

/// VP8 frame tag: bit 0 of the first byte is 0 for a keyframe (RFC 6386 §9.1).
pub fn is_vp8_keyframe(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x01 == 0)
}

/// Whether a decoder can start at this (plaintext) frame: a VP8/VP9 keyframe, an H.264 access
/// unit with an IDR slice or a sequence parameter set, an AV1 temporal unit with a sequence
/// header OBU (libaom and ffmpeg repeat it on every keyframe). Audio frames always are.
pub fn is_keyframe(codec: Codec, frame: &[u8]) -> bool {
    match codec {
        Codec::Vp8 => is_vp8_keyframe(frame),
        Codec::Vp9 => super::source::vp9_keyframe(frame),
        Codec::H264 => annexb_nals(frame)
            .iter()
            .any(|n| matches!(n.first().map(|h| h & 0x1f), Some(5 | 7))),
        Codec::Av1 => super::source::av1_has_sequence_header(frame),
        Codec::Opus => true,
    }
}

// ------------------------------------------------------------------ H.264

/// NAL unit types the sender leaves out. AUD (9) and filler (12) are dropped by the RTP
/// payloader anyway; 0 and 24..=31 are unspecified in H.264 and RTP reuses them for
/// aggregation and fragmentation packets, so the depacketizer would misread them.
fn h264_carried(nal_type: u8) -> bool {
    !matches!(nal_type, 0 | 9 | 12 | 24..=31)
}

/// Terminates every protected NAL payload, like `rbsp_stop_one_bit`: the payload then never
/// ends in a zero byte (which the next start code would swallow) and is never empty (the
/// depacketizer rejects a NAL unit of one byte).
const NAL_TERMINATOR: u8 = 0x80;

/// NAL units of an Annex-B byte stream, without start codes. Trailing zero bytes belong to the
/// next (4-byte) start code or are `trailing_zero_8bits`, so they are trimmed. Bytes before
/// the first start code are ignored (as the payloader does), and a buffer without any start
/// code is one NAL unit.
pub(crate) fn annexb_nals(b: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new(); // (start code position, first byte after it)
    let mut i = 0;
    while i + 3 <= b.len() {
        if b[i] == 0 && b[i + 1] == 0 && b[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    if starts.is_empty() {
        return if b.is_empty() { Vec::new() } else { vec![b] };
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &(_, body)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(b.len(), |&(s, _)| s);
        let mut nal = &b[body..end];
        while let [rest @ .., 0] = nal {
            nal = rest;
        }
        if !nal.is_empty() {
            out.push(nal);
        }
    }
    out
}

/// H.264 emulation prevention (ITU-T H.264 §7.4.1): after two zero bytes, a byte <= 3 is
/// preceded by 0x03, so the output never contains `00 00 00`, `00 00 01` or `00 00 02`, and
/// `00 00 03` only as an escape.
pub fn emulation_prevent(src: &[u8], out: &mut Vec<u8>) {
    let mut zeros = 0usize;
    for &b in src {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
}

/// Inverse of [`emulation_prevent`]. `None` if the input could not have come from it (a
/// forbidden `00 00 0x` sequence).
pub fn emulation_remove(src: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(src.len());
    let mut zeros = 0usize;
    for &b in src {
        if zeros >= 2 {
            if b == 3 {
                zeros = 0;
                continue;
            }
            if b < 3 {
                return None;
            }
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    Some(out)
}

/// A unit (NAL unit or OBU) split into its clear header and its payload.
struct Unit<'a> {
    /// Bytes authenticated and sent in clear (NAL header; OBU header and extension).
    header: Vec<u8>,
    payload: Cow<'a, [u8]>,
}

/// Associated data of a structured frame: the domain, a codec label, then for every unit its
/// clear header and payload length, so headers, order and boundaries are all authenticated.
fn structured_aad(label: &[u8], units: &[Unit<'_>], last_len: usize) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AD_MEDIA.len() + label.len() + units.len() * 8);
    aad.extend_from_slice(AD_MEDIA);
    aad.extend_from_slice(label);
    for (i, u) in units.iter().enumerate() {
        let len = if i + 1 == units.len() {
            last_len
        } else {
            u.payload.len()
        };
        aad.push(u.header.len() as u8);
        aad.extend_from_slice(&u.header);
        aad.extend_from_slice(&(len as u32).to_be_bytes());
    }
    aad
}

/// `bytes` cut the way `units` are: every unit's piece as long as its payload, the last piece
/// whatever remains (sealed, the last payload also carries tag and nonce; opened, it does not).
fn split_like<'b>(bytes: &'b [u8], units: &[Unit<'_>]) -> Vec<&'b [u8]> {
    let mut pieces = Vec::with_capacity(units.len());
    let mut at = 0;
    for (i, u) in units.iter().enumerate() {
        let end = if i + 1 == units.len() {
            bytes.len()
        } else {
            (at + u.payload.len()).min(bytes.len())
        };
        pieces.push(&bytes[at..end]);
        at = end;
    }
    pieces
}

impl MediaKey {
    /// One AEAD over the concatenated unit payloads; returns the ciphertext cut back into the
    /// units' lengths, the last one extended by tag and nonce.
    fn seal_units(&self, label: &[u8], units: &[Unit<'_>]) -> Result<Vec<Vec<u8>>, E2eeError> {
        let last_len = units.last().map_or(0, |u| u.payload.len());
        let aad = structured_aad(label, units, last_len);
        let mut msg = Vec::with_capacity(units.iter().map(|u| u.payload.len()).sum());
        for u in units {
            msg.extend_from_slice(&u.payload);
        }
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let ct = self
            .cipher
            .encrypt(
                &XNonce::from(nonce_bytes),
                Payload {
                    msg: &msg,
                    aad: &aad,
                },
            )
            .map_err(|_| E2eeError::Encrypt)?;
        let mut pieces: Vec<Vec<u8>> = split_like(&ct, units)
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        if let Some(last) = pieces.last_mut() {
            last.extend_from_slice(&nonce_bytes);
        }
        Ok(pieces)
    }

    /// Inverse of [`seal_units`](Self::seal_units): `units` carry the received pieces.
    fn open_units(&self, label: &[u8], units: &[Unit<'_>]) -> Result<Vec<u8>, E2eeError> {
        let Some(last) = units.last() else {
            return Err(E2eeError::Truncated(0));
        };
        if last.payload.len() < OVERHEAD {
            return Err(E2eeError::Truncated(last.payload.len()));
        }
        let last_len = last.payload.len() - OVERHEAD;
        let aad = structured_aad(label, units, last_len);
        let nonce_at = last.payload.len() - NONCE_LEN;
        let nonce_bytes: [u8; NONCE_LEN] = last.payload[nonce_at..]
            .try_into()
            .map_err(|_| E2eeError::Truncated(last.payload.len()))?;
        let mut ct = Vec::with_capacity(units.iter().map(|u| u.payload.len()).sum());
        for u in &units[..units.len() - 1] {
            ct.extend_from_slice(&u.payload);
        }
        ct.extend_from_slice(&last.payload[..nonce_at]);
        self.cipher
            .decrypt(
                &XNonce::from(nonce_bytes),
                Payload {
                    msg: &ct,
                    aad: &aad,
                },
            )
            .map_err(|_| E2eeError::Authentication)
    }

    fn encrypt_h264(&self, frame: &[u8]) -> Result<Bytes, E2eeError> {
        let units: Vec<Unit<'_>> = annexb_nals(frame)
            .into_iter()
            .filter(|n| n.len() > 1 && h264_carried(n[0] & 0x1f))
            .map(|n| Unit {
                // The F bit is masked: the FU-A depacketizer rebuilds the header without it.
                header: vec![n[0] & 0x7f],
                payload: Cow::Borrowed(&n[1..]),
            })
            .collect();
        if units.is_empty() {
            return Err(E2eeError::Malformed(Codec::H264, "no NAL unit to carry"));
        }
        let pieces = self.seal_units(b"/h264", &units)?;
        let mut out = Vec::with_capacity(frame.len() + OVERHEAD + units.len() * 8);
        for (u, piece) in units.iter().zip(&pieces) {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(&u.header);
            emulation_prevent(piece, &mut out);
            out.push(NAL_TERMINATOR);
        }
        Ok(Bytes::from(out))
    }

    fn decrypt_h264(&self, protected: &[u8]) -> Result<Bytes, E2eeError> {
        let malformed = || E2eeError::Malformed(Codec::H264, "not a protected access unit");
        let mut units = Vec::new();
        for nal in annexb_nals(protected) {
            let [h, body @ .., NAL_TERMINATOR] = nal else {
                return Err(malformed());
            };
            let payload = emulation_remove(body).ok_or_else(malformed)?;
            units.push(Unit {
                header: vec![h & 0x7f],
                payload: Cow::Owned(payload),
            });
        }
        let plain = self.open_units(b"/h264", &units)?;
        let mut out = Vec::with_capacity(plain.len() + units.len() * 5);
        for (u, piece) in units.iter().zip(split_like(&plain, &units)) {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(&u.header);
            out.extend_from_slice(piece);
        }
        Ok(Bytes::from(out))
    }

    fn encrypt_av1(&self, frame: &[u8]) -> Result<Bytes, E2eeError> {
        let units = av1_units(frame)?;
        if units.is_empty() {
            return Err(E2eeError::Malformed(Codec::Av1, "no OBU to carry"));
        }
        let pieces = self.seal_units(b"/av1", &units)?;
        let mut out = Vec::with_capacity(frame.len() + OVERHEAD + units.len() * 4);
        for (u, piece) in units.iter().zip(&pieces) {
            write_obu(&mut out, &u.header, piece);
        }
        Ok(Bytes::from(out))
    }

    fn decrypt_av1(&self, protected: &[u8]) -> Result<Bytes, E2eeError> {
        let units = av1_units(protected)?;
        let plain = self.open_units(b"/av1", &units)?;
        let mut out = Vec::with_capacity(plain.len() + 2 + units.len() * 4);
        // Every temporal unit starts with a temporal delimiter (AV1 §7.5); the payloader drops
        // it, so the receiver puts it back.
        out.extend_from_slice(&[OBU_TEMPORAL_DELIMITER << 3 | OBU_HAS_SIZE, 0]);
        for (u, piece) in units.iter().zip(split_like(&plain, &units)) {
            write_obu(&mut out, &u.header, piece);
        }
        Ok(Bytes::from(out))
    }
}

// ------------------------------------------------------------------ AV1

const OBU_TEMPORAL_DELIMITER: u8 = 2;
const OBU_HAS_SIZE: u8 = 0x02;
const OBU_HAS_EXTENSION: u8 = 0x04;
/// Largest OBU accepted (guards the leb128 size against absurd values).
const MAX_OBU: u64 = 1 << 26;

/// The OBUs of a temporal unit that RTP carries (in clear or protected alike).
fn av1_units(b: &[u8]) -> Result<Vec<Unit<'_>>, E2eeError> {
    Ok(parse_obus(b)
        .ok_or(E2eeError::Malformed(Codec::Av1, "bad OBU syntax"))?
        .into_iter()
        .filter(|u| av1_carried(u.header[0]))
        .collect())
}

/// OBU types the RTP payloader keeps (it drops temporal delimiters, tile lists and padding).
fn av1_carried(header: u8) -> bool {
    !matches!((header >> 3) & 0x0f, 2 | 8 | 15)
}

/// OBUs of a temporal unit in the low-overhead format (AV1 §5.3). The header kept in clear is
/// the OBU header with `obu_has_size_field` set (as the depacketizer always rebuilds it) plus
/// the extension byte. `None` on any syntax error.
fn parse_obus(b: &[u8]) -> Option<Vec<Unit<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if out.len() >= 4096 {
            return None;
        }
        let h = b[i];
        if h & 0x80 != 0 {
            return None; // obu_forbidden_bit
        }
        let mut header = vec![h | OBU_HAS_SIZE];
        i += 1;
        if h & OBU_HAS_EXTENSION != 0 {
            header.push(*b.get(i)?);
            i += 1;
        }
        let size = if h & OBU_HAS_SIZE != 0 {
            let (v, n) = read_leb128(&b[i..])?;
            i += n;
            if v > MAX_OBU {
                return None;
            }
            v as usize
        } else {
            b.len() - i
        };
        let end = i.checked_add(size).filter(|&e| e <= b.len())?;
        out.push(Unit {
            header,
            payload: Cow::Borrowed(&b[i..end]),
        });
        i = end;
    }
    Some(out)
}

/// leb128 value and its length (at most 8 bytes, AV1 §4.10.5).
fn read_leb128(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (k, &byte) in b.iter().take(8).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * k);
        if byte & 0x80 == 0 {
            return Some((v, k + 1));
        }
    }
    None
}

fn write_obu(out: &mut Vec<u8>, header: &[u8], payload: &[u8]) {
    out.extend_from_slice(header);
    let mut v = payload.len() as u64;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let k = MediaKey::new([7; 32]);
        let frame: Vec<u8> = (0..200u8).map(|i| i & 0xfe).collect(); // keyframe (bit0 = 0)
        let p = k.encrypt_frame(Codec::Vp8, &frame).unwrap();
        assert_eq!(&p[..10], &frame[..10], "VP8 keyframe header stays clear");
        assert_ne!(&p[10..200], &frame[10..]);
        assert_eq!(p.len(), frame.len() + OVERHEAD);
        assert_eq!(&k.decrypt_frame(Codec::Vp8, &p).unwrap()[..], &frame[..]);
        let other = MediaKey::new([8; 32]);
        assert_eq!(
            other.decrypt_frame(Codec::Vp8, &p),
            Err(E2eeError::Authentication)
        );
        // A flipped clear header byte is detected (it is associated data).
        let mut t = p.to_vec();
        t[5] ^= 1;
        assert_eq!(
            k.decrypt_frame(Codec::Vp8, &t),
            Err(E2eeError::Authentication)
        );
        assert!(matches!(
            k.decrypt_frame(Codec::Vp8, &[0; 5]),
            Err(E2eeError::Truncated(5))
        ));
    }

    #[test]
    fn opus_and_data_domains() {
        let k = MediaKey::new([1; 32]);
        let p = k.encrypt_frame(Codec::Opus, b"\xfcabc").unwrap();
        assert_eq!(p[0], 0xfc);
        assert_eq!(&k.decrypt_frame(Codec::Opus, &p).unwrap()[..], b"\xfcabc");
        let d = k.encrypt_data(b"hello").unwrap();
        assert_eq!(&k.decrypt_data(&d).unwrap()[..], b"hello");
        assert_eq!(
            k.decrypt_frame(Codec::Vp9, &d),
            Err(E2eeError::Authentication)
        );
        let delta = [0x01u8, 2, 3, 4, 5];
        let p = k.encrypt_frame(Codec::Vp8, &delta).unwrap();
        assert_eq!(&p[..3], &delta[..3]);
        assert_eq!(&k.decrypt_frame(Codec::Vp8, &p).unwrap()[..], &delta);
    }

    fn fixture(name: &str) -> Vec<crate::media::source::Sample> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        crate::media::source::read_all_frames(p).expect("fixture reads")
    }

    /// Round trip of every fixture frame, plus the codec-specific layout checks.
    fn round_trip_fixture(name: &str, codec: Codec) {
        let k = MediaKey::new([3; 32]);
        let wrong = MediaKey::new([4; 32]);
        let frames = fixture(name);
        assert!(frames.len() >= 30, "{name}: {} frames", frames.len());
        for (i, f) in frames.iter().enumerate() {
            let p = k.encrypt_frame(codec, &f.data).unwrap();
            let back = k.decrypt_frame(codec, &p).unwrap();
            assert_eq!(back, f.data, "{name} frame {i}");
            assert_eq!(is_keyframe(codec, &back), f.keyframe, "{name} frame {i}");
            assert_eq!(
                wrong.decrypt_frame(codec, &p),
                Err(E2eeError::Authentication),
                "{name} frame {i}"
            );
        }
    }

    #[test]
    fn h264_fixture_round_trip_and_layout() {
        round_trip_fixture("f.h264", Codec::H264);
        let k = MediaKey::new([3; 32]);
        let frames = fixture("f.h264");
        let f = &frames[0];
        let p = k.encrypt_frame(Codec::H264, &f.data).unwrap();
        let (src, enc) = (annexb_nals(&f.data), annexb_nals(&p));
        assert_eq!(src.len(), enc.len(), "one protected NAL unit per NAL unit");
        for (a, b) in src.iter().zip(&enc) {
            assert_eq!(a[0], b[0], "NAL header in clear");
            assert_eq!(*b.last().unwrap(), NAL_TERMINATOR);
            assert!(
                !b[1..]
                    .windows(3)
                    .any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 2)
            );
        }
        // SPS payload is not readable in the protected frame.
        assert_ne!(&enc[0][1..src[0].len()], &src[0][1..]);
        // Tampering with a clear NAL header is detected.
        let mut t = p.to_vec();
        t[4] ^= 0x20; // nal_ref_idc of the SPS
        assert_eq!(
            k.decrypt_frame(Codec::H264, &t),
            Err(E2eeError::Authentication)
        );
        // Dropping a NAL unit (cutting the frame at a start code) is detected.
        let cut = p.len() - enc.last().unwrap().len() - 4;
        assert!(k.decrypt_frame(Codec::H264, &p[..cut]).is_err());
    }

    #[test]
    fn h264_drops_what_rtp_cannot_carry() {
        let k = MediaKey::new([3; 32]);
        // AUD, filler, an empty NAL unit, then a slice whose payload is full of zeros.
        let mut f = vec![0, 0, 0, 1, 0x09, 0xf0, 0, 0, 1, 0x0c, 0xff, 0, 0, 0, 1];
        // (An encoder's NAL payloads are escaped themselves, so the slice holds no start code.)
        let mut slice = vec![0x65u8];
        emulation_prevent(&[0x88, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 3], &mut slice);
        slice.push(0x80);
        f.extend_from_slice(&[0, 0, 0, 1]);
        f.extend_from_slice(&slice);
        let p = k.encrypt_frame(Codec::H264, &f).unwrap();
        assert_eq!(annexb_nals(&p).len(), 1);
        let back = k.decrypt_frame(Codec::H264, &p).unwrap();
        let mut want = vec![0, 0, 0, 1];
        want.extend_from_slice(&slice);
        assert_eq!(&back[..], &want[..]);
        assert!(is_keyframe(Codec::H264, &back), "IDR slice");
        assert!(matches!(
            k.encrypt_frame(Codec::H264, &[0, 0, 0, 1, 0x09, 0xf0]),
            Err(E2eeError::Malformed(Codec::H264, _))
        ));
        // Garbage in place of a protected frame is an error, never a panic.
        for junk in [
            &[][..],
            &[0, 0, 1],
            &[0, 0, 1, 0x65, 0, 0, 0],
            &[0x65, 1, 2, 0x80],
        ] {
            assert!(k.decrypt_frame(Codec::H264, junk).is_err());
        }
    }

    #[test]
    fn vp9_fixture_round_trip_and_clear_prefix() {
        round_trip_fixture("f_vp9.ivf", Codec::Vp9);
        let k = MediaKey::new([3; 32]);
        let frames = fixture("f_vp9.ivf");
        let key = frames.iter().find(|f| f.keyframe).unwrap();
        let p = k.encrypt_frame(Codec::Vp9, &key.data).unwrap();
        assert_eq!(&p[..10], &key.data[..10], "keyframe header in clear");
        assert_eq!(
            crate::media::sink::vp9_keyframe_size(&p),
            Some((160, 120)),
            "size readable without the key"
        );
        let delta = frames.iter().find(|f| !f.keyframe).unwrap();
        let p = k.encrypt_frame(Codec::Vp9, &delta.data).unwrap();
        assert_eq!(p[0], delta.data[0]);
        assert_ne!(&p[1..8], &delta.data[1..8]);
    }

    #[test]
    fn av1_fixture_round_trip_and_layout() {
        round_trip_fixture("f_av1.ivf", Codec::Av1);
        let k = MediaKey::new([3; 32]);
        let frames = fixture("f_av1.ivf");
        let f = &frames[0];
        let p = k.encrypt_frame(Codec::Av1, &f.data).unwrap();
        let src: Vec<_> = parse_obus(&f.data)
            .unwrap()
            .into_iter()
            .filter(|u| av1_carried(u.header[0]))
            .collect();
        let enc = parse_obus(&p).unwrap();
        assert_eq!(
            src.len(),
            enc.len(),
            "temporal delimiter dropped, rest kept"
        );
        for (a, b) in src.iter().zip(&enc) {
            assert_eq!(a.header, b.header, "OBU header in clear");
        }
        assert_eq!(
            enc.iter().map(|u| u.payload.len()).sum::<usize>(),
            src.iter().map(|u| u.payload.len()).sum::<usize>() + OVERHEAD
        );
        let mut t = p.to_vec();
        t[0] ^= 0x01; // reserved bit of the first clear OBU header
        assert_eq!(
            k.decrypt_frame(Codec::Av1, &t),
            Err(E2eeError::Authentication)
        );
        for junk in [&[][..], &[0x80], &[0x32, 0x05, 1], &[0x32, 0xff, 0xff]] {
            assert!(k.decrypt_frame(Codec::Av1, junk).is_err());
        }
    }

    proptest::proptest! {
        /// Emulation prevention is reversible and leaves no start code, for payloads rich in
        /// the bytes that matter (0..=3).
        #[test]
        fn emulation_prevention_round_trip(
            data in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => proptest::prelude::Just(0u8),
                    1 => 1u8..=3,
                    1 => proptest::prelude::any::<u8>()
                ],
                0..400,
            )
        ) {
            let mut esc = Vec::new();
            emulation_prevent(&data, &mut esc);
            esc.push(NAL_TERMINATOR);
            proptest::prop_assert!(
                !esc.windows(3).any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 2),
                "no start code or forbidden sequence"
            );
            // Inside an Annex-B stream it stays exactly one NAL unit.
            let mut stream = vec![0, 0, 0, 1, 0x41];
            stream.extend_from_slice(&esc);
            let nals = annexb_nals(&stream);
            proptest::prop_assert_eq!(nals.len(), 1);
            proptest::prop_assert_eq!(nals[0].len(), esc.len() + 1);
            let back = emulation_remove(&esc[..esc.len() - 1]).unwrap();
            proptest::prop_assert_eq!(back, data);
        }

        /// Random NAL payloads with many zeros survive encryption and decryption.
        #[test]
        fn h264_random_nal_round_trip(
            nals in proptest::collection::vec(
                (1u8..=23, proptest::collection::vec(
                    proptest::prop_oneof![3 => proptest::prelude::Just(0u8), 1 => proptest::prelude::any::<u8>()],
                    1..200,
                )),
                1..6,
            )
        ) {
            let k = MediaKey::new([9; 32]);
            let mut frame = Vec::new();
            for (t, body) in &nals {
                if matches!(t, 9 | 12) { continue; }
                // An H.264 encoder's own NAL payloads are escaped and end in a non-zero byte.
                frame.extend_from_slice(&[0, 0, 0, 1, 0x60 | t]);
                emulation_prevent(body, &mut frame);
                frame.push(0x80);
            }
            proptest::prop_assume!(!frame.is_empty());
            let p = k.encrypt_frame(Codec::H264, &frame).unwrap();
            let back = k.decrypt_frame(Codec::H264, &p).unwrap();
            proptest::prop_assert_eq!(&back[..], &frame[..]);
        }
    }
}
