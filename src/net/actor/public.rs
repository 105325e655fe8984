//! The public Amino DHT (`/ipfs/kad/1.0.0`, opt-in): provider records only.
//!
//! What go and js Amino nodes expect, and how this follows it:
//! - provider keys are multihashes: a key the application provides is announced as the
//!   sha2-256 multihash of its bytes ([`amino_key`]); servers reject or ignore other keys;
//! - a provider record carries the provider's addresses, and libp2p-kad takes them from the
//!   swarm's *confirmed* external addresses: a record sent before AutoNAT (or a relay) confirmed
//!   one carries none, and nobody can dial the provider. So every provided key is announced
//!   again as soon as the confirmed addresses change, and on [`REPROVIDE_INTERVAL`] while it
//!   is provided;
//! - announcing needs peers: a key is provided once the routing table has an entry (the
//!   first public DHT peer also triggers a bootstrap lookup), not at start with an empty table;
//! - lookups dial each provider while the query that found it is still running: the addresses
//!   a provider record carries live only in that query (kad keeps no address book for peers
//!   outside its routing table).
//!
//! Failures (no public DHT peer after [`EMPTY_TABLE_GRACE`], an announcement no server
//! accepted) are notices, not only logs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{
    PeerId,
    kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey},
    swarm::dial_opts::{DialOpts, PeerCondition},
};
use tokio::sync::oneshot;
use tracing::debug;

use super::Actor;
use crate::net::{NetError, NetNotice, Result};

/// A provided key is announced again this often (kad's own republication is 12 h).
pub(crate) const REPROVIDE_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// A failed announcement is retried after this long.
const PROVIDE_RETRY: Duration = Duration::from_secs(30);
/// Keys provided at once.
pub(crate) const MAX_PROVIDED: usize = 64;
/// Provider lookups at once.
const MAX_FINDS: usize = 16;
/// Providers collected per lookup.
const MAX_PROVIDERS: usize = 16;
/// After the first provider is found, how long a lookup keeps collecting.
const FIND_GRACE: Duration = Duration::from_secs(1);
/// No public DHT peer this long after start is announced as a failure.
const EMPTY_TABLE_GRACE: Duration = Duration::from_secs(30);

/// The key announced on the public DHT for `key`: the sha2-256 multihash of its bytes.
pub(crate) fn amino_key(key: &[u8]) -> RecordKey {
    use sha2::Digest;
    let mut mh = vec![0x12, 0x20];
    mh.extend_from_slice(&sha2::Sha256::digest(key));
    RecordKey::new(&mh)
}

#[derive(Default)]
struct Provided {
    /// When the last announcement succeeded.
    last: Option<Instant>,
    /// Not before this (after a failure).
    not_before: Option<Instant>,
    in_flight: Option<QueryId>,
}

struct PendingFind {
    deadline: Instant,
    found: Vec<PeerId>,
    reply: oneshot::Sender<Result<Vec<PeerId>>>,
}

pub(crate) struct Public {
    provided: HashMap<RecordKey, Provided>,
    announcing: HashMap<QueryId, RecordKey>,
    finds: HashMap<QueryId, PendingFind>,
    bootstrapped: bool,
    started: Instant,
    empty_told: bool,
}

impl Public {
    pub(crate) fn new() -> Self {
        Public {
            provided: HashMap::new(),
            announcing: HashMap::new(),
            finds: HashMap::new(),
            bootstrapped: false,
            started: Instant::now(),
            empty_told: false,
        }
    }
}

impl Actor {
    fn public_table_size(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .public_kad
            .as_mut()
            .map(|k| k.kbuckets().map(|b| b.num_entries()).sum())
            .unwrap_or(0)
    }

    /// Keep announcing `key` (as [`amino_key`]) until [`Actor::public_stop`].
    pub(super) fn public_provide(&mut self, key: &[u8]) -> Result<()> {
        if self.swarm.behaviour().public_kad.as_ref().is_none() {
            return Err(NetError::PublicDhtDisabled);
        }
        let key = amino_key(key);
        if !self.amino.provided.contains_key(&key) && self.amino.provided.len() >= MAX_PROVIDED {
            return Err(NetError::Busy);
        }
        self.amino.provided.entry(key).or_default();
        self.public_announce_due();
        Ok(())
    }

    pub(super) fn public_stop(&mut self, key: &[u8]) -> bool {
        let key = amino_key(key);
        let known = self.amino.provided.remove(&key).is_some();
        if let Some(k) = self.swarm.behaviour_mut().public_kad.as_mut() {
            k.stop_providing(&key);
        }
        known
    }

