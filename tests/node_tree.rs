//! Real nodes on loopback forming a room tree: the state machine's rules hold on the wire,
//! departures and crashes are repaired, forged records and forged tree updates are rejected.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use support::room::{builder, clip, wait_status};
use tokio::time::{Instant, timeout};
use waterfall::crypto::{Kind, now_ms};
use waterfall::proto::{NodeId, TreeUpdate};
use waterfall::wire::{self, RoomId, RoomRequest, RoomResponse, Versioned};
use waterfall::{
    Broadcast, Identity, Node, NodeError, RoomConfig, RoomEvent, RoomEvents, RoomStatus, Watch,
    WatchConfig, WatchTarget,
};

/// A node that takes at most `cap` children.
async fn node(boot: Vec<libp2p::Multiaddr>, cap: u16) -> Node {
    builder()
        .bootstrap(boot)
        .max_children(cap)
        .spawn()
        .await
        .expect("node starts")
}

/// A room of fanout 3 streaming the fixture clip (looped far past any test's length).
async fn broadcast(b: &Node, name: &str, pw: &str) -> Broadcast {
    let cfg = RoomConfig::new(name)
        .password(pw)
        .fanout(3)
        .source(clip("f.ivf", Some(1000)).await);
    b.broadcast(cfg).await.expect("broadcast").0
}

/// Watch by ticket with the password.
async fn watch(n: &Node, ticket: &waterfall::Ticket, pw: &str) -> (Watch, RoomEvents) {
    n.watch(ticket.clone(), WatchConfig::new().password(pw))
        .await
        .expect("joins")
}

struct Member {
    node: Node,
    room: Watch,
}

/// Statuses of every member, keyed by peer id.
async fn statuses(root: (&Node, &Broadcast), members: &[Member]) -> HashMap<PeerId, RoomStatus> {
    let mut m = HashMap::new();
    m.insert(root.0.peer_id(), root.1.status().await.unwrap());
    for x in members {
        if let Ok(s) = x.room.status().await {
            m.insert(x.node.peer_id(), s);
        }
    }
    m
}

/// The tree rules: capacity, parent/child agreement, depth = parent's + 1, no cycles.
fn check_tree(root: PeerId, st: &HashMap<PeerId, RoomStatus>, cap: usize) -> Result<usize, String> {
    let mut max_depth = 0;
    for (p, s) in st {
        if s.children.len() > cap {
            return Err(format!("{p} has {} children > {cap}", s.children.len()));
        }
        for c in &s.children {
            if let Some(cs) = st.get(c)
                && cs.parent != Some(*p)
            {
                return Err(format!(
                    "{p} lists child {c} whose parent is {:?}",
                    cs.parent
                ));
            }
        }
        if *p == root {
            continue;
        }
        let (Some(parent), Some(depth)) = (s.parent, s.depth) else {
            return Err(format!("{p} is not attached"));
        };
        let ps = st
            .get(&parent)
            .ok_or(format!("{p}'s parent {parent} unknown"))?;
        if ps.depth.map(|d| d + 1) != Some(depth) {
            return Err(format!("{p} depth {depth}, parent depth {:?}", ps.depth));
        }
        if !ps.children.contains(p) {
            return Err(format!("{parent} does not list its child {p}"));
        }
        // Follow parents to the root: a cycle never gets there.
        let mut cur = *p;
        let mut hops = 0;
        while cur != root {
            cur = st
                .get(&cur)
                .and_then(|s| s.parent)
                .ok_or(format!("{p}: broken path"))?;
            hops += 1;
            if hops > st.len() {
                return Err(format!("cycle through {p}"));
            }
        }
        max_depth = max_depth.max(depth as usize);
    }
    Ok(max_depth)
}

