//! The waterfall DHT's record store: this node's own records apart from those it keeps for
//! others, and quotas on the latter.
//!
//! libp2p's `MemoryStore` is one pool with a record cap: a stranger who puts 4,096 signed
//! records fills it, after which this node's own puts (its room record, its signalling blobs)
//! fail. Here the pools are separate and each is bounded on its own:
//!
//! - **own** records (published by this node, `publisher` = local peer) are never evicted by
//!   anything others do; their number is bounded by [`MAX_OWN_RECORDS`] and by what this node
//!   chooses to publish;
//! - **foreign** records are held for others under three quotas: per peer that sent them
//!   ([`MAX_PER_SOURCE`]), per signer ([`MAX_PER_SIGNER`]) and in total ([`MAX_FOREIGN`]).
//!   A full pool makes room by evicting a record of the source holding the most, and only if
//!   that source holds more than the newcomer's: a flood from a few identities costs honest
//!   peers nothing, a flood from many identities (bounded by the connection limits per IP)
//!   shares the pool with them.
//!
//! Expiry is the record's own (`Record::expires`, set by the actor from the signed expiry and
//! the per-kind hold time, [`super::RecordMeta::hold_for`]); [`GuardedStore::sweep`] drops
//! expired records on the actor's short timer rather than kad's hourly job.
//!
//! Provider records (unused on the waterfall DHT) go to a bounded inner `MemoryStore`.

use std::{
    borrow::Cow,
    collections::{HashMap, hash_map::Entry},
    time::Instant,
};

use libp2p::{
    PeerId,
    kad::{
        ProviderRecord, Record, RecordKey,
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
    },
};

use super::MAX_RECORD_BYTES;

/// This node's own live records at most (room records and signalling blobs it published).
pub const MAX_OWN_RECORDS: usize = 4096;
/// Records held for others at most (8 KiB each: 32 MiB worst case).
pub const MAX_FOREIGN: usize = 4096;
/// Records held for others that one peer may have put. An honest peer puts a few signalling
/// blobs per join and one room record; kad's replication re-sends what a peer holds for others,
/// which short per-kind lifetimes keep small.
pub const MAX_PER_SOURCE: usize = 256;
/// Records held for others signed by one identity (an honest node has a few live blobs).
pub const MAX_PER_SIGNER: usize = 64;

/// Why a record for others was not stored (none of these is misbehaviour on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreRefusal {
    /// The sending peer holds its quota.
    SourceQuota,
    /// The signer holds its quota.
    SignerQuota,
    /// The pool is full of records of sources that hold no more than this one.
    Full,
    /// The value exceeds [`MAX_RECORD_BYTES`].
    TooLarge,
}

struct Foreign {
    record: Record,
    source: PeerId,
    signer: Vec<u8>,
}

pub(crate) struct GuardedStore {
    local: PeerId,
    own: HashMap<RecordKey, Record>,
    foreign: HashMap<RecordKey, Foreign>,
    per_source: HashMap<PeerId, usize>,
    per_signer: HashMap<Vec<u8>, usize>,
    providers: MemoryStore,
}

impl GuardedStore {
    pub(crate) fn new(local: PeerId) -> Self {
        Self {
            local,
            own: HashMap::new(),
            foreign: HashMap::new(),
            per_source: HashMap::new(),
            per_signer: HashMap::new(),
            providers: MemoryStore::with_config(
                local,
                MemoryStoreConfig {
                    max_records: 0,
                    ..Default::default()
                },
            ),
        }
    }

    /// Our own live copy under `key`, if any (the one our puts are checked against).
    pub(crate) fn own(&self, key: &RecordKey) -> Option<&Record> {
        self.own.get(key)
    }

    /// Forget our own copy under `key` (a copy held for others stays).
    pub(crate) fn remove_own(&mut self, key: &RecordKey) {
        self.own.remove(key);
    }

