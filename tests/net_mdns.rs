//! mDNS discovery between two processes in two network namespaces joined by a veth pair.
//!
//! libp2p-mdns is silent on loopback-only hosts, so the test builds its own link: namespaces
//! `wf-test-<pid>a` / `wf-test-<pid>b`, a veth pair between them with 10.231.0.1/24 and
//! 10.231.0.2/24 (addresses that exist only inside those namespaces) and a multicast route.
//! The test binary re-executes itself inside each namespace (`ip netns exec`), with
//! `WF_MDNS_ROLE` selecting the child role. Each child runs a node with mDNS on and no bootstrap
//! and prints `PEER <self>`, then `FOUND <other>` and `CONNECTED <other>`. The parent checks both
//! sides found the other and removes the namespaces. Skipped (with a printed reason) where
//! `ip netns` is not permitted.

mod net_support;
mod support;

use std::time::{Duration, Instant};

use support::netns::{self, Kid, Namespaces, get, report_lines};
use waterfall::net::NetEvent;

const TEST_NAME: &str = "mdns_finds_peer_across_namespaces";
/// Prefix of the child's report lines.
const MARK: &str = "WFMDNS ";
/// Debugging aid: `WF_MDNS_LOG=/path/prefix` keeps each child's log.
const LOG: &str = "WF_MDNS_LOG";
/// How long a child waits for its peer.
const CHILD_DEADLINE: Duration = Duration::from_secs(40);

fn spawn_child(ns: &str, role: &str, addr: &str) -> Result<Kid, String> {
    let mut c = netns::self_in(ns, TEST_NAME, LOG, role)?;
    c.env("WF_MDNS_ROLE", role).env("WF_MDNS_ADDR", addr);
    Kid::spawn(&mut c)
}

/// Lines `PEER x`, `FOUND y`, `CONNECTED y` of a child, read until it exits.
fn child_report(kid: &mut Kid) -> Vec<(String, String)> {
    match kid.0.stdout.take() {
        Some(out) => report_lines(out, MARK),
        None => Vec::new(),
    }
}

/// Child role: a node with mDNS on, no bootstrap, listening on the namespace's veth address.
fn child(addr: &str) {
    netns::child_runtime(LOG).block_on(async {
        let listen = format!("/ip4/{addr}/tcp/0").parse().expect("multiaddr");
        let mut node = net_support::Node::spawn_with(|c| {
            c.mdns = true;
            c.listen = vec![listen];
        })
        .await;
        let me = node.peer_id();
        netns::say(MARK, "PEER", me);
        let deadline = tokio::time::Instant::now() + CHILD_DEADLINE;
        let (mut found, mut connected) = (None, None);
        while found.is_none() || connected.is_none() {
            match tokio::time::timeout_at(deadline, node.events.recv()).await {
                Ok(Some(NetEvent::Discovered(peer, _))) if peer != me && found.is_none() => {
                    netns::say(MARK, "FOUND", peer);
                    found = Some(peer);
                }
                Ok(Some(NetEvent::PeerConnected(peer))) if connected.is_none() => {
                    netns::say(MARK, "CONNECTED", peer);
                    connected = Some(peer);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        // Stay a little so the other side can find and reach us too.
        tokio::time::sleep(Duration::from_secs(3)).await;
        node.net.shutdown().await;
    });
}

#[test]
fn mdns_finds_peer_across_namespaces() {
    if let Ok(role) = std::env::var("WF_MDNS_ROLE") {
        let addr = std::env::var("WF_MDNS_ADDR").expect("WF_MDNS_ADDR set with WF_MDNS_ROLE");
        eprintln!("mdns child {role} on {addr}");
        child(&addr);
        return;
    }
    let pid = std::process::id();
    let (ns_a, ns_b) = (format!("wf-test-{pid}a"), format!("wf-test-{pid}b"));
    let guard = match Namespaces::veth_pair([&ns_a, &ns_b], "wfv0", ["10.231.0.1", "10.231.0.2"]) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED mdns namespace test: cannot build the namespaces ({e})");
            return;
        }
    };
    let start = Instant::now();
    let mut a = spawn_child(&ns_a, "a", "10.231.0.1").expect("child a");
    let mut b = spawn_child(&ns_b, "b", "10.231.0.2").expect("child b");
    // Reading to EOF waits for each child to finish (each bounds itself by CHILD_DEADLINE);
    // read on threads so both are drained at once.
    let ta = std::thread::spawn(move || (child_report(&mut a), a));
    let tb = std::thread::spawn(move || (child_report(&mut b), b));
    let (ra, _a) = ta.join().expect("reader a");
    let (rb, _b) = tb.join().expect("reader b");
    drop(guard);
    eprintln!(
        "mdns children finished after {:?}: a={ra:?} b={rb:?}",
        start.elapsed()
    );
    let (pa, pb) = (get(&ra, "PEER"), get(&rb, "PEER"));
    assert_eq!(pa.len(), 1, "child a did not start: {ra:?}");
    assert_eq!(pb.len(), 1, "child b did not start: {rb:?}");
    assert_eq!(
        get(&ra, "FOUND"),
        vec![pb[0]],
        "a did not discover b by mDNS"
    );
    assert_eq!(
        get(&rb, "FOUND"),
        vec![pa[0]],
        "b did not discover a by mDNS"
    );
    assert_eq!(get(&ra, "CONNECTED"), vec![pb[0]]);
    assert_eq!(get(&rb, "CONNECTED"), vec![pa[0]]);
}
