//! Identity, room keys, sealing and signed envelopes.
//!
//! # Node identity
//! One ed25519 key is both the libp2p identity (the peer id is derived from it) and the key that
//! signs waterfall envelopes, so a record's signer can be checked against the peer that published
//! it. The 32-byte secret lives in `<data dir>/identity.key`, created on first run with mode 0600.
//!
//! # Room keys
//! ```text
//! salt        = SHA-256("waterfall/v1/room" || room_name)            (public, per room)
//! room_secret = Argon2id(password, salt)                             (slow on purpose)
//! locator     = HKDF-SHA256(room_secret, info = "waterfall/v1/locator")  DHT key of the record
//! topic       = HKDF-SHA256(room_secret, info = "waterfall/v1/topic")    gossipsub topic name
//! seal        = HKDF-SHA256(room_secret, info = "waterfall/v1/seal")     records, blobs, gossip
//! media       = HKDF-SHA256(room_secret, info = "waterfall/v1/media")    per-frame media E2EE
//! ```
//! Knowing the room name is not enough to find the room: the locator needs the password, so a DHT
//! node that stores a record learns neither the name nor the contents. A room without a password
//! is *public*: it derives its keys from the empty password and [`RoomKeys::is_public`] says so,
//! because anyone who knows the name can then read it.
//!
//! # Sealing
//! XChaCha20-Poly1305 with a fresh random 24-byte nonce per message (random nonces are safe at
//! this size). The associated data binds the message kind and the room locator, so a sealed tree
//! update cannot be replayed as a signalling blob, nor a record of one room into another.
//!
//! # Envelopes
//! An [`Envelope`] carries (signer public key, kind, sequence, expiry, payload) and an ed25519
//! signature over a domain-separated encoding of those fields and of the protocol [`VERSION`].
//! Verification checks the signature with `verify_strict` (rejects small-order keys and
//! malleable signatures) and the expiry against a caller-supplied clock.
//!
//! # Dependencies
//! This module sits below [`crate::wire`]: the envelope is the outermost layer of every message,
//! so it owns the version byte it signs, and `wire` re-exports [`Envelope`], [`Kind`] and
//! [`VERSION`] with the messages it encodes. Node identities are [`NodeId`]s (the 32 bytes of
//! the ed25519 public key); their libp2p form is made only at the network boundary
//! ([`crate::net::peer_of`], [`crate::net::node_of`]), apart from the node's own keypair.

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::proto::NodeId;

/// The protocol version this build speaks: the `v` field of every message and signed into every
/// envelope (a peer of another version fails to verify rather than misreading).
pub const VERSION: u8 = 1;

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// Decryption failed: wrong key, tampered ciphertext or wrong associated data.
    #[error("cannot open sealed data: wrong password or key, or the data was tampered with")]
    Open,
    /// A sealed blob shorter than nonce + tag.
    #[error("sealed data too short ({0} bytes)")]
    Truncated(usize),
    /// The signature does not verify for the claimed signer.
    #[error("bad signature")]
    BadSignature,
    /// The signer's public key is not a valid ed25519 point.
    #[error("invalid signer public key")]
    BadSigner,
    /// The envelope's expiry is in the past.
    #[error("envelope expired at {expires_ms} ms (now {now_ms} ms)")]
    Expired { expires_ms: u64, now_ms: u64 },
    /// The envelope is of another kind than expected.
    #[error("unexpected envelope kind {found:?}, expected {expected:?}")]
    WrongKind { expected: Kind, found: Kind },
    /// The key derivation parameters were rejected.
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// Reading or writing the identity file failed.
    #[error("identity file {path}: {source}")]
    IdentityIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The identity file does not hold a 32-byte key.
    #[error("identity file {0} is corrupt (expected 32 bytes)")]
    IdentityCorrupt(String),
    /// The identity file can be read or written by other users than its owner: the key may
    /// have leaked (or been replaced), so it is not used.
    #[error(
        "identity file {path} has mode {mode:o}, readable or writable by others: check who had \
         access, then `chmod 600 {path}` (or remove it for a new identity)"
    )]
    IdentityExposed { path: String, mode: u32 },
    /// Encoding the signed bytes failed (cannot happen for well-formed values).
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// Milliseconds since the Unix epoch, the clock every expiry in waterfall uses.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fill a buffer from the operating system's CSPRNG (through rand's thread RNG).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// The node's ed25519 identity: signs envelopes and is the libp2p identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret: only the public half.
        write!(f, "Identity({})", self.peer_id())
    }
}

