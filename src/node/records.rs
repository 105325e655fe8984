//! Validation of what arrives from the swarm: DHT records and gossip messages.
//!
//! A DHT node that stores a room record cannot read it (it is sealed with the room's seal key),
//! so the record validator checks what every node can: the envelope decodes, its signature is
//! valid, its kind is one stored in the DHT, and its expiry and size are within the limits the
//! network actor enforces. Gossip is validated by room members only, who hold the keys: the
//! envelope must verify, its signer must be the gossip author, and its payload must open with the
//! room's seal key and decode as the message its kind announces.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use libp2p::PeerId;

use crate::crypto::{CryptoError, Kind, RoomKeys, now_ms};
use crate::net::{GossipVerdict, RecordMeta, node_of};
use crate::wire::{self, Envelope, TreeUpdate, Versioned};

/// Kinds that may be stored in the waterfall DHT.
const DHT_KINDS: [Kind; 3] = [Kind::RoomRecord, Kind::Offer, Kind::Answer];

/// How long a DHT node holds a signalling blob (offer, answer) for others: the exchange it
/// serves is over within seconds, and blobs are signed to expire within a minute anyway.
pub const SIGNAL_HOLD: Duration = Duration::from_secs(60);
/// How long a DHT node holds a room record for others: the broadcaster refreshes it every
/// [`crate::node::ROOM_REFRESH`] and republishes it well within this, so a live room's record
/// never lapses, while a squatter's or a flooder's copy is gone minutes after it stops.
pub const ROOM_RECORD_HOLD: Duration = Duration::from_secs(5 * 60);

/// The record validator handed to the network actor.
pub fn validate_record(_key: &[u8], value: &[u8]) -> Result<RecordMeta, String> {
    let env: Envelope = wire::decode(value).map_err(|e| e.to_string())?;
    if !DHT_KINDS.contains(&env.kind) {
        return Err(format!("kind {:?} is not stored in the DHT", env.kind));
    }
    // Signature only: expiry is the network layer's check, which tells an expired record (late,
    // no fault) from an invalid one (a strike for the sender).
    env.verify(0).map_err(|e| e.to_string())?;
    Ok(RecordMeta {
        signer: env.signer.0.to_vec(),
        expires_unix_ms: env.expires_ms,
        seq: env.seq,
        hold_for: match env.kind {
            Kind::RoomRecord => ROOM_RECORD_HOLD,
            _ => SIGNAL_HOLD,
        },
    })
}

/// Rooms this node is a member of, by gossip topic: the gossip validator opens messages with them.
#[derive(Clone, Default)]
pub struct TopicKeys {
    inner: Arc<RwLock<HashMap<String, RoomKeys>>>,
}

