//! End-to-end frame encryption.
//!
//! Modelled on WebRTC insertable-streams E2EE (the "SFrame-lite" scheme of the Chrome sample):
//! each encoded frame is encrypted *before* RTP packetization, so every relay forwards ciphertext
//! it cannot read, and only holders of the 32-byte media key (derived from the room password by
//! the crypto module) can decode. The first bytes of a frame stay in clear because the
//! packetizer and the receivers' keyframe detection need them: VP8 keyframe 10 bytes (frame tag +
//! start code + dimensions), VP8 delta frame 3 bytes, Opus 1 byte (the TOC). Those clear bytes
//! are authenticated as associated data, so tampering with them is detected too.
//!
//! Layout of a protected frame:
//!
//! ```text
//! clear header | ciphertext | 16-byte Poly1305 tag | 24-byte XChaCha20 nonce
//! ```
//!
//! The nonce is random per frame (192 bits: collisions are negligible without any counter
//! state, which matters because a relay tree has no single writer to coordinate with).
//! Data-channel messages use the same construction with no clear header and a domain-separating
//! associated-data prefix, so a media frame cannot be replayed as a data message or vice versa.

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
        let clear = clear_len(codec, frame);
        self.seal(AD_MEDIA, &frame[..clear], &frame[clear..])
    }

    /// Decrypts one protected frame. A wrong key yields [`E2eeError::Authentication`] and no
    /// bytes at all, so nothing undecodable ever reaches a file.
    pub fn decrypt_frame(&self, codec: Codec, protected: &[u8]) -> Result<Bytes, E2eeError> {
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

/// How many leading bytes of a frame stay in clear.
pub fn clear_len(codec: Codec, frame: &[u8]) -> usize {
    let want = match codec {
        Codec::Vp8 => {
            if is_vp8_keyframe(frame) {
                10
            } else {
                3
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
}
