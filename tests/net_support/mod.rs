//! Shared helpers of the `net_*` integration tests (the swarm alone, no rooms): a signed test
//! record format, validators and node spawning on loopback. Polling and the rest that every test
//! uses are in `support`.
#![allow(dead_code)]

use std::sync::Arc;

use libp2p::{
    Multiaddr, PeerId,
    identity::{Keypair, ed25519},
};
use tokio::sync::mpsc;
use waterfall::net::{
    GossipValidator, GossipVerdict, Net, NetConfig, NetEvent, RecordMeta, RecordValidator,
    records::now_unix_ms,
};

/// Test record: `signer(32) || seq(8, BE) || expires_unix_ms(8, BE) || sig(64) || payload`,
/// the ed25519 signature covering `key || seq || expires || payload`.
pub fn signed_record(
    kp: &ed25519::Keypair,
    key: &[u8],
    seq: u64,
    expires_unix_ms: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut msg = key.to_vec();
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(&expires_unix_ms.to_be_bytes());
    msg.extend_from_slice(payload);
    let sig = kp.sign(&msg);
    let mut v = kp.public().to_bytes().to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&expires_unix_ms.to_be_bytes());
    v.extend_from_slice(&sig);
    v.extend_from_slice(payload);
    v
}

/// The payload of a test record (no checks).
pub fn payload(v: &[u8]) -> &[u8] {
    &v[112..]
}

fn u64_at(v: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Verifies [`signed_record`]s.
pub fn record_validator() -> RecordValidator {
    Arc::new(|key: &[u8], v: &[u8]| {
        if v.len() < 112 {
            return Err("too short".into());
        }
        let pk = ed25519::PublicKey::try_from_bytes(&v[..32]).map_err(|e| e.to_string())?;
        let (seq, exp) = (u64_at(v, 32), u64_at(v, 40));
        let mut msg = key.to_vec();
        msg.extend_from_slice(&v[32..48]);
        msg.extend_from_slice(&v[112..]);
        if !pk.verify(&msg, &v[48..112]) {
            return Err("bad signature".into());
        }
        Ok(RecordMeta {
            signer: v[..32].to_vec(),
            expires_unix_ms: exp,
            seq,
            hold_for: waterfall::net::MAX_RECORD_LIFETIME,
        })
    })
}

/// A validator that believes anything: what a malicious node runs to push garbage.
pub fn gullible_record_validator() -> RecordValidator {
    Arc::new(|_k: &[u8], _v: &[u8]| {
        Ok(RecordMeta {
            signer: vec![0; 32],
            expires_unix_ms: now_unix_ms() + 60_000,
            seq: 0,
            hold_for: waterfall::net::MAX_RECORD_LIFETIME,
        })
    })
}

/// Gossip is valid when it starts with `WF:`.
pub fn gossip_validator() -> GossipValidator {
    Arc::new(|_t: &str, _p: &PeerId, d: &[u8]| {
        if d.starts_with(b"WF:") {
            GossipVerdict::Accept
        } else {
            GossipVerdict::Reject
        }
    })
}

pub fn accept_all_gossip() -> GossipValidator {
    Arc::new(|_t: &str, _p: &PeerId, _d: &[u8]| GossipVerdict::Accept)
}

pub fn config(kp: Keypair) -> NetConfig {
    NetConfig::new(kp, record_validator(), gossip_validator())
}

pub struct Node {
    pub net: Net,
    pub events: mpsc::Receiver<NetEvent>,
    pub key: ed25519::Keypair,
}

impl Node {
    pub async fn spawn_with(cfg: impl FnOnce(&mut NetConfig)) -> Node {
        let key = ed25519::Keypair::generate();
        let mut c = config(Keypair::from(key.clone()));
        cfg(&mut c);
        let (net, events) = Net::spawn(c).await.expect("spawn net");
        Node { net, events, key }
    }

    pub async fn spawn() -> Node {
        Self::spawn_with(|_| {}).await
    }

    /// The TCP listen address with `/p2p/<id>` appended.
    pub async fn addr(&self) -> Multiaddr {
        let addrs = self.net.listen_addrs().await.expect("listen addrs");
        let tcp = addrs
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .expect("a tcp listener");
        tcp.with(libp2p::multiaddr::Protocol::P2p(self.net.local_peer_id()))
    }

    pub fn peer_id(&self) -> PeerId {
        self.net.local_peer_id()
    }
}