    /// Records held: (own, for others).
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.own.len(), self.foreign.len())
    }

    /// Store `record` for others: `source` sent it, `signer` signed it. Replaces the copy of
    /// the same key (the caller checked ownership and sequence), else takes a quota slot.
    pub(crate) fn put_foreign(
        &mut self,
        record: Record,
        source: PeerId,
        signer: Vec<u8>,
    ) -> Result<(), StoreRefusal> {
        if record.value.len() > MAX_RECORD_BYTES {
            return Err(StoreRefusal::TooLarge);
        }
        // An update of a key already held frees that slot first (its counts move to the
        // newcomer's source and signer).
        let old = self.remove_foreign(&record.key);
        let src_n = self.per_source.get(&source).copied().unwrap_or(0);
        let refusal = if src_n >= MAX_PER_SOURCE {
            Some(StoreRefusal::SourceQuota)
        } else if self.per_signer.get(&signer).copied().unwrap_or(0) >= MAX_PER_SIGNER {
            Some(StoreRefusal::SignerQuota)
        } else if self.foreign.len() >= MAX_FOREIGN && !self.evict_for(src_n) {
            Some(StoreRefusal::Full)
        } else {
            None
        };
        if let Some(r) = refusal {
            // The update was refused: the old copy stays.
            if let Some(f) = old {
                self.insert_foreign(f);
            }
            return Err(r);
        }
        self.insert_foreign(Foreign {
            record,
            source,
            signer,
        });
        Ok(())
    }

    fn insert_foreign(&mut self, f: Foreign) {
        *self.per_source.entry(f.source).or_default() += 1;
        *self.per_signer.entry(f.signer.clone()).or_default() += 1;
        self.foreign.insert(f.record.key.clone(), f);
    }

    fn remove_foreign(&mut self, key: &RecordKey) -> Option<Foreign> {
        let f = self.foreign.remove(key)?;
        decrement(&mut self.per_source, &f.source);
        decrement(&mut self.per_signer, &f.signer);
        Some(f)
    }

    /// Make room for a record of a source holding `newcomer` records: evict the record closest
    /// to expiry of the source holding the most, if that is more than `newcomer + 1` (so that
    /// two sources never trade places back and forth).
    fn evict_for(&mut self, newcomer: usize) -> bool {
        let Some((&top, &n)) = self.per_source.iter().max_by_key(|(_, n)| **n) else {
            return false;
        };
        if n <= newcomer + 1 {
            return false;
        }
        let victim = self
            .foreign
            .iter()
            .filter(|(_, f)| f.source == top)
            .min_by_key(|(_, f)| f.record.expires)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => self.remove_foreign(&k).is_some(),
            None => false,
        }
    }

    /// Drop every expired record, own and foreign.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.own.retain(|_, r| !r.is_expired(now));
        let expired: Vec<RecordKey> = self
            .foreign
            .iter()
            .filter(|(_, f)| f.record.is_expired(now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.remove_foreign(&k);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = map.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            map.remove(k);
        }
    }
}

