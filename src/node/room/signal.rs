//! Offer and answer: how a child's media connection to its parent is set up.
//!
//! The child seals its offer in a [`Signal`], signs it, stores it in the waterfall DHT under
//! `H(room, child, parent, nonce)` with a short expiry, and sends the same envelope to the parent
//! in a direct request (the fast path). The parent answers inline and stores its answer under the
//! matching key. When the direct request cannot be delivered, the child publishes a [`Notice`] on
//! the room topic and the parent fetches the offer from the DHT and answers the same way
//! ([`answer_from_dht`]); the child polls the DHT for the answer. Signals older than
//! [`SIGNAL_MAX_AGE`] (or from the future) and nonces already used are rejected; only the parent
//! asked may answer, and only a child of the parent's tree is answered (the task checks that).

use std::time::Duration;

use crate::crypto::{CryptoError, Kind, RoomKeys, now_ms, random_bytes};
use crate::media::{ChildId, SdpKind as MediaSdpKind, SessionError, SignalBlob};
use crate::net::{NetError, peer_of};
use crate::node::Node;
use crate::proto::NodeId;
use crate::wire::{
    self, Envelope, Nonce16, Notice, RoomId, RoomRequest, RoomResponse, SdpKind, Signal, WireError,
};

use super::Media;

/// Time allowed for the offer/answer round trip (the answerer gathers ICE first).
pub(super) const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Signals older than this are stale.
pub const SIGNAL_MAX_AGE: Duration = Duration::from_secs(30);
/// How far in the future a signal's clock may be (skew between peers).
const SIGNAL_MAX_SKEW_MS: u64 = 5_000;
/// How long DHT signalling blobs live.
const SIGNAL_TTL: Duration = Duration::from_secs(60);
/// How often the child looks for the answer in the DHT on the slow path.
const DHT_POLL: Duration = Duration::from_millis(500);

/// Why an offer/answer exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// The envelope does not verify or open.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The signal does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Signed by another peer than its sender.
    #[error("signal signed by someone else")]
    Signer,
    /// For another exchange than ours.
    #[error("misaddressed signal")]
    Misaddressed,
    /// Too old, or from the future.
    #[error("stale signal ({age_ms} ms old)")]
    Stale { age_ms: u64 },
    /// The parent refused the offer.
    #[error("parent refused the offer: {0}")]
    Refused(String),
    /// The parent's response held no answer.
    #[error("empty answer")]
    EmptyAnswer,
    /// The answer is for another exchange (nonce).
    #[error("answer for another exchange")]
    OtherExchange,
    /// No answer arrived through the DHT in time.
    #[error("no answer from the parent")]
    NoAnswer,
    /// The parent's key is not a valid peer id.
    #[error("invalid peer id")]
    BadPeer,
    /// The media session failed.
    #[error("media: {0}")]
    Media(#[from] SessionError),
    /// The network failed.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// This node is answering as many offers as it takes at once
    /// ([`crate::node::MAX_CONCURRENT_OFFERS`]).
    #[error("too many offers being answered")]
    Busy,
}

/// What a signalling exchange needs of its room.
#[derive(Clone)]
pub(super) struct SignalCtx {
    pub node: Node,
    pub keys: RoomKeys,
    pub room: RoomId,
    pub me: NodeId,
}

impl SignalCtx {
    /// Seal a signalling message for the room and sign it; it lives [`SIGNAL_TTL`].
    fn envelope<T: wire::Message>(&self, kind: Kind, msg: &T) -> Envelope {
        self.node.inner.identity.seal_envelope(
            kind,
            now_ms(),
            now_ms() + SIGNAL_TTL.as_millis() as u64,
            self.keys.seal(kind, &wire::encode(msg)),
        )
    }
}

/// DHT key of a signalling blob: H(room, child, parent, nonce, kind).
pub(super) fn signal_key(
    keys: &RoomKeys,
    child: NodeId,
    parent: NodeId,
    nonce: &Nonce16,
    kind: SdpKind,
) -> [u8; 32] {
    let k = [match kind {
        SdpKind::Offer => 0u8,
        SdpKind::Answer => 1u8,
    }];
    keys.derived_key(b"signal", &[&child.0, &parent.0, &nonce.0, &k])
}

