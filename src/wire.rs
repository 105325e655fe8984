//! Every message waterfall puts on the wire, and strict decoding.
//!
//! Encoding is CBOR (RFC 8949) through serde + ciborium; `proto/waterfall.cddl` is the schema and
//! `proto/vectors/*.hex` hold golden encodings that the tests decode and re-encode byte for byte.
//! Structs encode as CBOR maps with text keys in declaration order, identifiers (32-byte ed25519
//! public keys, room locators, DHT keys) as byte strings of exactly 32 bytes.
//!
//! # One schema
//! The messages the tree state machine reasons about *are* the messages on the wire: a
//! [`TreeMsg`](crate::proto::TreeMsg) travels inside a [`Control`], a [`TreeUpdate`] is the payload
//! of a tree-update envelope ([`Versioned`] puts the version field in front of it), the
//! candidates of a [`SnapshotResponse`] are the tree's [`SlotAd`]s, and every peer is a
//! [`NodeId`]. There is no second copy of these types and nothing to convert.
//!
//! Decoding is defensive, since every byte here may come from a hostile peer:
//! 1. the input length is checked against the message type's limit *before* parsing;
//! 2. the parser's scratch buffer is sized to that limit, so a declared byte or text string longer
//!    than the limit is an error rather than an allocation, and nesting is bounded by ciborium's
//!    recursion limit;
//! 3. the `v` field is read first: an unknown version is [`WireError::UnknownVersion`], distinct
//!    from a malformed message;
//! 4. trailing bytes after the message are rejected.
//!
//! The one binary (non-CBOR) format is the media frame trailer [`FrameHeader`], which rides in every
//! RTP frame and so is fixed-size.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::crypto::{Envelope, Kind, VERSION};
pub use crate::proto::{NodeId, SlotAd, TreeUpdate};

/// Errors of decoding (and, rarely, encoding).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Input longer than the message type allows; rejected before parsing.
    #[error("{what}: {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// Empty input.
    #[error("{0}: empty input")]
    Empty(&'static str),
    /// A version this build does not speak.
    #[error("{what}: unknown wire version {found} (this build speaks {VERSION})")]
    UnknownVersion { what: &'static str, found: u64 },
    /// Not a well-formed message of this type.
    #[error("{what}: malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// Bytes left after a complete message.
    #[error("{what}: {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
}

/// A message type with a name and a size limit.
pub trait Message: Serialize + DeserializeOwned {
    /// Name used in errors.
    const NAME: &'static str;
    /// Largest encoding accepted.
    const MAX_LEN: usize;
}

/// Implements [`Message`] for each type of the table.
macro_rules! messages {
    ($($ty:ty => $name:literal, $max:expr;)*) => {
        $(impl Message for $ty {
            const NAME: &'static str = $name;
            const MAX_LEN: usize = $max;
        })*
    };
}

// Every top-level message, its name in errors and its largest accepted encoding, in one table:
// the limits are read side by side, and a new message is one row. A tree update is the tree's
// own `TreeUpdate` with the version in front ([`Versioned`]), its `ts_ms` in wall-clock ms since
// the Unix epoch, set by the node when it signs.
messages! {
    Envelope => "envelope", 16 * 1024;
    RoomRecord => "room record", 8 * 1024;
    Versioned<TreeUpdate> => "tree update", 8 * 1024;
    SnapshotRequest => "snapshot request", 256;
    SnapshotResponse => "snapshot response", 16 * 1024;
    Control => "tree control", 16 * 1024;
    RoomRequest => "room request", 20 * 1024;
    RoomResponse => "room response", 24 * 1024;
    Signal => "signal", 12 * 1024;
    Notice => "notice", 1024;
    BroadcastEnd => "broadcast end", 256;
    Ticket => "ticket", 4 * 1024;
}

/// Encode a message (infallible for the types in this module).
pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    ciborium::into_writer(msg, &mut out).expect("writing CBOR into a Vec cannot fail");
    out
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<u64>,
}