const IDENTITY_FILE: &str = "identity.key";

impl Identity {
    /// A fresh random identity (not persisted).
    pub fn generate() -> Self {
        let secret = Zeroizing::new(random_bytes::<32>());
        Self {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// An identity from a 32-byte secret.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(secret),
        }
    }

    /// Load `<dir>/identity.key`, creating it (mode 0600, and the directory) on first run.
    pub fn load_or_create(dir: &Path) -> Result<Self, CryptoError> {
        let path = dir.join(IDENTITY_FILE);
        let io = |source| CryptoError::IdentityIo {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                check_private(&path)?;
                let bytes = Zeroizing::new(bytes);
                let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| CryptoError::IdentityCorrupt(path.display().to_string()))?,
                );
                Ok(Self::from_secret(&secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io)?;
                let id = Self::generate();
                let secret = Zeroizing::new(id.key.to_bytes());
                write_private(&path, secret.as_slice()).map_err(io)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The node id: the ed25519 public key.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    /// The same key as a libp2p keypair.
    pub fn to_libp2p(&self) -> libp2p::identity::Keypair {
        let mut secret = Zeroizing::new(self.key.to_bytes());
        libp2p::identity::Keypair::ed25519_from_bytes(secret.as_mut_slice())
            .expect("a 32-byte ed25519 secret is always a valid libp2p key")
    }

    /// The libp2p peer id of this identity.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.to_libp2p().public().to_peer_id()
    }

    /// Sign a payload into an envelope.
    pub fn seal_envelope(
        &self,
        kind: Kind,
        seq: u64,
        expires_ms: u64,
        payload: Vec<u8>,
    ) -> Envelope {
        let signer = self.node_id();
        let msg = signed_bytes(kind, &signer, seq, expires_ms, &payload);
        let sig = self.key.sign(&msg);
        Envelope {
            v: VERSION,
            signer,
            kind,
            seq,
            expires_ms,
            payload,
            sig: sig.to_bytes(),
        }
    }
}

/// The identity file must be its owner's alone (as ssh demands of private keys).
#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), CryptoError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| CryptoError::IdentityIo {
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CryptoError::IdentityExposed {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path) -> Result<(), CryptoError> {
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

// ---------------------------------------------------------------------------------------------
// Room keys
// ---------------------------------------------------------------------------------------------

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl KdfParams {
    /// The default: 46 MiB, 2 passes, 1 lane — OWASP's first Argon2id recommendation (46 MiB,
    /// 1 pass) with a second pass, so stronger than it.
    pub const STRONG: Self = Self {
        m_cost_kib: 47_104,
        t_cost: 2,
        p_cost: 1,
    };

    /// Cheap parameters for tests and the simulator only: never for real rooms.
    pub const TEST_ONLY: Self = Self {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::STRONG
    }
}

/// A 32-byte symmetric key, zeroized on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// The raw bytes (for the media layer's per-frame cipher).
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Every key of one room, derived from its name and password.
#[derive(Clone)]
pub struct RoomKeys {
    name: String,
    public: bool,
    locator: [u8; 32],
    topic: String,
    seal: SecretKey,
    media: SecretKey,
}

impl fmt::Debug for RoomKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomKeys")
            .field("name", &self.name)
            .field("public", &self.public)
            .field("locator", &hex::encode(&self.locator[..8]))
            .finish_non_exhaustive()
    }
}