/// Verify, open and check a signalling envelope from `from` to `to`.
pub(super) fn open_signal(
    keys: &RoomKeys,
    env: &Envelope,
    kind: Kind,
    from: NodeId,
    to: NodeId,
) -> Result<Signal, SignalError> {
    env.verify_kind(kind, now_ms())?;
    if env.signer != from {
        return Err(SignalError::Signer);
    }
    let plain = keys.open(kind, &env.payload)?;
    let s: Signal = wire::decode(&plain)?;
    if s.from != from || s.to != to {
        return Err(SignalError::Misaddressed);
    }
    let now = now_ms();
    let age_ms = now.saturating_sub(s.ts_ms);
    if age_ms > SIGNAL_MAX_AGE.as_millis() as u64 || s.ts_ms > now + SIGNAL_MAX_SKEW_MS {
        return Err(SignalError::Stale { age_ms });
    }
    Ok(s)
}

/// Attach a child from its offer; returns the media's id of the child and the signed, sealed
/// answer.
pub(super) async fn answer_offer(
    cx: &SignalCtx,
    media: &Media,
    offer: &Signal,
) -> Result<(ChildId, Envelope), SignalError> {
    // Each answer builds a peer connection and gathers ICE: bounded node-wide, whatever the
    // rooms and their children ask.
    let _slot = cx
        .node
        .inner
        .offer_slots
        .try_acquire()
        .map_err(|_| SignalError::Busy)?;
    let blob = SignalBlob {
        kind: MediaSdpKind::Offer,
        sdp: offer.sdp.clone(),
    };
    let (id, answer) = match media {
        Media::Root(b) => b.attach_child(&blob).await,
        Media::Viewer(v) => v.attach_child(&blob).await,
    }?;
    Ok((id, answer_envelope(cx, offer, answer)))
}

/// Answer an offer that restarts ICE on the connection of the attached child `id`; `None` when
/// the offer is not one of that connection (the child made a new one: attach it instead).
pub(super) async fn answer_restart(
    cx: &SignalCtx,
    media: &Media,
    id: ChildId,
    offer: &Signal,
) -> Option<Result<Envelope, SignalError>> {
    let blob = SignalBlob {
        kind: MediaSdpKind::Offer,
        sdp: offer.sdp.clone(),
    };
    let r = match media {
        Media::Root(b) => b.restart_child(id, &blob).await,
        Media::Viewer(v) => v.restart_child(id, &blob).await,
    };
    match r {
        Ok(answer) => Some(Ok(answer_envelope(cx, offer, answer))),
        Err(SessionError::NoSuchChild)
        | Err(SessionError::Peer(crate::media::PeerError::BadBlob(_))) => None,
        Err(e) => Some(Err(e.into())),
    }
}

/// The signed, sealed answer to `offer`.
fn answer_envelope(cx: &SignalCtx, offer: &Signal, answer: SignalBlob) -> Envelope {
    let signal = Signal {
        v: wire::VERSION,
        room: offer.room,
        from: offer.to,
        to: offer.from,
        nonce: offer.nonce,
        kind: SdpKind::Answer,
        sdp: answer.sdp,
        ts_ms: now_ms(),
    };
    cx.envelope(Kind::Answer, &signal)
}

/// The child's side: offer to `parent`, apply its answer. The media session is the viewer's.
pub(super) async fn connect_parent(
    cx: &SignalCtx,
    viewer: &crate::media::Viewer,
    parent: NodeId,
) -> Result<(), SignalError> {
    let offer = viewer.connect_parent().await?;
    offer_to_parent(cx, viewer, parent, offer).await
}

/// The child's side of an ICE restart (this node's network changed): the same exchange, with
/// an offer of the existing connection. The parent tells it from a new connection by its DTLS
/// fingerprint and restarts ICE on the connection it has (see `Hub::restart_child`).
pub(super) async fn restart_parent(
    cx: &SignalCtx,
    viewer: &crate::media::Viewer,
    parent: NodeId,
) -> Result<(), SignalError> {
    let offer = viewer.restart_parent().await?;
    offer_to_parent(cx, viewer, parent, offer).await
}

