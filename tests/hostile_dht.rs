//! A stranger floods a node's DHT store: thousands of validly signed records of DHT kinds, any
//! key, from peers that know no room password. The node must go on serving its own room:
//! a broadcast that started before the flood keeps refreshing its record (a peer sees a newer
//! one), and a broadcast started after the flood starts.
//!
//! Before the store defences (issue 16) the flood filled the 4,096-record store in well under a
//! minute (expired records kept counting until kad's hourly sweep),
//! after which every put of the node's own failed: the broadcast could not start and the live
//! room's record was never refreshed.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use support::room::{builder, clip};
use support::wait_for;
use waterfall::crypto::{Identity, Kind, now_ms, random_bytes};
use waterfall::net::{GossipValidator, GossipVerdict, Net, NetConfig, NetError};
use waterfall::wire::{self, Envelope};
use waterfall::{Node, RoomConfig};

/// Flooding peers, and the records each one puts.
const ATTACKERS: usize = 2;
const PUTS_EACH: usize = 2_300;
/// Signers an attacker rotates through (a per-signer quota alone does not stop it).
const SIGNERS_EACH: usize = 40;
/// Puts in flight per attacker.
const IN_FLIGHT: usize = 48;

fn tcp_addr(addrs: &[Multiaddr], peer: PeerId) -> Multiaddr {
    addrs
        .iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .expect("a tcp address")
        .clone()
        .with_p2p(peer)
        .unwrap_or_else(|a| a)
}

/// A bare swarm with the real record validator: what a stranger runs to flood the DHT.
async fn attacker(target: Multiaddr) -> Net {
    let id = Identity::generate();
    let gossip: GossipValidator = Arc::new(|_: &str, _: &PeerId, _: &[u8]| GossipVerdict::Reject);
    let config = NetConfig::new(
        id.to_libp2p(),
        Arc::new(waterfall::node::records::validate_record),
        gossip,
    );
    let (net, _events) = Net::spawn(config).await.expect("attacker spawns");
    net.dial(target).await.expect("attacker dials the node");
    net
}

/// Put `n` validly signed offer blobs and room-record envelopes under random keys; returns
/// how many a peer acknowledged.
async fn flood(net: &Net, n: usize) -> usize {
    let signers: Vec<Identity> = (0..SIGNERS_EACH).map(|_| Identity::generate()).collect();
    futures::stream::iter(0..n)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Kind::Offer
            } else {
                Kind::RoomRecord
            };
            let env = signers[i % SIGNERS_EACH].seal_envelope(
                kind,
                1,
                now_ms() + 60_000,
                random_bytes::<64>().to_vec(),
            );
            let key = random_bytes::<32>().to_vec();
            // A minute from now, as signalling blobs: the flooder need not republish them, so
            // the test measures the flood, not the flooder's upkeep. A longer claimed lifetime
            // changes nothing at the node: it holds these kinds for their hold time at most.
            async move { net.put_record(key, wire::encode(&env)).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await
}

fn seq_of(bytes: &[u8]) -> u64 {
    wire::decode::<Envelope>(bytes).map(|e| e.seq).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_flood_by_a_stranger_leaves_broadcasts_working() {
    tokio::time::timeout(Duration::from_secs(400), async {
        let host = builder().spawn().await.expect("host starts");
        let host_addr = tcp_addr(&host.net().listen_addrs().await.unwrap(), host.peer_id());
        // An honest DHT peer that stores the host's records (and is flooded too).
        let peer = builder()
            .bootstrap(vec![host_addr.clone()])
            .spawn()
            .await
            .expect("peer starts");
        assert!(
            wait_for(Duration::from_secs(10), || async {
                peer.net().status().await.unwrap().dht_peers >= 1
                    && host.net().status().await.unwrap().dht_peers >= 1
            })
            .await,
            "host and peer never met in the DHT"
        );

        let (live, _live_events) = host
            .broadcast(
                RoomConfig::new("before-flood")
                    .password("pw")
                    .source(clip("f.ivf", Some(1000)).await),
            )
            .await
            .expect("the first broadcast starts");
        let locator = live.keys().locator().to_vec();
        let first_seq = wait_seq(&peer, &locator, 0).await;

        let t0 = Instant::now();
        let mut floods = Vec::new();
        for _ in 0..ATTACKERS {
            let a = attacker(host_addr.clone()).await;
            floods.push(tokio::spawn(async move {
                let acked = flood(&a, PUTS_EACH).await;
                (a, acked)
            }));
        }
        let mut acked = 0;
        let mut attackers = Vec::new();
        for f in floods {
            let (a, n) = f.await.expect("flood task");
            acked += n;
            attackers.push(a);
        }
        let host_records = host.net().status().await.unwrap().dht_records;
        let peer_records = peer.net().status().await.unwrap().dht_records;
        eprintln!(
            "flood: {} puts, {acked} acknowledged in {:?}; host stores {host_records}, peer stores \
             {peer_records} records",
            ATTACKERS * PUTS_EACH,
            t0.elapsed()
        );

        // A broadcast started under the flood starts.
        let started = host
            .broadcast(
                RoomConfig::new("after-flood")
                    .password("pw")
                    .source(clip("f.ivf", Some(1000)).await),
            )
            .await;
        assert!(
            started.is_ok(),
            "a broadcast after the flood did not start: {:?}",
            started.err()
        );

        // The live room's record is refreshed (every ROOM_REFRESH) and reaches the peer.
        let refreshed = wait_seq(&peer, &locator, first_seq).await;
        assert!(refreshed > first_seq);
        eprintln!("room record refreshed after the flood: seq {first_seq} -> {refreshed}");
        for a in attackers {
            a.shutdown().await;
        }
        drop(started);
        drop(live);
        peer.shutdown().await;
        host.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Waits (at most a refresh period and a margin) until `node` finds a copy of the record under
/// `key` with a sequence number above `above`; returns it.
async fn wait_seq(node: &Node, key: &[u8], above: u64) -> u64 {
    let best = std::cell::Cell::new(0);
    let found = wait_for(
        waterfall::node::ROOM_REFRESH + Duration::from_secs(15),
        || {
            let key = key.to_vec();
            let best = &best;
            async move {
                match node.net().get_record(key, Duration::from_secs(3)).await {
                    Ok(values) => {
                        best.set(values.iter().map(|v| seq_of(v)).max().unwrap_or(0));
                        best.get() > above
                    }
                    Err(NetError::NotFound | NetError::Timeout) => false,
                    Err(e) => panic!("lookup failed: {e}"),
                }
            }
        },
    )
    .await;
    assert!(
        found,
        "no copy of the room record newer than seq {above} reached the peer (best {})",
        best.get()
    );
    best.get()
}