impl RecordStore for GuardedStore {
    type RecordsIter<'a> = Box<dyn Iterator<Item = Cow<'a, Record>> + 'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.own
            .get(k)
            .or_else(|| self.foreign.get(k).map(|f| &f.record))
            .map(Cow::Borrowed)
    }

    /// Kad calls this for our own puts (`publisher` = local peer). A record of anyone else
    /// arriving here (kad does not, with `FilterBoth`) is held for its publisher, signer unknown.
    fn put(&mut self, r: Record) -> store::Result<()> {
        if r.value.len() > MAX_RECORD_BYTES {
            return Err(store::Error::ValueTooLarge);
        }
        match r.publisher {
            Some(p) if p == self.local => {
                let full = self.own.len() >= MAX_OWN_RECORDS;
                match self.own.entry(r.key.clone()) {
                    Entry::Occupied(mut e) => {
                        e.insert(r);
                    }
                    Entry::Vacant(_) if full => return Err(store::Error::MaxRecords),
                    Entry::Vacant(e) => {
                        e.insert(r);
                    }
                }
                Ok(())
            }
            publisher => {
                let source = publisher.unwrap_or(self.local);
                self.put_foreign(r, source, Vec::new())
                    .map_err(|_| store::Error::MaxRecords)
            }
        }
    }

    fn remove(&mut self, k: &RecordKey) {
        self.own.remove(k);
        self.remove_foreign(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        Box::new(
            self.own
                .values()
                .chain(self.foreign.values().map(|f| &f.record))
                .map(Cow::Borrowed),
        )
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.providers.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.providers.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.providers.remove_provider(k, p)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rec(key: &[u8], publisher: Option<PeerId>, ttl_s: u64) -> Record {
        let mut r = Record::new(key.to_vec(), vec![1; 16]);
        r.publisher = publisher;
        r.expires = Some(Instant::now() + Duration::from_secs(ttl_s));
        r
    }

    fn key(i: usize) -> Vec<u8> {
        format!("k{i}").into_bytes()
    }

    #[test]
    fn a_flood_from_one_peer_stops_at_its_quota_and_own_records_still_go_in() {
        let me = PeerId::random();
        let mut s = GuardedStore::new(me);
        let mallory = PeerId::random();
        let mut stored = 0;
        for i in 0..10_000 {
            let signer = vec![(i % 200) as u8];
            if s.put_foreign(rec(&key(i), None, 60), mallory, signer)
                .is_ok()
            {
                stored += 1;
            }
        }
        assert_eq!(stored, MAX_PER_SOURCE);
        assert!(s.put(rec(b"mine", Some(me), 60)).is_ok());
        assert_eq!(s.counts(), (1, MAX_PER_SOURCE));
    }

    #[test]
    fn one_signer_through_many_peers_stops_at_its_quota() {
        let mut s = GuardedStore::new(PeerId::random());
        let ok = (0..1000)
            .filter(|&i| {
                s.put_foreign(rec(&key(i), None, 60), PeerId::random(), vec![7])
                    .is_ok()
            })
            .count();
        assert_eq!(ok, MAX_PER_SIGNER);
    }

    #[test]
    fn a_full_pool_evicts_from_the_largest_source_only() {
        let mut s = GuardedStore::new(PeerId::random());
        // Sybils fill the pool, each at its quota.
        let sybils: Vec<PeerId> = (0..MAX_FOREIGN / MAX_PER_SOURCE)
            .map(|_| PeerId::random())
            .collect();
        let mut i = 0;
        for p in &sybils {
            for _ in 0..MAX_PER_SOURCE {
                let signer = i.to_string().into_bytes();
                s.put_foreign(rec(&key(i), None, 60), *p, signer).unwrap();
                i += 1;
            }
        }
        assert_eq!(s.counts().1, MAX_FOREIGN);
        // An honest newcomer still gets in, at a sybil's expense.
        let honest = PeerId::random();
        s.put_foreign(rec(b"honest", None, 60), honest, vec![1, 2])
            .unwrap();
        assert_eq!(s.counts().1, MAX_FOREIGN);
        assert!(s.get(&RecordKey::new(&b"honest")).is_some());
        // A sybil at its quota does not push out another sybil.
        let busiest = *s.per_source.iter().max_by_key(|(_, n)| **n).unwrap().0;
        assert!(
            s.put_foreign(rec(b"more", None, 60), busiest, vec![3])
                .is_err()
        );
    }

    #[test]
    fn own_records_are_kept_apart_and_sweep_drops_the_expired() {
        let me = PeerId::random();
        let mut s = GuardedStore::new(me);
        let other = PeerId::random();
        s.put_foreign(rec(b"a", None, 0), other, vec![1]).unwrap();
        s.put_foreign(rec(b"b", None, 60), other, vec![1]).unwrap();
        s.put(rec(b"b", Some(me), 60)).unwrap();
        // Our copy is the one served.
        assert_eq!(s.get(&RecordKey::new(&b"b")).unwrap().publisher, Some(me));
        s.sweep(Instant::now() + Duration::from_millis(1));
        assert_eq!(s.counts(), (1, 1));
        assert_eq!(s.per_source.get(&other), Some(&1));
        s.remove(&RecordKey::new(&b"b"));
        assert_eq!(s.counts(), (0, 0));
        assert!(s.per_source.is_empty() && s.per_signer.is_empty());
    }

    #[test]
    fn a_value_of_exactly_the_limit_is_stored() {
        // libp2p's MemoryStore refused values of `max_value_bytes` and more, while the
        // admission check allowed exactly MAX_RECORD_BYTES: a limit-sized record passed our
        // check and then failed to store.
        let me = PeerId::random();
        let mut s = GuardedStore::new(me);
        let mut r = rec(b"k", Some(me), 60);
        r.value = vec![0; MAX_RECORD_BYTES];
        assert!(s.put(r.clone()).is_ok());
        assert!(s.put_foreign(r, PeerId::random(), vec![1]).is_ok());
    }

    #[test]
    fn updates_keep_their_slot_and_refused_updates_keep_the_old_copy() {
        let mut s = GuardedStore::new(PeerId::random());
        let p = PeerId::random();
        for _ in 0..3 {
            s.put_foreign(rec(b"k", None, 60), p, vec![1]).unwrap();
        }
        assert_eq!(s.per_source.get(&p), Some(&1));
        let mut big = rec(b"k", None, 60);
        big.value = vec![0; MAX_RECORD_BYTES + 1];
        assert_eq!(s.put_foreign(big, p, vec![1]), Err(StoreRefusal::TooLarge));
        assert!(s.get(&RecordKey::new(&b"k")).is_some());
    }
}
