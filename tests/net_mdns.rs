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

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use waterfall::net::NetEvent;

const TEST_NAME: &str = "mdns_finds_peer_across_namespaces";
/// Prefix of the child's report lines.
const MARK: &str = "WFMDNS ";
/// How long a child waits for its peer.
const CHILD_DEADLINE: Duration = Duration::from_secs(40);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the namespaces (and with them the veth pair) when dropped.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Kills a child process (by its own pid) if it is still running when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn setup(ns_a: &str, ns_b: &str, guard: &mut Namespaces) -> Result<(), String> {
    ip(&["netns", "add", ns_a])?;
    guard.0.push(ns_a.to_owned());
    ip(&["netns", "add", ns_b])?;
    guard.0.push(ns_b.to_owned());
    ip(&[
        "-n", ns_a, "link", "add", "wfv0", "type", "veth", "peer", "name", "wfv0", "netns", ns_b,
    ])?;
    for (ns, addr) in [(ns_a, "10.231.0.1/24"), (ns_b, "10.231.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", "wfv0"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "wfv0", "up"])?;
        ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", "wfv0"])?;
    }
    Ok(())
}

fn spawn_child(ns: &str, role: &str, addr: &str) -> Result<Kid, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env("WF_MDNS_ROLE", role)
        .env("WF_MDNS_ADDR", addr)
        .stdout(Stdio::piped())
        .stderr(match std::env::var_os("WF_MDNS_LOG") {
            // Debugging aid: WF_MDNS_LOG=/path/prefix keeps each child's log.
            Some(p) => std::fs::File::create(format!("{}-{role}.log", p.to_string_lossy()))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            None => Stdio::null(),
        })
        .spawn()
        .map_err(|e| format!("spawning child: {e}"))?;
    Ok(Kid(child))
}

/// Lines `PEER x`, `FOUND y`, `CONNECTED y` of a child, read until it exits.
fn child_report(kid: &mut Kid) -> Vec<(String, String)> {
    let Some(out) = kid.0.stdout.take() else {
        return Vec::new();
    };
    BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            // The harness prints `test NAME ... ` without a newline before the test runs, so the
            // marker may sit mid-line.
            let at = l.find(MARK)?;
            let mut it = l[at + MARK.len()..].splitn(2, ' ');
            match (it.next(), it.next()) {
                (Some(k @ ("PEER" | "FOUND" | "CONNECTED")), Some(v)) => {
                    Some((k.to_owned(), v.trim().to_owned()))
                }
                _ => None,
            }
        })
        .collect()
}

fn get<'a>(report: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    report
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Child role: a node with mDNS on, no bootstrap, listening on the namespace's veth address.
fn child(addr: &str) {
    if std::env::var_os("WF_MDNS_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,netlink_proto=info,multistream_select=info,yamux=info")
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let listen = format!("/ip4/{addr}/tcp/0").parse().expect("multiaddr");
        let mut node = net_support::Node::spawn_with(|c| {
            c.mdns = true;
            c.listen = vec![listen];
        })
        .await;
        let me = node.peer_id();
        println!("{MARK}PEER {me}");
        let deadline = tokio::time::Instant::now() + CHILD_DEADLINE;
        let (mut found, mut connected) = (None, None);
        while found.is_none() || connected.is_none() {
            match tokio::time::timeout_at(deadline, node.events.recv()).await {
                Ok(Some(NetEvent::Discovered(peer, _))) if peer != me && found.is_none() => {
                    println!("{MARK}FOUND {peer}");
                    found = Some(peer);
                }
                Ok(Some(NetEvent::PeerConnected(peer))) if connected.is_none() => {
                    println!("{MARK}CONNECTED {peer}");
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
    let mut guard = Namespaces(Vec::new());
    if let Err(e) = setup(&ns_a, &ns_b, &mut guard) {
        eprintln!("SKIPPED mdns namespace test: cannot build the namespaces ({e})");
        return;
    }
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
