//! Waterfall DHT over real swarms on loopback: store/fetch, validation on put and get, ownership,
//! expiry, republishing and survival of a departed node.

mod net_support;
mod support;

use std::time::Duration;

use net_support::{Node, gullible_record_validator, payload, signed_record};
use support::wait_for;
use waterfall::net::{NetError, records::now_unix_ms};

const T: Duration = Duration::from_secs(60);
const GET: Duration = Duration::from_secs(10);

/// `n` nodes, every one after the first dialling the first; waits until each has a DHT peer.
async fn star(n: usize) -> Vec<Node> {
    let mut nodes = vec![Node::spawn().await];
    let hub = nodes[0].addr().await;
    for _ in 1..n {
        let node = Node::spawn().await;
        node.net.dial(hub.clone()).await.expect("dial hub");
        nodes.push(node);
    }
    for node in &nodes {
        assert!(
            wait_for(Duration::from_secs(10), || async {
                node.net.status().await.unwrap().dht_peers >= 1
            })
            .await,
            "node never got a DHT peer"
        );
    }
    nodes
}

async fn dht_ready(node: &Node, peers: usize) {
    assert!(
        wait_for(Duration::from_secs(10), || async {
            node.net.status().await.unwrap().dht_peers >= peers
        })
        .await,
        "DHT routing table never reached {peers} peers"
    );
}