/// Send `offer` to `parent` (directly, and through the DHT when the direct path fails), and
/// apply its answer.
async fn offer_to_parent(
    cx: &SignalCtx,
    viewer: &crate::media::Viewer,
    parent: NodeId,
    offer: SignalBlob,
) -> Result<(), SignalError> {
    let peer = peer_of(parent).ok_or(SignalError::BadPeer)?;
    let nonce = Nonce16(random_bytes());
    let signal = Signal {
        v: wire::VERSION,
        room: cx.room,
        from: cx.me,
        to: parent,
        nonce,
        kind: SdpKind::Offer,
        sdp: offer.sdp,
        ts_ms: now_ms(),
    };
    let env = cx.envelope(Kind::Offer, &signal);
    // Durable copy in the DHT (the parent can fetch it if the direct path fails); stored in the
    // background while the direct request runs.
    let blob_key = signal_key(&cx.keys, cx.me, parent, &nonce, SdpKind::Offer);
    let net = cx.node.inner.net.clone();
    let put = net.put_record(blob_key.to_vec(), wire::encode(&env));
    let req = wire::encode(&RoomRequest {
        v: wire::VERSION,
        room: cx.room,
        env,
    });
    let direct = async {
        if cx.node.inner.inline_signalling {
            net.request(peer, req, SIGNAL_TIMEOUT).await
        } else {
            Err(NetError::Request("inline signalling is off".into()))
        }
    };
    // Both at once, in this task: once the direct answer is in, the DHT copy is moot.
    tokio::pin!(put, direct);
    let mut stored = None;
    let direct = loop {
        tokio::select! {
            r = &mut direct => break r,
            r = &mut put, if stored.is_none() => stored = Some(r),
        }
    };
    let answer_env = match direct {
        Ok(resp) => {
            let resp: RoomResponse = wire::decode(&resp)?;
            if let Some(err) = resp.error {
                return Err(SignalError::Refused(err));
            }
            resp.env.ok_or(SignalError::EmptyAnswer)?
        }
        Err(e) => {
            // Slow path: tell the parent on the room topic, wait for its answer blob.
            tracing::debug!("direct signalling unavailable ({e}); using the DHT");
            let stored = match stored {
                Some(r) => r,
                None => put.await,
            };
            match stored {
                // Stored here and served from here: the parent can fetch it.
                Ok(()) | Err(NetError::NotReplicated) => {}
                Err(e) => return Err(e.into()),
            }
            signal_via_dht(cx, signal.notice(blob_key)).await?
        }
    };
    let answer = open_signal(&cx.keys, &answer_env, Kind::Answer, parent, cx.me)?;
    if answer.nonce != nonce {
        return Err(SignalError::OtherExchange);
    }
    viewer
        .parent_answer(&SignalBlob {
            kind: MediaSdpKind::Answer,
            sdp: answer.sdp,
        })
        .await?;
    Ok(())
}

/// The slow signalling path: a notice on the room topic, then poll the DHT for the answer.
async fn signal_via_dht(cx: &SignalCtx, notice: Notice) -> Result<Envelope, SignalError> {
    let (parent, nonce) = (notice.to, notice.nonce);
    let env = cx.envelope(Kind::Notice, &notice);
    let net = &cx.node.inner.net;
    net.publish(cx.keys.topic().to_owned(), wire::encode(&env))
        .await?;
    let akey = signal_key(&cx.keys, cx.me, parent, &nonce, SdpKind::Answer);
    let deadline = tokio::time::Instant::now() + SIGNAL_TIMEOUT;
    // Bounded polling: at most SIGNAL_TIMEOUT, every DHT_POLL.
    while tokio::time::Instant::now() < deadline {
        if let Ok(values) = net.get_record(akey.to_vec(), Duration::from_secs(2)).await {
            for v in values {
                if let Ok(env) = wire::decode::<Envelope>(&v)
                    && env.kind == Kind::Answer
                {
                    return Ok(env);
                }
            }
        }
        tokio::time::sleep(DHT_POLL).await;
    }
    Err(SignalError::NoAnswer)
}

