//! Gossip over real swarms on loopback: 20 nodes in a tree of bootstrap dials, validation and
//! penalties, departures. Run with `--nocapture` to see the timings and memory figures.

mod net_support;
mod support;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use net_support::{Node, accept_all_gossip};
use support::{rss_kib, wait_for};
use tokio::sync::mpsc;
use waterfall::net::NetEvent;

const TOPIC: &str = "room/test";

/// Forward every gossip event of `node` (tagged with `idx`) into `tx`; returns the net handle.
fn drain(idx: usize, node: Node, tx: mpsc::Sender<(usize, Vec<u8>)>) -> waterfall::net::Net {
    let Node {
        net, mut events, ..
    } = node;
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let NetEvent::Gossip { topic, data, .. } = ev
                && topic == TOPIC
                && tx.send((idx, data)).await.is_err()
            {
                break;
            }
        }
    });
    net
}

/// Wait until `data` has been received by every node in `expect`; returns whether it was.
async fn all_receive(
    rx: &mut mpsc::Receiver<(usize, Vec<u8>)>,
    data: &[u8],
    expect: &HashSet<usize>,
    timeout: Duration,
) -> bool {
    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while got != *expect {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((idx, d))) if d == data => {
                assert!(got.insert(idx), "node {idx} received the message twice");
            }
            Ok(Some(_)) => {}
            _ => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_gossip_reaches_every_subscriber() {
    tokio::time::timeout(Duration::from_secs(120), async {
        const N: usize = 20;
        let rss0 = rss_kib();
        let start = Instant::now();
        let (tx, mut rx) = mpsc::channel(4 * N);
        let mut nets = Vec::new();
        let mut addrs: Vec<libp2p::Multiaddr> = Vec::new();
        // A binary tree of bootstrap dials: node i dials node (i-1)/2, so messages need
        // several hops and the mesh, not just flood publishing, must work.
        for i in 0..N {
            let bootstrap = if i == 0 {
                vec![]
            } else {
                vec![addrs[(i - 1) / 2].clone()]
            };
            let node = Node::spawn_with(|c| c.bootstrap = bootstrap).await;
            addrs.push(node.addr().await);
            node.net.subscribe(TOPIC.into()).await.unwrap();
            nets.push(drain(i, node, tx.clone()));
        }
        for net in &nets {
            assert!(
                wait_for(Duration::from_secs(20), || async {
                    net.status().await.unwrap().peers >= 1
                })
                .await
            );
        }
        let connected = start.elapsed();

        // Publish from a leaf until the first message reaches everyone (the mesh is formed).
        let everyone_but = |p: usize| (0..N).filter(|i| *i != p).collect::<HashSet<_>>();
        let first = b"WF:first".to_vec();
        nets[N - 1]
            .publish(TOPIC.into(), first.clone())
            .await
            .unwrap();
        assert!(
            all_receive(
                &mut rx,
                &first,
                &everyone_but(N - 1),
                Duration::from_secs(30)
            )
            .await,
            "first message did not reach every subscriber"
        );
        let meshed = start.elapsed();

        // Steady state: one more message, timed on its own.
        let t = Instant::now();
        let second = b"WF:second".to_vec();
        nets[7].publish(TOPIC.into(), second.clone()).await.unwrap();
        assert!(all_receive(&mut rx, &second, &everyone_but(7), Duration::from_secs(30)).await);
        let steady = t.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss1 = rss_kib();
        eprintln!(
            "[net figures] {N} nodes: all connected after {connected:?}, first gossip at all \
             subscribers after {meshed:?}, later message in {steady:?}; RSS +{} KiB total, \
             ~{} KiB per idle node",
            rss1.saturating_sub(rss0),
            rss1.saturating_sub(rss0) / N as u64
        );

        // Leaves leave; the rest of the tree keeps gossiping.
        let gone = [17usize, 18, 19];
        for g in gone {
            nets[g].shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let third = b"WF:third".to_vec();
        nets[0].publish(TOPIC.into(), third.clone()).await.unwrap();
        let rest: HashSet<usize> = (1..N).filter(|i| !gone.contains(i)).collect();
        assert!(all_receive(&mut rx, &third, &rest, Duration::from_secs(30)).await);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn invalid_gossip_is_rejected_not_forwarded_and_the_sender_dropped() {
    tokio::time::timeout(Duration::from_secs(60), async {
        // a -> b -> c; `a` validates nothing and publishes garbage.
        let a = Node::spawn_with(|c| c.gossip_validator = accept_all_gossip()).await;
        let b = Node::spawn().await;
        let c = Node::spawn().await;
        let a_id = a.peer_id();
        b.net.dial(a.addr().await).await.unwrap();
        c.net.dial(b.addr().await).await.unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut nets = HashMap::new();
        for (i, n) in [a, b, c].into_iter().enumerate() {
            n.net.subscribe(TOPIC.into()).await.unwrap();
            nets.insert(i, drain(i, n, tx.clone()));
        }
        let bc: HashSet<usize> = [1, 2].into();
        // Wait for the mesh: a valid message crosses both hops.
        let ok = b"WF:ok".to_vec();
        nets[&0].publish(TOPIC.into(), ok.clone()).await.unwrap();
        assert!(all_receive(&mut rx, &ok, &bc, Duration::from_secs(20)).await);

        for i in 0..3u8 {
            nets[&0].publish(TOPIC.into(), vec![b'x', i]).await.unwrap();
        }
        // Garbage is never delivered, and the third strike blocks `a` at `b`.
        let b_net = nets[&1].clone();
        assert!(
            wait_for(Duration::from_secs(10), || async {
                !b_net.connected_peers().await.unwrap().contains(&a_id)
            })
            .await,
            "garbage sender still connected"
        );
        // `b` keeps serving `c`.
        let later = b"WF:later".to_vec();
        nets[&1].publish(TOPIC.into(), later.clone()).await.unwrap();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some((idx, d))) = tokio::time::timeout_at(deadline, rx.recv()).await {
            assert!(
                d.starts_with(b"WF:"),
                "node {idx} received invalid gossip {d:?}"
            );
            if d == later {
                seen.push(idx);
                break;
            }
        }
        assert_eq!(seen, vec![2], "c must receive b's message");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn publish_before_subscription_is_queued_then_delivered() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let a = Node::spawn().await;
        let b = Node::spawn().await;
        // No peer at all yet: the message is queued, not lost.
        let outcome = a
            .net
            .publish(TOPIC.into(), b"WF:early".to_vec())
            .await
            .unwrap();
        assert_eq!(outcome, waterfall::net::Published::Queued);
        let a_net = a.net.clone();
        let b_addr = b.addr().await;
        b.net.subscribe(TOPIC.into()).await.unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let _b = drain(1, b, tx);
        a_net.dial(b_addr).await.unwrap();
        let want: HashSet<usize> = [1].into();
        assert!(all_receive(&mut rx, b"WF:early", &want, Duration::from_secs(15)).await);
        let _keep = a;
    })
    .await
    .expect("test timed out");
}