/// Decode a message strictly (see the module docs).
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.is_empty() {
        return Err(WireError::Empty(T::NAME));
    }
    if bytes.len() > T::MAX_LEN {
        return Err(WireError::TooLarge {
            what: T::NAME,
            len: bytes.len(),
            max: T::MAX_LEN,
        });
    }
    let malformed = |e: &dyn fmt::Display| WireError::Malformed {
        what: T::NAME,
        reason: e.to_string(),
    };
    let mut scratch = vec![0u8; T::MAX_LEN.min(64 * 1024)];
    let probe: VersionProbe =
        ciborium::de::from_reader_with_buffer(bytes, &mut scratch).map_err(|e| malformed(&e))?;
    match probe.v {
        Some(v) if v == u64::from(VERSION) => {}
        Some(found) => {
            return Err(WireError::UnknownVersion {
                what: T::NAME,
                found,
            });
        }
        None => return Err(malformed(&"missing version field `v`")),
    }
    let mut rest = bytes;
    let msg: T = ciborium::de::from_reader_with_buffer(&mut rest, &mut scratch)
        .map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing {
            what: T::NAME,
            extra: rest.len(),
        });
    }
    Ok(msg)
}

/// A room's public id: its locator (the DHT key of its record), CBOR bytes of exactly 32.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RoomId(pub [u8; 32]);

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..6]))
    }
}

impl Serialize for RoomId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_bytes(d).map(RoomId)
    }
}

/// A CBOR byte string of exactly `N` bytes, read without an intermediate allocation.
fn fixed_bytes<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    struct V<const N: usize>;
    impl<const N: usize> serde::de::Visitor<'_> for V<N> {
        type Value = [u8; N];
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{N} bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<[u8; N], E> {
            b.try_into().map_err(|_| E::invalid_length(b.len(), &self))
        }
    }
    d.deserialize_bytes(V::<N>)
}

/// A 16-byte nonce naming one signalling exchange.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Nonce16(pub [u8; 16]);

impl Serialize for Nonce16 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Nonce16 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fixed_bytes(d).map(Nonce16)
    }
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// What kind of media a track carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    /// Video (VP8, VP9, AV1, H.264).
    Video,
    /// Audio (Opus).
    Audio,
}

/// One track of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// Video or audio.
    pub kind: TrackKind,
    /// MIME type, e.g. `video/VP8`, `audio/opus`.
    pub codec: String,
    /// RTP clock rate.
    pub clock_rate: u32,
}

/// The room record: sealed with the room's seal key, signed by the broadcaster, stored in the
/// waterfall DHT under the room's locator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    /// Wire version.
    pub v: u8,
    /// The broadcaster (its peer id derives from it).
    pub broadcaster: NodeId,
    /// Multiaddrs where the broadcaster listens.
    pub addrs: Vec<String>,
    /// Media tracks.
    pub tracks: Vec<TrackInfo>,
    /// Whether a data channel runs beside the media.
    pub data: bool,
    /// Children per relay the room aims for.
    pub fanout: u16,
    /// Stream bitrate in kbit/s, for capacity = uplink / bitrate.
    pub bitrate_kbps: u32,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Expiry, ms since the Unix epoch (republished while live).
    pub expires_ms: u64,
    /// Sequence: a newer record from the same broadcaster has a higher one.
    pub seq: u64,
}

/// A message of the core ([`crate::proto`]) as a top-level message: its own CBOR map with the
/// version field `v` in front, the way every top-level message begins. Nested in another message
/// (a [`TreeUpdate`] inside an Accept) the same type goes without it.
///
/// Encoding goes through a [`ciborium::Value`] map, so the bytes are those of a struct whose first
/// field is `v` (definite-length map, text keys in declaration order); decoding takes `v` out
/// (exactly once; [`decode`] has checked its value) and reads the rest as `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T>(pub T);

impl<T: Serialize> Serialize for Versioned<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let ciborium::Value::Map(fields) =
            ciborium::Value::serialized(&self.0).map_err(S::Error::custom)?
        else {
            return Err(S::Error::custom("a versioned message must be a struct"));
        };
        let mut m = s.serialize_map(Some(fields.len() + 1))?;
        m.serialize_entry("v", &VERSION)?;
        for (k, v) in &fields {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Versioned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let ciborium::Value::Map(mut fields) = ciborium::Value::deserialize(d)? else {
            return Err(D::Error::custom("expected a map"));
        };
        let is_v = |k: &ciborium::Value| k.as_text() == Some("v");
        if fields.iter().filter(|(k, _)| is_v(k)).count() != 1 {
            return Err(D::Error::custom("expected exactly one version field `v`"));
        }
        fields.retain(|(k, _)| !is_v(k));
        ciborium::Value::Map(fields)
            .deserialized()
            .map(Versioned)
            .map_err(D::Error::custom)
    }
}

/// A newcomer asks a member for join candidates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Wire version.
    pub v: u8,
    /// The room (its locator).
    pub room: RoomId,
    /// Entries wanted at most.
    pub max: u16,
}