/// The public per-room salt: SHA-256 over a domain tag and the room name.
pub fn room_salt(room_name: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"waterfall/v1/room");
    h.update(room_name.as_bytes());
    h.finalize().into()
}

impl RoomKeys {
    /// Derive the room keys. `password = None` (or empty) makes a public room.
    pub fn derive(
        room_name: &str,
        password: Option<&str>,
        params: KdfParams,
    ) -> Result<Self, CryptoError> {
        let password = password.unwrap_or("");
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(32))
                .map_err(|e| CryptoError::Kdf(e.to_string()))?,
        );
        let mut secret = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(password.as_bytes(), &room_salt(room_name), secret.as_mut())
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let hk = Hkdf::<Sha256>::new(Some(b"waterfall/v1/hkdf"), secret.as_ref());
        let expand = |info: &[u8]| {
            let mut out = [0u8; 32];
            hk.expand(info, &mut out)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            out
        };
        let locator = expand(b"waterfall/v1/locator");
        let topic_bytes = expand(b"waterfall/v1/topic");
        Ok(Self {
            name: room_name.to_owned(),
            public: password.is_empty(),
            locator,
            topic: format!("waterfall/room/{}", hex::encode(topic_bytes)),
            seal: SecretKey(expand(b"waterfall/v1/seal")),
            media: SecretKey(expand(b"waterfall/v1/media")),
        })
    }

    /// The room name as the user typed it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True for a room without a password: anyone who knows its name can read it.
    pub fn is_public(&self) -> bool {
        self.public
    }

    /// The DHT key of the room record.
    pub fn locator(&self) -> &[u8; 32] {
        &self.locator
    }

    /// A short public id of the room (first bytes of the locator), safe for logs and wire ids.
    pub fn room_id(&self) -> [u8; 32] {
        self.locator
    }

    /// The gossipsub topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The media key for per-frame end-to-end encryption.
    pub fn media_key(&self) -> &SecretKey {
        &self.media
    }

    /// A DHT key derived from the room and a purpose (e.g. signalling blobs).
    pub fn derived_key(&self, purpose: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"waterfall/v1/derived");
        h.update(self.locator);
        h.update((purpose.len() as u32).to_be_bytes());
        h.update(purpose);
        for p in parts {
            h.update((p.len() as u32).to_be_bytes());
            h.update(p);
        }
        h.finalize().into()
    }

    /// Encrypt `plaintext` for this room; `kind` is bound as associated data.
    pub fn seal(&self, kind: Kind, plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.seal, &self.aad(kind), plaintext)
    }

    /// Decrypt what [`RoomKeys::seal`] produced with the same kind.
    pub fn open(&self, kind: Kind, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.seal, &self.aad(kind), sealed)
    }

    fn aad(&self, kind: Kind) -> Vec<u8> {
        let mut aad = Vec::with_capacity(48);
        aad.extend_from_slice(b"waterfall/v1/seal");
        aad.push(kind as u8);
        aad.extend_from_slice(&self.locator);
        aad
    }
}

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// XChaCha20-Poly1305 seal: `nonce(24) || ciphertext || tag(16)`.
pub fn seal_with(key: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    let nonce_bytes = random_bytes::<NONCE_LEN>();
    let nonce = XNonce::from(nonce_bytes);
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&ct);
    out
}

/// Open what [`seal_with`] produced.
pub fn open_with(key: &SecretKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Truncated(sealed.len()));
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Open)
}

// ---------------------------------------------------------------------------------------------
// Envelopes
// ---------------------------------------------------------------------------------------------