    /// Announce every provided key that is due, if the routing table has peers.
    fn public_announce_due(&mut self) {
        if self.amino.provided.is_empty() || self.public_table_size() == 0 {
            return;
        }
        let now = Instant::now();
        let due: Vec<RecordKey> = self
            .amino
            .provided
            .iter()
            .filter(|(_, p)| {
                p.in_flight.is_none()
                    && p.not_before.is_none_or(|t| t <= now)
                    && p.last
                        .is_none_or(|t| now.duration_since(t) >= REPROVIDE_INTERVAL)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(k) = self.swarm.behaviour_mut().public_kad.as_mut() else {
                return;
            };
            match k.start_providing(key.clone()) {
                Ok(id) => {
                    self.amino.announcing.insert(id, key.clone());
                    if let Some(p) = self.amino.provided.get_mut(&key) {
                        p.in_flight = Some(id);
                    }
                }
                Err(e) => {
                    if let Some(p) = self.amino.provided.get_mut(&key) {
                        p.not_before = Some(now + PROVIDE_RETRY);
                    }
                    self.reach.tell(NetNotice::PublicDhtFailed {
                        what: "provide",
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    /// Our confirmed addresses changed: announce again, so provider records carry them.
    pub(super) fn public_addresses_changed(&mut self) {
        for p in self.amino.provided.values_mut() {
            p.last = None;
        }
        self.public_announce_due();
    }

    /// A peer speaking the public DHT protocol identified itself.
    pub(super) fn public_peer_found(&mut self) {
        if !self.amino.bootstrapped
            && let Some(k) = self.swarm.behaviour_mut().public_kad.as_mut()
        {
            // First public peer: look ourselves up so the table fills beyond the bootstrap.
            self.amino.bootstrapped = k.bootstrap().is_ok();
        }
        self.public_announce_due();
    }

    /// Look up the providers of `key` (as [`amino_key`]) and dial each as it is found.
    pub(super) fn public_find(
        &mut self,
        key: &[u8],
        timeout: Duration,
        reply: oneshot::Sender<Result<Vec<PeerId>>>,
    ) {
        if self.amino.finds.len() >= MAX_FINDS {
            let _ = reply.send(Err(NetError::Busy));
            return;
        }
        let Some(k) = self.swarm.behaviour_mut().public_kad.as_mut() else {
            let _ = reply.send(Err(NetError::PublicDhtDisabled));
            return;
        };
        let id = k.get_providers(amino_key(key));
        self.amino.finds.insert(
            id,
            PendingFind {
                deadline: Instant::now() + timeout,
                found: Vec::new(),
                reply,
            },
        );
    }

    fn public_finish_find(&mut self, id: QueryId) {
        if let Some(k) = self.swarm.behaviour_mut().public_kad.as_mut()
            && let Some(mut q) = k.query_mut(&id)
        {
            q.finish();
        }
        if let Some(f) = self.amino.finds.remove(&id) {
            let r = if f.found.is_empty() {
                Err(NetError::NotFound)
            } else {
                Ok(f.found)
            };
            let _ = f.reply.send(r);
        }
    }

    pub(super) fn public_housekeeping(&mut self) {
        if self.swarm.behaviour().public_kad.as_ref().is_none() {
            return;
        }
        let now = Instant::now();
        let due: Vec<QueryId> = self
            .amino
            .finds
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.public_finish_find(id);
        }
        if !self.amino.empty_told
            && now.duration_since(self.amino.started) >= EMPTY_TABLE_GRACE
            && self.public_table_size() == 0
        {
            self.amino.empty_told = true;
            self.reach.tell(NetNotice::PublicDhtFailed {
                what: "bootstrap",
                error: format!(
                    "no public DHT peer after {} s: check --bootstrap and the network",
                    EMPTY_TABLE_GRACE.as_secs()
                ),
            });
        }
        self.public_announce_due();
    }

    pub(super) fn on_public_kad(&mut self, ev: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = ev
        else {
            return;
        };
        match result {
            QueryResult::StartProviding(r) => {
                let Some(key) = self.amino.announcing.remove(&id) else {
                    return;
                };
                let now = Instant::now();
                let Some(p) = self.amino.provided.get_mut(&key) else {
                    return; // stopped meanwhile
                };
                p.in_flight = None;
                match r {
                    Ok(_) => {
                        debug!(key = %hex::encode(key.as_ref()), "provided on the public DHT");
                        p.last = Some(now);
                    }
                    Err(e) => {
                        p.not_before = Some(now + PROVIDE_RETRY);
                        self.reach.tell(NetNotice::PublicDhtFailed {
                            what: "provide",
                            error: e.to_string(),
                        });
                    }
                }
            }
            QueryResult::GetProviders(r) => {
                let me = *self.swarm.local_peer_id();
                let mut dial = Vec::new();
                if let Some(f) = self.amino.finds.get_mut(&id) {
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = r {
                        for p in providers {
                            if p != me && !f.found.contains(&p) && f.found.len() < MAX_PROVIDERS {
                                f.found.push(p);
                                dial.push(p);
                            }
                        }
                        if !f.found.is_empty() {
                            f.deadline = f.deadline.min(Instant::now() + FIND_GRACE);
                        }
                    }
                } else {
                    return;
                }
                for p in dial {
                    // Now, while the query holds the addresses the provider record carried.
                    let opts = DialOpts::peer_id(p)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(peer = %p, error = %e, "dialling a provider failed");
                    }
                }
                if step.last {
                    self.public_finish_find(id);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_keys_are_sha2_256_multihashes() {
        let k = amino_key(b"/waterfall/v1/nodes");
        // 0x12 = sha2-256, 0x20 = 32 bytes, then the digest (checked against Python's hashlib).
        assert_eq!(
            hex::encode(k.as_ref()),
            "122002da25b88ef89e864632ebfe7282c88e11379e1a59f71ab9055dda0c5efae02f"
        );
        assert_ne!(amino_key(b"a"), amino_key(b"b"));
    }
}