#[tokio::test]
async fn three_nodes_store_and_fetch_and_survive_a_departure() {
    tokio::time::timeout(T, async {
        let nodes = star(3).await;
        // Leaves learn about each other through the hub's DHT.
        dht_ready(&nodes[1], 2).await;
        let key = b"room/alpha".to_vec();
        let value = signed_record(&nodes[1].key, &key, 1, now_unix_ms() + 60_000, b"hello");
        nodes[1]
            .net
            .put_record(key.clone(), value.clone())
            .await
            .expect("replicated put");
        for node in &nodes {
            let got = node.net.get_record(key.clone(), GET).await.expect("get");
            assert_eq!(got, vec![value.clone()]);
        }
        // The others store a copy: the writer leaving does not lose the record.
        nodes[1].net.shutdown().await;
        let t0 = std::time::Instant::now();
        let got = nodes[2]
            .net
            .get_record(key.clone(), GET)
            .await
            .expect("get after departure");
        assert_eq!(payload(&got[0]), b"hello");
        eprintln!("lookup after a departure: {:?}", t0.elapsed());
        let t0 = std::time::Instant::now();
        let r = nodes[2].net.get_record(b"room/none".to_vec(), GET).await;
        eprintln!(
            "missing-key lookup with a departed peer in the table: {:?}",
            t0.elapsed()
        );
        // NotFound, or Timeout while the departed peer's dial is still pending.
        assert!(
            matches!(r, Err(NetError::NotFound | NetError::Timeout)),
            "{r:?}"
        );
        // The hub keeps serving the remaining node.
        let v2 = signed_record(&nodes[2].key, b"k2", 1, now_unix_ms() + 60_000, b"x");
        nodes[2]
            .net
            .put_record(b"k2".to_vec(), v2.clone())
            .await
            .expect("put k2");
        assert_eq!(
            nodes[0].net.get_record(b"k2".to_vec(), GET).await.unwrap(),
            vec![v2]
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn forged_records_rejected_on_put_and_filtered_on_get() {
    tokio::time::timeout(T, async {
        let honest = star(2).await;
        // A malicious node whose own validator accepts anything.
        let evil = Node::spawn_with(|c| c.record_validator = gullible_record_validator()).await;
        evil.net.dial(honest[0].addr().await).await.unwrap();
        dht_ready(&evil, 2).await;
        dht_ready(&honest[1], 2).await;

        // Locally, an honest node refuses a forged record outright.
        let key = b"room/forged".to_vec();
        let mut forged = signed_record(&honest[1].key, &key, 1, now_unix_ms() + 60_000, b"real");
        let last = forged.len() - 1;
        forged[last] ^= 1; // payload no longer matches the signature
        assert!(matches!(
            honest[0].net.put_record(key.clone(), forged.clone()).await,
            Err(NetError::InvalidRecord(_))
        ));

        // The evil node pushes it anyway: peers acknowledge the put but do not store it.
        let _ = evil.net.put_record(key.clone(), forged.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for h in &honest {
            assert_eq!(h.net.status().await.unwrap().dht_records, 0);
        }
        // A get reaches the evil node's copy and filters it out.
        assert!(matches!(
            honest[1].net.get_record(key.clone(), GET).await,
            Err(NetError::NotFound)
        ));

        // Repeated garbage gets the sender blocked; the honest pair keeps working.
        for i in 0..3u8 {
            let _ = evil.net.put_record(vec![b'g', i], vec![0xee; 64]).await;
        }
        let evil_id = evil.peer_id();
        assert!(
            wait_for(Duration::from_secs(10), || async {
                !honest[0]
                    .net
                    .connected_peers()
                    .await
                    .unwrap()
                    .contains(&evil_id)
            })
            .await,
            "misbehaving peer still connected"
        );
        let ok = signed_record(&honest[0].key, b"after", 1, now_unix_ms() + 60_000, b"fine");
        honest[0]
            .net
            .put_record(b"after".to_vec(), ok.clone())
            .await
            .expect("put");
        assert_eq!(
            honest[1]
                .net
                .get_record(b"after".to_vec(), GET)
                .await
                .unwrap(),
            vec![ok]
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn only_the_signer_replaces_a_live_record() {
    tokio::time::timeout(T, async {
        let nodes = star(3).await;
        dht_ready(&nodes[1], 2).await;
        let key = b"room/owned".to_vec();
        let exp = now_unix_ms() + 60_000;
        let v1 = signed_record(&nodes[1].key, &key, 1, exp, b"v1");
        nodes[1]
            .net
            .put_record(key.clone(), v1.clone())
            .await
            .unwrap();
        for n in &nodes {
            assert!(
                wait_for(Duration::from_secs(5), || async {
                    n.net.status().await.unwrap().dht_records == 1
                })
                .await
            );
        }

        // Another node that stores the record may publish a claim of its own (its own store is
        // its own: a squatter's copy held there must not block its owner), but the others keep
        // the first signer's record...
        let other = signed_record(&nodes[2].key, &key, 9, exp, b"hijack");
        nodes[2]
            .net
            .put_record(key.clone(), other.clone())
            .await
            .expect("an own claim is stored locally and sent");
        // ...and a newcomer without a local copy cannot overwrite it remotely.
        let newcomer = Node::spawn().await;
        newcomer.net.dial(nodes[0].addr().await).await.unwrap();
        dht_ready(&newcomer, 1).await;
        let hijack = signed_record(&newcomer.key, &key, 9, exp, b"hijack");
        let _ = newcomer.net.put_record(key.clone(), hijack).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(nodes[0].net.status().await.unwrap().dht_records, 1);
        // The owner sees only its record; a node that holds no own copy sees every claimant
        // (the caller pins the signer it expects), the first signer's record among them.
        let got = nodes[1].net.get_record(key.clone(), GET).await.unwrap();
        assert_eq!(
            got,
            vec![v1.clone()],
            "the owner's lookup returns its record"
        );
        let got = nodes[0].net.get_record(key.clone(), GET).await.unwrap();
        assert!(got.contains(&v1), "the first signer's record is returned");
        assert!(
            got.iter().all(|v| v == &v1 || payload(v) == b"hijack"),
            "only the claims of their signers"
        );
        newcomer.net.shutdown().await;
        assert!(nodes[2].net.remove_record(key.clone()).await.unwrap());

        // Same-signer stale sequence: refused; higher sequence: replaces everywhere.
        assert!(matches!(
            nodes[1].net.put_record(key.clone(), v1.clone()).await,
            Err(NetError::StaleRecord)
        ));
        let v2 = signed_record(&nodes[1].key, &key, 2, exp, b"v2");
        nodes[1]
            .net
            .put_record(key.clone(), v2.clone())
            .await
            .unwrap();
        for n in &nodes {
            let got = n.net.get_record(key.clone(), GET).await.unwrap();
            assert_eq!(payload(&got[0]), b"v2");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn expired_records_are_dropped_and_lifetimes_bounded() {
    tokio::time::timeout(T, async {
        let nodes = star(2).await;
        let key = b"room/short".to_vec();
        let short = signed_record(&nodes[0].key, &key, 1, now_unix_ms() + 1500, b"brief");
        nodes[0]
            .net
            .put_record(key.clone(), short.clone())
            .await
            .unwrap();
        assert_eq!(
            nodes[1].net.get_record(key.clone(), GET).await.unwrap(),
            vec![short]
        );
        tokio::time::sleep(Duration::from_millis(2000)).await;
        for n in &nodes {
            assert!(matches!(
                n.net.get_record(key.clone(), GET).await,
                Err(NetError::NotFound)
            ));
        }
        let past = signed_record(&nodes[0].key, b"p", 1, now_unix_ms() - 1, b"old");
        assert!(matches!(
            nodes[0].net.put_record(b"p".to_vec(), past).await,
            Err(NetError::BadLifetime)
        ));
        let week = now_unix_ms() + 7 * 24 * 3600 * 1000;
        let long = signed_record(&nodes[0].key, b"l", 1, week, b"forever");
        assert!(matches!(
            nodes[0].net.put_record(b"l".to_vec(), long).await,
            Err(NetError::BadLifetime)
        ));
        let huge = signed_record(&nodes[0].key, b"h", 1, now_unix_ms() + 60_000, &[7; 9000]);
        assert!(matches!(
            nodes[0].net.put_record(b"h".to_vec(), huge).await,
            Err(NetError::RecordTooLarge { .. })
        ));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn lonely_put_is_kept_and_republished() {
    tokio::time::timeout(T, async {
        let a = Node::spawn_with(|c| c.republish_interval = Duration::from_millis(500)).await;
        let key = b"room/lonely".to_vec();
        let v = signed_record(&a.key, &key, 1, now_unix_ms() + 60_000, b"early");
        assert!(matches!(
            a.net.put_record(key.clone(), v.clone()).await,
            Err(NetError::NotReplicated)
        ));
        assert_eq!(
            a.net.get_record(key.clone(), GET).await.unwrap(),
            vec![v.clone()]
        );
        let b = Node::spawn().await;
        b.net.dial(a.addr().await).await.unwrap();
        // Republishing brings the record into b's own store.
        assert!(
            wait_for(Duration::from_secs(10), || async {
                b.net.status().await.unwrap().dht_records == 1
            })
            .await,
            "record never republished to the new peer"
        );
        assert!(a.net.remove_record(key.clone()).await.unwrap());
        assert_eq!(a.net.status().await.unwrap().dht_records, 0);
    })
    .await
    .expect("test timed out");
}