/// What an envelope or sealed blob carries; bound into signatures and associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
#[repr(u8)]
#[non_exhaustive]
pub enum Kind {
    /// A room record (DHT).
    RoomRecord = 1,
    /// A tree update (gossip).
    TreeUpdate = 2,
    /// A WebRTC offer (DHT blob or inline).
    Offer = 3,
    /// A WebRTC answer (DHT blob or inline).
    Answer = 4,
    /// A signalling notice (gossip).
    Notice = 5,
    /// A tree control message between two peers.
    TreeControl = 6,
    /// A snapshot response.
    Snapshot = 7,
    /// An application data message.
    Data = 8,
    /// The broadcaster's notice that its broadcast is over (down the tree and on gossip).
    BroadcastEnd = 9,
}

impl TryFrom<u8> for Kind {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        Ok(match v {
            1 => Kind::RoomRecord,
            2 => Kind::TreeUpdate,
            3 => Kind::Offer,
            4 => Kind::Answer,
            5 => Kind::Notice,
            6 => Kind::TreeControl,
            7 => Kind::Snapshot,
            8 => Kind::Data,
            9 => Kind::BroadcastEnd,
            other => return Err(format!("unknown kind {other}")),
        })
    }
}

impl From<Kind> for u8 {
    fn from(k: Kind) -> u8 {
        k as u8
    }
}

/// A signed envelope: the unit stored in the DHT and published on gossip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Wire version.
    pub v: u8,
    /// The signer's ed25519 public key.
    pub signer: NodeId,
    /// What the payload is.
    pub kind: Kind,
    /// Monotonic per (signer, kind, key): a higher sequence replaces a lower one.
    pub seq: u64,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// The payload (usually sealed with the room's seal key).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// ed25519 signature over the domain tag, the version and every field above.
    #[serde(with = "serde_bytes")]
    pub sig: [u8; 64],
}

/// The exact bytes an envelope signature covers: a domain tag and every field but the signature.
fn signed_bytes(kind: Kind, signer: &NodeId, seq: u64, expires_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + payload.len());
    m.extend_from_slice(b"waterfall/v1/envelope\0");
    m.push(VERSION);
    m.push(kind as u8);
    m.extend_from_slice(&signer.0);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&expires_ms.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

impl Envelope {
    /// Check the signature and the expiry (at `now_ms`). Does not look inside the payload.
    pub fn verify(&self, now_ms: u64) -> Result<(), CryptoError> {
        let vk = VerifyingKey::from_bytes(&self.signer.0).map_err(|_| CryptoError::BadSigner)?;
        let msg = signed_bytes(
            self.kind,
            &self.signer,
            self.seq,
            self.expires_ms,
            &self.payload,
        );
        vk.verify_strict(&msg, &Signature::from_bytes(&self.sig))
            .map_err(|_| CryptoError::BadSignature)?;
        if self.expires_ms <= now_ms {
            return Err(CryptoError::Expired {
                expires_ms: self.expires_ms,
                now_ms,
            });
        }
        Ok(())
    }

    /// [`Envelope::verify`] plus a check of the kind.
    pub fn verify_kind(&self, kind: Kind, now_ms: u64) -> Result<(), CryptoError> {
        if self.kind != kind {
            return Err(CryptoError::WrongKind {
                expected: kind,
                found: self.kind,
            });
        }
        self.verify(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str, pw: &str) -> RoomKeys {
        RoomKeys::derive(name, Some(pw), KdfParams::TEST_ONLY).unwrap()
    }

    #[test]
    fn seal_open_round_trip_and_failures() {
        let k = keys("standup", "hunter2");
        let sealed = k.seal(Kind::RoomRecord, b"hello");
        assert_eq!(k.open(Kind::RoomRecord, &sealed).unwrap(), b"hello");
        // Wrong associated data (kind).
        assert!(matches!(
            k.open(Kind::Offer, &sealed),
            Err(CryptoError::Open)
        ));
        // Wrong key.
        let other = keys("standup", "hunter3");
        assert!(matches!(
            other.open(Kind::RoomRecord, &sealed),
            Err(CryptoError::Open)
        ));
        // Same password, other room: other locator in the AAD and other key.
        let other_room = keys("retro", "hunter2");
        assert!(other_room.open(Kind::RoomRecord, &sealed).is_err());
        // Tampered ciphertext, every byte position.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(k.open(Kind::RoomRecord, &t).is_err(), "byte {i}");
        }
        assert!(matches!(
            k.open(Kind::RoomRecord, &sealed[..10]),
            Err(CryptoError::Truncated(10))
        ));
        // Random nonces: sealing twice differs.
        assert_ne!(sealed, k.seal(Kind::RoomRecord, b"hello"));
    }