/// The parent's side of the slow path: fetch the child's offer from the DHT (its notice named
/// the key), answer it into the DHT and say so on the room topic. Returns the attached child.
pub(super) async fn answer_from_dht(
    cx: &SignalCtx,
    media: &Media,
    child: NodeId,
    blob_key: [u8; 32],
) -> Result<Option<ChildId>, SignalError> {
    let net = &cx.node.inner.net;
    let values = net.get_record(blob_key.to_vec(), SIGNAL_TIMEOUT).await?;
    for v in values {
        let Ok(env) = wire::decode::<Envelope>(&v) else {
            continue;
        };
        let Ok(offer) = open_signal(&cx.keys, &env, Kind::Offer, child, cx.me) else {
            continue;
        };
        let (id, answer_env) = answer_offer(cx, media, &offer).await?;
        let akey = signal_key(&cx.keys, child, cx.me, &offer.nonce, SdpKind::Answer);
        let _ = net
            .put_record(akey.to_vec(), wire::encode(&answer_env))
            .await;
        let notice = Notice {
            v: wire::VERSION,
            room: offer.room,
            from: cx.me,
            to: child,
            nonce: offer.nonce,
            kind: SdpKind::Answer,
            blob_key: akey,
        };
        let env = cx.envelope(Kind::Notice, &notice);
        let _ = net
            .publish(cx.keys.topic().to_owned(), wire::encode(&env))
            .await;
        return Ok(Some(id));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Identity, KdfParams};

    fn signal_env(
        from: &Identity,
        to: NodeId,
        keys: &RoomKeys,
        ts_ms: u64,
        kind: Kind,
    ) -> Envelope {
        let s = Signal {
            v: wire::VERSION,
            room: RoomId(*keys.locator()),
            from: from.node_id(),
            to,
            nonce: Nonce16([7; 16]),
            kind: SdpKind::Offer,
            sdp: "v=0".into(),
            ts_ms,
        };
        from.seal_envelope(
            kind,
            1,
            now_ms() + 60_000,
            keys.seal(kind, &wire::encode(&s)),
        )
    }

    #[test]
    fn signals_are_checked_for_age_address_signer_and_kind() {
        let keys = RoomKeys::derive("r", Some("pw"), KdfParams::TEST_ONLY).unwrap();
        let child = Identity::generate();
        let parent = NodeId([9; 32]);
        let me = child.node_id();
        let fresh = signal_env(&child, parent, &keys, now_ms(), Kind::Offer);
        assert!(open_signal(&keys, &fresh, Kind::Offer, me, parent).is_ok());
        // Stale.
        let old = signal_env(&child, parent, &keys, now_ms() - 60_000, Kind::Offer);
        let e = open_signal(&keys, &old, Kind::Offer, me, parent).unwrap_err();
        assert!(matches!(e, SignalError::Stale { .. }), "{e}");
        // From the future.
        let future = signal_env(&child, parent, &keys, now_ms() + 60_000, Kind::Offer);
        assert!(matches!(
            open_signal(&keys, &future, Kind::Offer, me, parent),
            Err(SignalError::Stale { .. })
        ));
        // For someone else, from someone else, or of the other kind.
        assert!(matches!(
            open_signal(&keys, &fresh, Kind::Offer, me, NodeId([1; 32])),
            Err(SignalError::Misaddressed)
        ));
        assert!(matches!(
            open_signal(&keys, &fresh, Kind::Offer, NodeId([1; 32]), parent),
            Err(SignalError::Signer)
        ));
        assert!(open_signal(&keys, &fresh, Kind::Answer, me, parent).is_err());
        // Another room's key.
        let other = RoomKeys::derive("r", Some("other"), KdfParams::TEST_ONLY).unwrap();
        assert!(matches!(
            open_signal(&other, &fresh, Kind::Offer, me, parent),
            Err(SignalError::Crypto(_))
        ));
    }
}
