//! What a room accepts from the network: every request, response and gossip message is checked
//! here before anything reaches the room layer.
//!
//! A request is a [`RoomRequest`]: the room in clear (to route it) and a signed envelope whose
//! kind says what it carries. The checks, in order, each with its own refusal (the refusal's text
//! goes back to the sender in the [`RoomResponse`]):
//! 1. the envelope verifies (signature, expiry) and is signed by the peer that sent the request
//!    -- except the broadcaster's end notice, which travels down the tree verbatim and is checked
//!    against the broadcaster instead ([`check_end`]);
//! 2. it is not a replay (its signature is new to the room's replay window);
//! 3. it opens with the room's seal key (the sender is a member);
//! 4. its payload decodes as the message its kind announces, is addressed to us, from the
//!    signer, in this room.
//!
//! Offers are checked further by [`super::signal`] (age, nonce), and whether the offerer is our
//! child by the task, which knows the tree.

use libp2p::PeerId;

use crate::crypto::{CryptoError, Kind, RoomKeys, now_ms};
use crate::net::node_of;
use crate::proto::{NodeId, Snapshot, TreeMsg, TreeUpdate};
use crate::wire::{
    self, BroadcastEnd, Control, Envelope, RoomId, RoomRequest, RoomResponse, SnapshotRequest,
    SnapshotResponse, Versioned, WireError,
};