    #[test]
    fn wrong_password_derives_other_locator() {
        let a = keys("standup", "right");
        let b = keys("standup", "wrong");
        assert_ne!(a.locator(), b.locator());
        assert_ne!(a.topic(), b.topic());
        assert_ne!(a.media_key(), b.media_key());
        assert!(!a.is_public());
        let p = RoomKeys::derive("lobby", None, KdfParams::TEST_ONLY).unwrap();
        assert!(p.is_public());
        // Deterministic.
        assert_eq!(a.locator(), keys("standup", "right").locator());
    }

    #[test]
    fn envelope_verifies_and_rejects_tampering() {
        let id = Identity::generate();
        let now = 1_000_000;
        let env = id.seal_envelope(Kind::TreeUpdate, 7, now + 60_000, b"payload".to_vec());
        env.verify(now).unwrap();
        env.verify_kind(Kind::TreeUpdate, now).unwrap();
        assert!(matches!(
            env.verify_kind(Kind::RoomRecord, now),
            Err(CryptoError::WrongKind { .. })
        ));
        let mut t = env.clone();
        t.payload[0] ^= 1;
        assert!(matches!(t.verify(now), Err(CryptoError::BadSignature)));
        let mut t = env.clone();
        t.sig[5] ^= 1;
        assert!(matches!(t.verify(now), Err(CryptoError::BadSignature)));
        let mut t = env.clone();
        t.seq += 1;
        assert!(matches!(t.verify(now), Err(CryptoError::BadSignature)));
        let mut t = env.clone();
        t.expires_ms += 1;
        assert!(matches!(t.verify(now), Err(CryptoError::BadSignature)));
        let mut t = env.clone();
        t.signer = Identity::generate().node_id();
        assert!(t.verify(now).is_err());
        assert!(matches!(
            env.verify(now + 60_000),
            Err(CryptoError::Expired { .. })
        ));
    }

    #[test]
    fn identity_persists_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        assert_eq!(a.peer_id(), a.to_libp2p().public().to_peer_id());
        assert_eq!(crate::net::node_of(&a.peer_id()), Some(a.node_id()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(IDENTITY_FILE);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                Identity::load_or_create(dir.path()),
                Err(CryptoError::IdentityExposed { mode: 0o644, .. })
            ));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(dir.path().join(IDENTITY_FILE), b"short").unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(CryptoError::IdentityCorrupt(_))
        ));
    }

    #[test]
    fn secrets_do_not_leak_in_debug() {
        let k = keys("standup", "hunter2");
        let dbg = format!("{k:?} {:?}", k.media_key());
        assert!(!dbg.contains(&hex::encode(k.media_key().expose())));
        assert!(dbg.contains("redacted") || !dbg.contains("media"));
        let id = Identity::generate();
        let secret_hex = hex::encode(id.key.to_bytes());
        assert!(!format!("{id:?}").contains(&secret_hex));
    }

    #[test]
    fn libp2p_signature_matches_dalek() {
        // One key serves both: a signature made through libp2p verifies with ed25519-dalek.
        let id = Identity::generate();
        let sig = id.to_libp2p().sign(b"msg").unwrap();
        let vk = VerifyingKey::from_bytes(&id.node_id().0).unwrap();
        let sig: [u8; 64] = sig.as_slice().try_into().unwrap();
        vk.verify_strict(b"msg", &Signature::from_bytes(&sig))
            .unwrap();
    }
}