async fn wait_tree(
    root: (&Node, &Broadcast),
    members: &[Member],
    cap: usize,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let st = statuses(root, members).await;
        match check_tree(root.0.peer_id(), &st, cap) {
            Ok(d) if st.len() == members.len() + 1 => return d,
            Ok(_) => {}
            Err(e) if Instant::now() >= deadline => panic!("tree not valid in time: {e}"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "tree incomplete in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_nodes_form_a_tree_and_repair_leave_and_crash() {
    timeout(Duration::from_secs(240), async {
        let b = node(vec![], 3).await;
        let room = broadcast(&b, "tree", "pw").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        // Join in concurrent waves of 5: joiners race for the same free slots.
        let mut members = Vec::new();
        for wave in 0..4 {
            let mut joins = Vec::new();
            for _ in 0..5 {
                let (boot, ticket) = (boot.clone(), ticket.clone());
                joins.push(tokio::spawn(async move {
                    let n = node(boot, 3).await;
                    let (r, _) = watch(&n, &ticket, "pw").await;
                    Member { node: n, room: r }
                }));
            }
            for j in joins {
                members.push(j.await.unwrap());
            }
            eprintln!("wave {wave} joined");
        }
        let depth = wait_tree((&b, &room), &members, 3, Duration::from_secs(60)).await;
        eprintln!("20 nodes: max depth {depth}");
        // ceil(log3(20 * 2 / 3 + 1)) = 3 levels of viewers when packed; one more is allowed.
        assert!(depth <= 4, "depth {depth}");

        // A relay leaves gracefully, another crashes.
        let st = statuses((&b, &room), &members).await;
        let relays: Vec<usize> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                st.get(&m.node.peer_id())
                    .is_some_and(|s| !s.children.is_empty())
            })
            .map(|(i, _)| i)
            .collect();
        assert!(relays.len() >= 2, "need two relays, have {}", relays.len());
        let leaver = members.remove(relays[0]);
        let orphans_l = st[&leaver.node.peer_id()].children.clone();
        leaver.room.leave().await;
        leaver.node.shutdown().await;
        let crasher = members.remove(relays[1] - 1);
        let orphans_c = st[&crasher.node.peer_id()].children.clone();
        crasher.node.crash().await;
        drop(crasher);
        eprintln!(
            "left: {} orphans, crashed: {} orphans",
            orphans_l.len(),
            orphans_c.len()
        );
        let t = Instant::now();
        wait_tree((&b, &room), &members, 3, Duration::from_secs(60)).await;
        eprintln!("repaired in {:?}", t.elapsed());
        for m in members {
            m.room.leave().await;
            m.node.shutdown().await;
        }
    })
    .await
    .expect("bounded");
}

/// Every event of a room from now on, kept (bounded) for inspection.
fn record_events(mut events: RoomEvents) -> Arc<Mutex<Vec<RoomEvent>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let mut v = kept.lock().unwrap();
            if v.len() < 10_000 {
                v.push(e);
            }
        }
    });
    seen
}

