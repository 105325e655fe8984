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

use libp2p::PeerId;

use crate::crypto::{Kind, RoomKeys, now_ms, public_of_peer};
use crate::net::RecordMeta;
use crate::wire::{self, Envelope};

/// Kinds that may be stored in the waterfall DHT.
const DHT_KINDS: [Kind; 3] = [Kind::RoomRecord, Kind::Offer, Kind::Answer];

/// The record validator handed to the network actor.
pub fn validate_record(_key: &[u8], value: &[u8]) -> Result<RecordMeta, String> {
    let env: Envelope = wire::decode(value).map_err(|e| e.to_string())?;
    if !DHT_KINDS.contains(&env.kind) {
        return Err(format!("kind {:?} is not stored in the DHT", env.kind));
    }
    env.verify(now_ms()).map_err(|e| e.to_string())?;
    Ok(RecordMeta {
        signer: env.signer.to_vec(),
        expires_unix_ms: env.expires_ms,
        seq: env.seq,
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
        if !matches!(env.kind, Kind::TreeUpdate | Kind::Notice) {
            return None;
        }
        env.verify(now_ms()).ok()?;
        // The signer must be the author: nobody announces tree positions for someone else.
        if public_of_peer(author)? != env.signer {
            return None;
        }
        let plain = keys.open(env.kind, &env.payload).ok()?;
        let ok = match env.kind {
            Kind::TreeUpdate => wire::decode::<wire::TreeUpdate>(&plain)
                .map(|u| u.peer.0 == env.signer)
                .unwrap_or(false),
            Kind::Notice => wire::decode::<wire::Notice>(&plain)
                .map(|n| n.from.0 == env.signer)
                .unwrap_or(false),
            _ => false,
        };
        ok.then_some((env, plain))
    }

    /// The validator handed to the network actor.
    pub fn validator(&self) -> crate::net::GossipValidator {
        let me = self.clone();
        Arc::new(move |topic: &str, author: &PeerId, data: &[u8]| {
            me.open_gossip(topic, author, data).is_some()
        })
    }
}