impl TopicKeys {
    /// Register a room's keys.
    pub fn insert(&self, keys: RoomKeys) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(keys.topic().to_owned(), keys);
    }

    /// Forget a room.
    pub fn remove(&self, topic: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    fn get(&self, topic: &str) -> Option<RoomKeys> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
    }

    /// Open and check one gossip message; `None` rejects it (and penalises the sender).
    pub fn open_gossip(
        &self,
        topic: &str,
        author: &PeerId,
        data: &[u8],
    ) -> Option<(Envelope, Vec<u8>)> {
        let keys = self.get(topic)?;
        let env: Envelope = wire::decode(data).ok()?;
        if !matches!(
            env.kind,
            Kind::TreeUpdate | Kind::Notice | Kind::BroadcastEnd
        ) {
            return None;
        }
        env.verify(now_ms()).ok()?;
        // The signer must be the author: nobody announces tree positions for someone else.
        if node_of(author)? != env.signer {
            return None;
        }
        let plain = keys.open(env.kind, &env.payload).ok()?;
        let ok = match env.kind {
            Kind::TreeUpdate => wire::decode::<Versioned<TreeUpdate>>(&plain)
                .map(|u| u.0.peer == env.signer)
                .unwrap_or(false),
            Kind::Notice => wire::decode::<wire::Notice>(&plain)
                .map(|n| n.from == env.signer)
                .unwrap_or(false),
            // Whether the signer is the broadcaster is the room's check (it knows who that is).
            Kind::BroadcastEnd => wire::decode::<wire::BroadcastEnd>(&plain).is_ok(),
            _ => false,
        };
        ok.then_some((env, plain))
    }

    /// The network actor's verdict on one gossip message: a topic we do not (or no longer)
    /// hold keys for, or an envelope that expired (late, or the signer's clock is behind), is
    /// ignored without blame; anything else that does not open and check is rejected.
    pub fn judge_gossip(&self, topic: &str, author: &PeerId, data: &[u8]) -> GossipVerdict {
        if self.get(topic).is_none() {
            return GossipVerdict::Ignore;
        }
        if self.open_gossip(topic, author, data).is_some() {
            return GossipVerdict::Accept;
        }
        // Why it failed: only a valid signature that merely expired is no fault.
        match wire::decode::<Envelope>(data) {
            Ok(env)
                if env.verify(0).is_ok()
                    && matches!(env.verify(now_ms()), Err(CryptoError::Expired { .. })) =>
            {
                GossipVerdict::Ignore
            }
            _ => GossipVerdict::Reject,
        }
    }

    /// The validator handed to the network actor.
    pub fn validator(&self) -> crate::net::GossipValidator {
        let me = self.clone();
        Arc::new(move |topic: &str, author: &PeerId, data: &[u8]| {
            me.judge_gossip(topic, author, data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Identity, KdfParams};
    use crate::proto::NodeId;
    use crate::wire::{Nonce16, Notice, RoomId, SdpKind};

    fn notice(from: &Identity, keys: &RoomKeys) -> Vec<u8> {
        let n = Notice {
            v: wire::VERSION,
            room: RoomId(*keys.locator()),
            from: from.node_id(),
            to: NodeId([2; 32]),
            nonce: Nonce16([3; 16]),
            kind: SdpKind::Offer,
            blob_key: [4; 32],
        };
        let env = from.seal_envelope(
            Kind::Notice,
            1,
            now_ms() + 10_000,
            keys.seal(Kind::Notice, &wire::encode(&n)),
        );
        wire::encode(&env)
    }

    #[test]
    fn gossip_is_opened_verified_and_bound_to_its_author() {
        let keys = RoomKeys::derive("r", Some("pw"), KdfParams::TEST_ONLY).unwrap();
        let topics = TopicKeys::default();
        topics.insert(keys.clone());
        let alice = Identity::generate();
        let msg = notice(&alice, &keys);
        assert!(
            topics
                .open_gossip(keys.topic(), &alice.peer_id(), &msg)
                .is_some()
        );
        // Relayed under another author's name.
        let mallory = Identity::generate();
        assert!(
            topics
                .open_gossip(keys.topic(), &mallory.peer_id(), &msg)
                .is_none()
        );
        // Unknown topic, tampered bytes, sealed with another room's key.
        assert!(
            topics
                .open_gossip("other", &alice.peer_id(), &msg)
                .is_none()
        );
        let mut t = msg.clone();
        let last = t.len() - 70;
        t[last] ^= 1;
        assert!(
            topics
                .open_gossip(keys.topic(), &alice.peer_id(), &t)
                .is_none()
        );
        let wrong = RoomKeys::derive("r", Some("guess"), KdfParams::TEST_ONLY).unwrap();
        let forged = notice(&alice, &wrong);
        assert!(
            topics
                .open_gossip(keys.topic(), &alice.peer_id(), &forged)
                .is_none()
        );
        assert!(
            topics
                .open_gossip(keys.topic(), &alice.peer_id(), b"garbage")
                .is_none()
        );
    }

    #[test]
    fn late_gossip_and_left_topics_are_ignored_not_blamed() {
        let keys = RoomKeys::derive("r", Some("pw"), KdfParams::TEST_ONLY).unwrap();
        let topics = TopicKeys::default();
        topics.insert(keys.clone());
        let alice = Identity::generate();
        let msg = notice(&alice, &keys);
        let t = keys.topic();
        assert_eq!(
            topics.judge_gossip(t, &alice.peer_id(), &msg),
            GossipVerdict::Accept
        );
        // Expired on the way (or the signer's clock is behind): no fault.
        let n: Notice = wire::decode(
            &keys
                .open(
                    Kind::Notice,
                    &wire::decode::<Envelope>(&msg).unwrap().payload,
                )
                .unwrap(),
        )
        .unwrap();
        let late = alice.seal_envelope(
            Kind::Notice,
            2,
            now_ms() - 1,
            keys.seal(Kind::Notice, &wire::encode(&n)),
        );
        assert_eq!(
            topics.judge_gossip(t, &alice.peer_id(), &wire::encode(&late)),
            GossipVerdict::Ignore
        );
        // Forged or misattributed: blamed.
        assert_eq!(
            topics.judge_gossip(t, &Identity::generate().peer_id(), &msg),
            GossipVerdict::Reject
        );
        assert_eq!(
            topics.judge_gossip(t, &alice.peer_id(), b"garbage"),
            GossipVerdict::Reject
        );
        // A room we left: in-flight messages are not the sender's fault.
        topics.remove(t);
        assert_eq!(
            topics.judge_gossip(t, &alice.peer_id(), &msg),
            GossipVerdict::Ignore
        );
    }

    #[test]
    fn dht_records_need_a_valid_signature_and_a_dht_kind() {
        let id = Identity::generate();
        let env = id.seal_envelope(Kind::RoomRecord, 3, now_ms() + 60_000, b"sealed".to_vec());
        let meta = validate_record(b"k", &wire::encode(&env)).unwrap();
        assert_eq!(meta.signer, id.node_id().0.to_vec());
        assert_eq!(meta.seq, 3);
        let mut bad = env.clone();
        bad.payload[0] ^= 1;
        assert!(validate_record(b"k", &wire::encode(&bad)).is_err());
        let gossip_kind = id.seal_envelope(Kind::TreeUpdate, 1, now_ms() + 60_000, vec![1]);
        assert!(validate_record(b"k", &wire::encode(&gossip_kind)).is_err());
        // An expired record is valid here: the network layer refuses it as late, not as forged
        // (no strike for its sender).
        let expired = id.seal_envelope(Kind::Offer, 1, now_ms() - 1, vec![1]);
        assert!(validate_record(b"k", &wire::encode(&expired)).is_ok());
        let refusal = crate::net::records::check(
            &(Arc::new(validate_record) as crate::net::RecordValidator),
            b"k",
            &wire::encode(&expired),
            now_ms(),
        )
        .unwrap_err();
        assert!(!refusal.is_misbehaviour());
        assert!(validate_record(b"k", b"\xff\x00").is_err());
    }
}