/// Real nodes: a viewer with more slots than its parent is promoted over it (the broadcaster
/// holds one extra child for a moment) and the former parent moves under it. Make-before-break:
/// neither is ever orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_more_capable_viewer_is_promoted_over_its_parent() {
    timeout(Duration::from_secs(120), async {
        let b = node(vec![], 1).await;
        let room = broadcast(&b, "promote", "pw").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let weak = node(boot.clone(), 1).await;
        let (weak_room, events) = watch(&weak, &ticket, "pw").await;
        let weak_events = record_events(events);
        wait_status(
            "weak below the broadcaster",
            Duration::from_secs(30),
            || weak_room.status(),
            |s| s.depth == Some(1),
        )
        .await;
        // The broadcaster's only slot is taken: the capable viewer starts under the weak one.
        let strong = node(boot, 3).await;
        let (strong_room, events) = watch(&strong, &ticket, "pw").await;
        let strong_events = record_events(events);
        wait_status(
            "strong attached",
            Duration::from_secs(30),
            || strong_room.status(),
            |s| s.depth.is_some(),
        )
        .await;
        let first = strong_room.status().await.unwrap();
        assert_eq!(first.parent, Some(weak.peer_id()), "{first:?}");
        // Rebalancing checks every 2.5-7.5 s: the promotion follows within a few checks.
        let strong_id = strong.peer_id();
        wait_status(
            "weak below strong",
            Duration::from_secs(60),
            || weak_room.status(),
            |s| s.parent == Some(strong_id) && s.depth == Some(2),
        )
        .await;
        let st = strong_room.status().await.unwrap();
        assert_eq!(
            (st.parent, st.depth),
            (Some(b.peer_id()), Some(1)),
            "{st:?}"
        );
        // The former parent's Leave reaches the broadcaster a moment later: back within capacity.
        wait_status(
            "the broadcaster back within capacity",
            Duration::from_secs(10),
            || room.status(),
            |s| s.children == vec![strong_id],
        )
        .await;
        for (who, events) in [("weak", &weak_events), ("strong", &strong_events)] {
            let v = events.lock().unwrap();
            assert!(
                !v.iter().any(|e| matches!(e, RoomEvent::Orphaned { .. })),
                "{who} was orphaned: {v:?}"
            );
            assert!(
                v.iter()
                    .any(|e| matches!(e, RoomEvent::ParentChanged { .. })),
                "{who} never changed parent: {v:?}"
            );
        }
        for (n, r) in [(weak, weak_room), (strong, strong_room)] {
            r.leave().await;
            n.shutdown().await;
        }
        room.leave().await;
        b.shutdown().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_and_updates_are_rejected() {
    timeout(Duration::from_secs(120), async {
        let b = node(vec![], 3).await;
        let room = broadcast(&b, "guarded", "pw").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let attacker = node(boot.clone(), 3).await;
        let keys = attacker.room_keys("guarded", Some("pw")).await.unwrap();

        // 1. Another signer cannot replace the live record: the broadcaster's DHT refuses it,
        //    and a viewer still finds the real room (by ticket and by name).
        let forged = attacker.identity().seal_envelope(
            Kind::RoomRecord,
            999,
            now_ms() + 60_000,
            keys.seal(Kind::RoomRecord, b"not a record"),
        );
        let _ = attacker
            .net()
            .put_record(keys.locator().to_vec(), wire::encode(&forged))
            .await;
        let v = node(boot.clone(), 3).await;
        let (r, _) = v
            .watch(ticket.clone(), WatchConfig::new().password("pw"))
            .await
            .expect("the real room is found despite the forged record");
        r.leave().await;
        // By name (the DHT path, no pinned broadcaster): the forged copy does not open, the
        // real one wins.
        let (r, _) = v
            .watch(
                WatchTarget::Name("guarded".into()),
                WatchConfig::new().password("pw"),
            )
            .await
            .expect("found by name despite the forged record");
        r.leave().await;
        v.shutdown().await;

        // 2. A forged record in a room nobody created: a clear error, not a hang.
        let other = attacker.room_keys("nobody", Some("pw")).await.unwrap();
        let junk = attacker.identity().seal_envelope(
            Kind::RoomRecord,
            1,
            now_ms() + 60_000,
            other.seal(Kind::RoomRecord, b"junk"),
        );
        let _ = attacker
            .net()
            .put_record(other.locator().to_vec(), wire::encode(&junk))
            .await;
        let v = node(boot.clone(), 3).await;
        let t = Instant::now();
        let err = v
            .watch(
                WatchTarget::Name("nobody".into()),
                WatchConfig::new().password("pw"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::TamperedRecord { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(20));

        // 3. Forged tree updates sent straight to the broadcaster are refused with a reason.
        let room_id = RoomId(*keys.locator());
        let ask = |env: wire::Envelope| {
            let net = attacker.net().clone();
            let to = b.peer_id();
            async move {
                let req = wire::encode(&RoomRequest {
                    v: wire::VERSION,
                    room: room_id,
                    env,
                });
                let resp = net.request(to, req, Duration::from_secs(5)).await.unwrap();
                wire::decode::<RoomResponse>(&resp).unwrap().error
            }
        };
        let update_about = |peer: NodeId| {
            Versioned(TreeUpdate {
                peer,
                parent: None,
                depth: 0,
                ancestors: vec![],
                children: vec![],
                capacity: 100,
                uplink_kbps: 1,
                seq: 1,
                ts_ms: now_ms(),
            })
        };
        // (a) an update about someone else (the broadcaster itself), signed by the attacker
        let env = attacker.identity().seal_envelope(
            Kind::TreeUpdate,
            1,
            now_ms() + 30_000,
            keys.seal(
                Kind::TreeUpdate,
                &wire::encode(&update_about(b.identity().node_id())),
            ),
        );
        assert!(
            ask(env).await.is_some(),
            "update about another peer accepted"
        );
        // (b) a valid update with a tampered signature
        let mut env = attacker.identity().seal_envelope(
            Kind::TreeUpdate,
            2,
            now_ms() + 30_000,
            keys.seal(
                Kind::TreeUpdate,
                &wire::encode(&update_about(attacker.identity().node_id())),
            ),
        );
        env.sig[0] ^= 1;
        assert!(ask(env).await.is_some(), "tampered signature accepted");
        // (c) signed by a key other than the sending peer's
        let stranger = Identity::generate();
        let env = stranger.seal_envelope(
            Kind::TreeUpdate,
            1,
            now_ms() + 30_000,
            keys.seal(
                Kind::TreeUpdate,
                &wire::encode(&update_about(stranger.node_id())),
            ),
        );
        assert!(
            ask(env).await.is_some(),
            "envelope of another signer accepted"
        );
        // (d) sealed with the wrong room key (a non-member)
        let wrong = attacker.room_keys("guarded", Some("guess")).await.unwrap();
        let env = attacker.identity().seal_envelope(
            Kind::TreeUpdate,
            3,
            now_ms() + 30_000,
            wrong.seal(
                Kind::TreeUpdate,
                &wire::encode(&update_about(attacker.identity().node_id())),
            ),
        );
        assert!(ask(env).await.is_some(), "non-member update accepted");
        // (e) garbage bytes: refused, and the broadcaster keeps serving.
        let resp = attacker
            .net()
            .request(b.peer_id(), vec![0xff; 64], Duration::from_secs(5))
            .await
            .unwrap();
        assert!(wire::decode::<RoomResponse>(&resp).unwrap().error.is_some());
        let st = room.status().await.unwrap();
        assert_eq!(st.depth, Some(0));
        let v = node(boot, 3).await;
        let (r, _) = v
            .watch(ticket, WatchConfig::new().password("pw"))
            .await
            .expect("still serving");
        wait_status(
            "a newcomer joins after the attack",
            Duration::from_secs(20),
            || r.status(),
            |s| s.depth.is_some(),
        )
        .await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_node() {
    timeout(Duration::from_secs(60), async {
        let b = node(vec![], 3).await;
        let room = broadcast(&b, "dropme", "pw").await;
        let tcp: std::net::SocketAddr = b
            .addrs()
            .await
            .unwrap()
            .iter()
            .find_map(|a| {
                let mut ip = None;
                let mut port = None;
                for p in a.iter() {
                    match p {
                        libp2p::multiaddr::Protocol::Ip4(i) => ip = Some(i),
                        libp2p::multiaddr::Protocol::Tcp(t) => port = Some(t),
                        _ => {}
                    }
                }
                Some(std::net::SocketAddr::from((ip?, port?)))
            })
            .expect("a TCP listen address");
        assert!(tokio::net::TcpStream::connect(tcp).await.is_ok());
        drop(room);
        drop(b);
        // The room leaves in the background, then the node's last reference goes and the swarm
        // closes its listeners.
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(tcp).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "node still listening after its last handle dropped"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("bounded");
}