/// Why a request was refused; its text is what the sender reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a room request at all.
    #[error("bad request: {0}")]
    BadRequest(#[source] WireError),
    /// We are not in the room it names.
    #[error("not in this room")]
    NotInRoom,
    /// The room's input queue is full.
    #[error("busy")]
    Busy,
    /// The envelope does not verify, or is not the sender's.
    #[error("invalid envelope")]
    InvalidEnvelope,
    /// An envelope already seen.
    #[error("replayed")]
    Replayed,
    /// The payload does not open with the room key.
    #[error("cannot open: not a member of this room")]
    NotMember(#[source] CryptoError),
    /// A control message that does not decode.
    #[error("malformed control")]
    MalformedControl(#[source] WireError),
    /// A control message for someone else, from someone else or for another room.
    #[error("misaddressed control")]
    Misaddressed,
    /// An update that does not decode.
    #[error("malformed update")]
    MalformedUpdate(#[source] WireError),
    /// An update about another peer than its signer.
    #[error("update about someone else")]
    UpdateAboutOther,
    /// A record request to a viewer.
    #[error("not the broadcaster")]
    NotBroadcaster,
    /// A snapshot request that does not decode.
    #[error("malformed snapshot request")]
    MalformedSnapshotRequest(#[source] WireError),
    /// An offer that fails the signalling checks.
    #[error("bad offer: {0}")]
    BadOffer(#[source] super::signal::SignalError),
    /// An offer whose nonce was used before.
    #[error("nonce reused")]
    NonceReused,
    /// An offer from a peer that is not our child.
    #[error("not a child of this node")]
    NotAChild,
    /// Answering the offer failed.
    #[error("{0}")]
    Answer(#[source] super::signal::SignalError),
    /// An end notice that fails its checks.
    #[error("bad end notice: {0}")]
    BadEnd(#[source] EndError),
    /// A kind that is not sent in requests.
    #[error("unexpected kind")]
    UnexpectedKind,
}

/// The encoded response refusing a request.
pub(super) fn refusal(why: &Refusal) -> Vec<u8> {
    wire::encode(&RoomResponse {
        v: wire::VERSION,
        env: None,
        error: Some(refusal_text(why)),
    })
}

/// What a refused sender reads. Refusals that come before the sender has proven it holds the
/// room's key all read "no": a stranger must not learn whether this node is in the room it
/// names (not in this room, not a member, invalid envelope, replay, busy would otherwise tell
/// it apart). Members, whose requests open, get the precise reason.
pub(super) fn refusal_text(why: &Refusal) -> String {
    match why {
        Refusal::BadRequest(_)
        | Refusal::NotInRoom
        | Refusal::Busy
        | Refusal::InvalidEnvelope
        | Refusal::Replayed
        | Refusal::NotMember(_) => "no".to_owned(),
        other => other.to_string(),
    }
}

/// The encoded response accepting a request, with an envelope or not.
pub(super) fn ok_response(env: Option<Envelope>) -> Vec<u8> {
    wire::encode(&RoomResponse {
        v: wire::VERSION,
        env,
        error: None,
    })
}

/// A request that passed the checks, by what it asks.
#[derive(Debug)]
pub(super) enum Checked {
    /// A tree control message from `from`.
    Control { from: NodeId, msg: TreeMsg },
    /// A tree neighbour's signed update.
    Update { from: NodeId, update: TreeUpdate },
    /// A member asks the broadcaster for its room record.
    Record,
    /// A member asks for join candidates (or probes us).
    Snapshot { max: u16 },
    /// A child's offer, still sealed: [`super::signal`] opens it.
    Offer { from: NodeId, env: Envelope },
    /// The broadcaster's end notice, verified.
    End(Envelope),
}

/// What a room knows to check requests against.
pub(super) struct Context<'a> {
    pub keys: &'a RoomKeys,
    pub room: RoomId,
    pub me: NodeId,
    pub broadcaster: NodeId,
    pub session: u64,
}

/// Check a request (see the module docs); `fresh` is the room's replay window.
pub(super) fn check_request(
    cx: &Context<'_>,
    from: &PeerId,
    env: Envelope,
    mut fresh: impl FnMut([u8; 32]) -> bool,
) -> Result<Checked, Refusal> {
    if env.kind == Kind::BroadcastEnd {
        // Forwarded verbatim by our parent: signed by the broadcaster, not by the sender.
        check_end(cx, &env).map_err(Refusal::BadEnd)?;
        return Ok(Checked::End(env));
    }
    let now = now_ms();
    if node_of(from) != Some(env.signer) || env.verify(now).is_err() {
        return Err(Refusal::InvalidEnvelope);
    }
    if !fresh(super::digest(&env.sig)) {
        return Err(Refusal::Replayed);
    }
    let sender = env.signer;
    let plain = cx
        .keys
        .open(env.kind, &env.payload)
        .map_err(Refusal::NotMember)?;
    match env.kind {
        Kind::TreeControl => {
            let ctl: Control = wire::decode(&plain).map_err(Refusal::MalformedControl)?;
            if ctl.from != sender || ctl.to != cx.me || ctl.room != cx.room {
                return Err(Refusal::Misaddressed);
            }
            Ok(Checked::Control {
                from: sender,
                msg: ctl.msg,
            })
        }
        Kind::TreeUpdate => {
            let Versioned(update) =
                wire::decode::<Versioned<TreeUpdate>>(&plain).map_err(Refusal::MalformedUpdate)?;
            if update.peer != sender {
                return Err(Refusal::UpdateAboutOther);
            }
            Ok(Checked::Update {
                from: sender,
                update,
            })
        }
        // The signalling code opens it again and checks its address, age and nonce.
        Kind::Offer => Ok(Checked::Offer { from: sender, env }),
        // A member (it sealed the request with the room key) asks the broadcaster.
        Kind::RoomRecord => Ok(Checked::Record),
        Kind::Snapshot => {
            let req: SnapshotRequest =
                wire::decode(&plain).map_err(Refusal::MalformedSnapshotRequest)?;
            Ok(Checked::Snapshot { max: req.max })
        }
        _ => Err(Refusal::UnexpectedKind),
    }
}

/// Why an end notice was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndError {
    /// Not signed (validly, and still in time) by the broadcaster of this room.
    #[error("not signed by the broadcaster")]
    Signer,
    /// The signature or expiry does not verify.
    #[error(transparent)]
    Envelope(#[from] CryptoError),
    /// The payload does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// It ends another room or another broadcast of this room.
    #[error("for another room or broadcast")]
    OtherBroadcast,
}

/// Check the broadcaster's end notice: signed by the broadcaster, sealed for this room, naming
/// this room and this broadcast (its creation time), not expired.
pub(super) fn check_end(cx: &Context<'_>, env: &Envelope) -> Result<(), EndError> {
    if env.signer != cx.broadcaster {
        return Err(EndError::Signer);
    }
    env.verify_kind(Kind::BroadcastEnd, now_ms())?;
    let plain = cx.keys.open(Kind::BroadcastEnd, &env.payload)?;
    let end: BroadcastEnd = wire::decode(&plain)?;
    if end.room != cx.room || end.created_ms != cx.session {
        return Err(EndError::OtherBroadcast);
    }
    Ok(())
}

/// Why a snapshot answer was not taken (the room then counts it as empty).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The response does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The member refused.
    #[error("refused: {0}")]
    Refused(String),
    /// No envelope in the response.
    #[error("empty snapshot")]
    Empty,
    /// The envelope does not verify or open.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Signed by another peer than the one asked.
    #[error("snapshot signed by someone else")]
    Signer,
    /// About another room.
    #[error("snapshot of another room")]
    OtherRoom,
}

/// Open a member's answer to a snapshot request.
pub(super) fn open_snapshot(
    keys: &RoomKeys,
    room: RoomId,
    from: NodeId,
    resp: &[u8],
) -> Result<Snapshot, SnapshotError> {
    let resp: RoomResponse = wire::decode(resp)?;
    if let Some(e) = resp.error {
        return Err(SnapshotError::Refused(e));
    }
    let env = resp.env.ok_or(SnapshotError::Empty)?;
    env.verify_kind(Kind::Snapshot, now_ms())?;
    if env.signer != from {
        return Err(SnapshotError::Signer);
    }
    let plain = keys.open(Kind::Snapshot, &env.payload)?;
    let s: SnapshotResponse = wire::decode(&plain)?;
    if s.room != room {
        return Err(SnapshotError::OtherRoom);
    }
    Ok(Snapshot {
        candidates: s.candidates,
    })
}

/// A request to the room (for [`super::registry::Rooms::request`]'s routing).
pub(super) fn decode_request(data: &[u8]) -> Result<RoomRequest, Refusal> {
    wire::decode(data).map_err(Refusal::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Identity, KdfParams};

    #[test]
    fn a_stranger_reads_the_same_no_whether_or_not_we_are_in_the_room() {
        let not_in = refusal(&Refusal::NotInRoom);
        for why in [
            Refusal::NotMember(CryptoError::BadSignature),
            Refusal::InvalidEnvelope,
            Refusal::Replayed,
            Refusal::Busy,
        ] {
            assert_eq!(refusal(&why), not_in, "{why} tells itself apart");
        }
        // A member's request that opened gets the reason.
        assert_eq!(
            refusal_text(&Refusal::NotAChild),
            "not a child of this node"
        );
    }

    fn end_env(by: &Identity, keys: &RoomKeys, room: RoomId, created_ms: u64) -> Envelope {
        let end = BroadcastEnd {
            v: wire::VERSION,
            room,
            created_ms,
        };
        by.seal_envelope(
            Kind::BroadcastEnd,
            1,
            now_ms() + 30_000,
            keys.seal(Kind::BroadcastEnd, &wire::encode(&end)),
        )
    }

    #[test]
    fn end_notices_must_come_from_the_broadcaster_of_this_broadcast() {
        let keys = RoomKeys::derive("r", Some("pw"), KdfParams::TEST_ONLY).unwrap();
        let room = RoomId(*keys.locator());
        let bc = Identity::generate();
        let cx = Context {
            keys: &keys,
            room,
            me: NodeId([3; 32]),
            broadcaster: bc.node_id(),
            session: 1_000,
        };
        assert!(check_end(&cx, &end_env(&bc, &keys, room, 1_000)).is_ok());
        // Another signer, even a member.
        let other = Identity::generate();
        assert!(matches!(
            check_end(&cx, &end_env(&other, &keys, room, 1_000)),
            Err(EndError::Signer)
        ));
        // An earlier broadcast of the same room (a replay), another room.
        assert!(matches!(
            check_end(&cx, &end_env(&bc, &keys, room, 999)),
            Err(EndError::OtherBroadcast)
        ));
        assert!(check_end(&cx, &end_env(&bc, &keys, RoomId([1; 32]), 1_000)).is_err());
        // Sealed with another room's key; tampered.
        let wrong = RoomKeys::derive("r", Some("guess"), KdfParams::TEST_ONLY).unwrap();
        assert!(check_end(&cx, &end_env(&bc, &wrong, room, 1_000)).is_err());
        let mut t = end_env(&bc, &keys, room, 1_000);
        t.sig[3] ^= 1;
        assert!(check_end(&cx, &t).is_err());
        // Through check_request too, whoever forwards it.
        let forwarder = Identity::generate().peer_id();
        let env = end_env(&bc, &keys, room, 1_000);
        assert!(matches!(
            check_request(&cx, &forwarder, env, |_| true),
            Ok(Checked::End(_))
        ));
    }
}