/// Join candidates near the top with free slots, shallowest first. The responder is a room
/// member (the response is sealed with the room key and signed); a candidate that turns out to be
/// full simply refuses, so a stale or wrong entry costs one round trip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResponse {
    /// Wire version.
    pub v: u8,
    /// The room.
    pub room: RoomId,
    /// Candidate parents: free slots, `peer` at `depth` takes `free` more children.
    pub candidates: Vec<SlotAd>,
}

/// A tree control message between two members (join, accept, refuse, leave, summary,
/// directory, relocate): the sealed payload of a [`Kind::TreeControl`] envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Wire version.
    pub v: u8,
    /// The room.
    pub room: RoomId,
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// The state machine's message.
    pub msg: crate::proto::TreeMsg,
}

/// A direct request between members: the room in clear (to route it), the rest in a signed
/// envelope whose kind says what it carries: a sealed [`SnapshotRequest`], [`Control`],
/// [`TreeUpdate`], [`Signal`] or [`BroadcastEnd`], or a room record request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRequest {
    /// Wire version.
    pub v: u8,
    /// The room (its locator).
    pub room: RoomId,
    /// What is asked.
    pub env: Envelope,
}

/// The answer to a [`RoomRequest`]: an envelope (a snapshot or an answer signal) or a refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomResponse {
    /// Wire version.
    pub v: u8,
    /// The reply, if any.
    pub env: Option<Envelope>,
    /// Why the request was refused, if it was.
    pub error: Option<String>,
}

/// Offer or answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpKind {
    /// From the child.
    Offer,
    /// From the parent.
    Answer,
}

/// The two messages of a signalling exchange ([`Signal`] and the [`Notice`] announcing it) begin
/// with the same fields: this writes them once. They stay fields of each struct (not a nested or
/// `#[serde(flatten)]`ed header, which would change the encoding the CDDL and golden vectors fix:
/// another map level, or an indefinite-length map).
macro_rules! exchange_message {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            /// Wire version.
            pub v: u8,
            /// The room.
            pub room: RoomId,
            /// Sender.
            pub from: NodeId,
            /// Recipient.
            pub to: NodeId,
            /// Names the exchange; replays of a used nonce are rejected.
            pub nonce: Nonce16,
            /// Offer or answer.
            pub kind: SdpKind,
            $($(#[$fmeta])* pub $field: $ty,)*
        }
    };
}

exchange_message! {
    /// A WebRTC session description for one (child, parent, nonce) exchange. Sealed, then signed.
    Signal {
        /// The SDP text.
        sdp: String,
        /// When made, ms since the Unix epoch; stale blobs are rejected.
        ts_ms: u64,
    }
}

impl Signal {
    /// The notice that tells the recipient this signal waits in the DHT under `blob_key`: the
    /// same exchange, the same two ends.
    pub fn notice(&self, blob_key: [u8; 32]) -> Notice {
        Notice {
            v: self.v,
            room: self.room,
            from: self.from,
            to: self.to,
            nonce: self.nonce,
            kind: self.kind,
            blob_key,
        }
    }
}

exchange_message! {
    /// Tells the other side of an exchange that a blob waits in the DHT under `blob_key`
    /// ([`Signal::notice`] makes one).
    Notice {
        /// DHT key of the sealed, signed [`Signal`].
        #[serde(with = "serde_bytes")]
        blob_key: [u8; 32],
    }
}

/// The broadcaster's notice that its broadcast is over: the sealed payload of a
/// [`Kind::BroadcastEnd`] envelope signed by the broadcaster. It goes down the tree edges (each
/// viewer forwards the envelope unchanged to its children) and on the room topic; a viewer takes
/// it only if the broadcaster signed it and it names this room and this broadcast.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastEnd {
    /// Wire version.
    pub v: u8,
    /// The room.
    pub room: RoomId,
    /// The ended broadcast: its room record's `created_ms` (an older broadcast's notice, replayed,
    /// does not end a newer one).
    pub created_ms: u64,
}

/// What `broadcast` prints and `watch` takes: names the room, pins the broadcaster, and says where
/// to dial. Text form: `wf1` followed by the base58 of this message's CBOR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Wire version.
    pub v: u8,
    /// The room name (the password is never in a ticket).
    pub room: String,
    /// The broadcaster.
    pub broadcaster: NodeId,
    /// Multiaddrs to dial first (the broadcaster's, or any member's).
    pub addrs: Vec<String>,
    /// First 8 bytes of SHA-256(locator): tells a wrong password from an unknown room at once.
    /// It reveals nothing the locator in the DHT does not already reveal to whoever knows the name.
    #[serde(with = "serde_bytes")]
    pub check: Vec<u8>,
}

