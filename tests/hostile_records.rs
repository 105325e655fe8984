//! Room-record squatting: a member who knows the room's name and password signs a record of its
//! own under the room's locator, with a sequence number far above the broadcaster's.
//!
//! Before issue 16 a lookup by name took the highest sequence number from any signer, so the
//! squatter won, and the broadcaster's sequence restarted at 1 each run. Now the sequence
//! follows the wall clock, a lookup by name prefers the broadcaster this node pinned earlier (a
//! ticket it used), and a node with no pin is told that several signers claim the name.

mod support;

use std::time::Duration;

use support::room::{builder, clip};
use support::wait_for;
use waterfall::crypto::{Identity, Kind, now_ms};
use waterfall::net::peer_of;
use waterfall::wire::{self, Envelope, RoomRecord};
use waterfall::{Node, RoomConfig};

fn tcp_addrs(addrs: Vec<libp2p::Multiaddr>) -> Vec<libp2p::Multiaddr> {
    addrs
        .into_iter()
        .filter(|a| a.to_string().contains("/tcp/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_room_name_resolves_to_the_pinned_broadcaster_and_is_reported() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let host = builder().spawn().await.expect("host starts");
        let boot = tcp_addrs(host.addrs().await.unwrap());
        let viewer = node(&boot).await;
        let squatter = node(&boot).await;
        for n in [&host, &viewer, &squatter] {
            assert!(
                wait_for(Duration::from_secs(10), || async {
                    n.net().status().await.unwrap().dht_peers >= 2
                })
                .await,
                "the DHT did not form"
            );
        }
        let keys = host.room_keys("squat-me", Some("pw")).await.unwrap();

        // The squatter, a member, claims the name first with a far "newer" record of its own.
        let sq_id = squatter.identity().clone();
        let fake = RoomRecord {
            v: wire::VERSION,
            broadcaster: sq_id.node_id(),
            addrs: Vec::new(),
            tracks: Vec::new(),
            data: false,
            fanout: 4,
            bitrate_kbps: 500,
            created_ms: now_ms(),
            expires_ms: now_ms() + 600_000,
            seq: u64::MAX / 2,
        };
        let _ = squatter
            .net()
            .put_record(
                keys.locator().to_vec(),
                wire::encode(&squat(&sq_id, &keys, &fake)),
            )
            .await;
        assert!(
            wait_for(Duration::from_secs(10), || async {
                host.net().status().await.unwrap().dht_records >= 1
            })
            .await,
            "the host never stored the squatter's record"
        );

        // The broadcast starts all the same: a copy someone else put does not own our store.
        let started_ms = now_ms();
        let (room, _events) = host
            .broadcast(
                RoomConfig::new("squat-me")
                    .password("pw")
                    .source(clip("f.ivf", Some(1000)).await),
            )
            .await
            .expect("the broadcast starts on a squatted name");
        let ticket = room.ticket().clone();

        // The record's sequence follows the wall clock (a restart cannot go back to 1).
        let own = host
            .net()
            .get_record(keys.locator().to_vec(), Duration::from_secs(3))
            .await
            .expect("the host finds its own record");
        let env: Envelope = wire::decode(&own[0]).unwrap();
        assert!(
            env.seq >= started_ms,
            "sequence {} does not follow the clock ({started_ms})",
            env.seq
        );

        // The viewer uses the ticket once: that pins the broadcaster for the room...
        let rec = viewer
            .lookup_room(&keys, Some(&ticket))
            .await
            .expect("lookup with the ticket");
        assert_eq!(rec.broadcaster, host.identity().node_id());
        // ...so a lookup by name later takes the real broadcaster, and says the name is
        // contested.
        let rec = viewer
            .lookup_room(&keys, None)
            .await
            .expect("lookup by name");
        assert_eq!(
            rec.broadcaster,
            host.identity().node_id(),
            "a lookup by name took the squatter's record"
        );
        let found = viewer
            .lookup_room_claims(&keys, None)
            .await
            .expect("lookup by name");
        let c = found.contest.expect("the viewer is told of the contest");
        assert!(c.pinned);
        assert_eq!(c.chosen, peer_of(host.identity().node_id()));

        // A newcomer with no pin sees both claims and is told that nothing pinned the choice.
        let newcomer = node(&boot).await;
        let contest = std::sync::Mutex::new(None);
        let seen = wait_for(Duration::from_secs(30), || {
            let (n, k, c) = (&newcomer, &keys, &contest);
            async move {
                if let Ok(found) = n.lookup_room_claims(k, None).await {
                    *c.lock().unwrap() = found.contest;
                }
                c.lock().unwrap().is_some()
            }
        })
        .await;
        assert!(
            seen,
            "a newcomer was not told that two signers claim the name"
        );
        let contest = contest.into_inner().unwrap().unwrap();
        eprintln!("newcomer: {contest}");
        assert_eq!(contest.claimants.len(), 2);
        assert!(contest.claimants.contains(&host.peer_id()));
        assert!(contest.claimants.contains(&squatter.peer_id()));
        assert!(!contest.pinned);

        drop(room);
        for n in [newcomer, squatter, viewer, host] {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

async fn node(boot: &[libp2p::Multiaddr]) -> Node {
    builder()
        .bootstrap(boot.to_vec())
        .spawn()
        .await
        .expect("node starts")
}

/// The squatter's envelope: a record sealed with the room's key, signed by the squatter.
fn squat(id: &Identity, keys: &waterfall::RoomKeys, rec: &RoomRecord) -> Envelope {
    id.seal_envelope(
        Kind::RoomRecord,
        rec.seq,
        now_ms() + 3_600_000,
        keys.seal(Kind::RoomRecord, &wire::encode(rec)),
    )
}

/// Records that expired on the way (or whose signer's clock is behind) are refused without
/// blame: before issue 16 each counted as invalid, and three got an honest peer banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_earn_their_sender_no_ban() {
    use std::sync::Arc;
    use waterfall::net::{GossipVerdict, Net, NetConfig, RecordMeta};
    tokio::time::timeout(Duration::from_secs(60), async {
        let host = builder().spawn().await.expect("host starts");
        let boot = tcp_addrs(host.addrs().await.unwrap());
        // A sender whose own check lets late records through (its clock is behind).
        let id = Identity::generate();
        let behind = Arc::new(|_: &[u8], v: &[u8]| {
            let env: Envelope = wire::decode(v).map_err(|e| e.to_string())?;
            Ok(RecordMeta {
                signer: env.signer.0.to_vec(),
                expires_unix_ms: now_ms() + 60_000,
                seq: env.seq,
                hold_for: Duration::from_secs(60),
            })
        });
        let gossip = Arc::new(|_: &str, _: &libp2p::PeerId, _: &[u8]| GossipVerdict::Ignore);
        let (net, _events) = Net::spawn(NetConfig::new(id.to_libp2p(), behind, gossip))
            .await
            .expect("sender spawns");
        let host_peer = net.dial(boot[0].clone()).await.expect("dial host");
        assert!(
            wait_for(Duration::from_secs(10), || async {
                net.status().await.unwrap().dht_peers >= 1
            })
            .await
        );
        for i in 0..6u8 {
            let env = id.seal_envelope(Kind::Offer, 1, now_ms() - 1_000, vec![i; 8]);
            let _ = net.put_record(vec![i; 32], wire::encode(&env)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            net.connected_peers().await.unwrap().contains(&host_peer),
            "the host banned a peer for records that had merely expired"
        );
        assert_eq!(host.net().status().await.unwrap().dht_records, 0);
        net.shutdown().await;
        host.shutdown().await;
    })
    .await
    .expect("test timed out");
}