const TICKET_PREFIX: &str = "wf1";

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TICKET_PREFIX}{}",
            bs58::encode(encode(self)).into_string()
        )
    }
}

impl std::str::FromStr for Ticket {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, WireError> {
        let body = s
            .trim()
            .strip_prefix(TICKET_PREFIX)
            .ok_or(WireError::Malformed {
                what: "ticket",
                reason: format!("does not start with {TICKET_PREFIX}"),
            })?;
        if body.len() > 2 * Self::MAX_LEN {
            return Err(WireError::TooLarge {
                what: "ticket",
                len: body.len(),
                max: 2 * Self::MAX_LEN,
            });
        }
        let bytes = bs58::decode(body)
            .into_vec()
            .map_err(|e| WireError::Malformed {
                what: "ticket",
                reason: e.to_string(),
            })?;
        let t: Ticket = decode(&bytes)?;
        if t.check.len() != 8 {
            return Err(WireError::Malformed {
                what: "ticket",
                reason: "check must be 8 bytes".into(),
            });
        }
        Ok(t)
    }
}

/// Flags of a media frame.
pub const FRAME_KEYFRAME: u8 = 0x01;

/// The fixed binary header that precedes every end-to-end encrypted media frame:
/// `v(1) | track(1) | flags(1) | clear_len(1) | frame_seq(8, big endian)` = 12 bytes. The first
/// `clear_len` bytes of the codec payload stay in clear (what packetizers and keyframe detection
/// need); the rest is sealed with the room's media key, header and clear bytes as associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Track index in the room record.
    pub track: u8,
    /// [`FRAME_KEYFRAME`], ...
    pub flags: u8,
    /// Bytes of the codec payload left in clear.
    pub clear_len: u8,
    /// Frame counter of the track.
    pub frame_seq: u64,
}

impl FrameHeader {
    /// Encoded size.
    pub const LEN: usize = 12;

    /// Encode.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = VERSION;
        out[1] = self.track;
        out[2] = self.flags;
        out[3] = self.clear_len;
        out[4..].copy_from_slice(&self.frame_seq.to_be_bytes());
        out
    }

    /// Decode the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        const NAME: &str = "frame header";
        if bytes.len() < Self::LEN {
            return Err(WireError::Malformed {
                what: NAME,
                reason: format!("{} bytes, need {}", bytes.len(), Self::LEN),
            });
        }
        if bytes[0] != VERSION {
            return Err(WireError::UnknownVersion {
                what: NAME,
                found: u64::from(bytes[0]),
            });
        }
        Ok(Self {
            track: bytes[1],
            flags: bytes[2],
            clear_len: bytes[3],
            frame_seq: u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_and_limits() {
        let req = SnapshotRequest {
            v: VERSION,
            room: RoomId([7; 32]),
            max: 16,
        };
        let bytes = encode(&req);
        assert_eq!(decode::<SnapshotRequest>(&bytes).unwrap(), req);
        let bad = SnapshotRequest {
            v: 9,
            ..req.clone()
        };
        assert_eq!(
            decode::<SnapshotRequest>(&encode(&bad)),
            Err(WireError::UnknownVersion {
                what: "snapshot request",
                found: 9
            })
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<SnapshotRequest>(&trailing),
            Err(WireError::Trailing { extra: 1, .. })
        ));
        let big = vec![0u8; 300];
        assert!(matches!(
            decode::<SnapshotRequest>(&big),
            Err(WireError::TooLarge { len: 300, .. })
        ));
        assert!(matches!(
            decode::<SnapshotRequest>(&[]),
            Err(WireError::Empty(_))
        ));
    }

    #[test]
    fn frame_header_round_trip() {
        let h = FrameHeader {
            track: 1,
            flags: FRAME_KEYFRAME,
            clear_len: 10,
            frame_seq: 0x0102_0304_0506_0708,
        };
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b).unwrap(), h);
        assert!(FrameHeader::decode(&b[..11]).is_err());
        let mut bad = b;
        bad[0] = 2;
        assert!(matches!(
            FrameHeader::decode(&bad),
            Err(WireError::UnknownVersion { found: 2, .. })
        ));
    }
}
