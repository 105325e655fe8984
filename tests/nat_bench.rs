//! NAT traversal figures for BENCHMARKS.md: not a test (`#[ignore]`), a benchmark that prints.
//!
//! ```text
//! cargo test --test nat_bench -- --ignored --nocapture      # NATBENCH_RUNS=5 by default
//! ```
//!
//! Each NAT case of `nat_media.rs` runs `NATBENCH_RUNS` times, each time in a fresh lab (see
//! `natlab`); per run it records, for each viewer:
//! - the time to first frame: from starting the viewer process to its `first_frame` event
//!   (process start, ticket lookup, joining the tree, ICE, the first keyframe), and the part
//!   from the parent connection's start (`after_ms` of the event);
//! - the media path its ICE selected (direct, hole-punched, TURN) and the path of its libp2p
//!   connection to the parent (direct, relayed, hole-punched by DCUtR).
//!
//! In the symmetric case the libp2p connection between viewer and broadcaster stays relayed
//! (DCUtR cannot punch a symmetric NAT) and the media goes through coturn, each on a public
//! host of its own: the relay's CPU time (`/proc/PID/stat`) and its host's interface bytes are
//! sampled over a window with the broadcaster's reservation only (idle) and over a window
//! with the viewer's circuit (and its reservation) open; coturn's CPU over the same window is
//! the cost of one TURN media stream.
//!
//! Figures, not checks: nothing here asserts a time. Medians and ranges, because the machine
//! is shared and noisy.

mod natlab;

use std::time::{Duration, Instant};

use natlab::{Host, Lab, NatKind, Wf, args, broadcaster, public_node, try_wait_line, viewer};

/// The window over which relay and TURN costs are sampled.
const WINDOW: Duration = Duration::from_secs(20);
/// Wait before each window, so that start-up traffic (DHT bootstrap, AutoNAT probes, the
/// first record puts, ICE checks) stays out of it.
const SETTLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Sample {
    /// Viewer start to first video frame.
    ttff: Duration,
    /// Parent connection start to first video frame (the viewer's own figure).
    after_ms: u64,
    media: String,
    control: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    cpu_s: f64,
    /// Everything on the host's interface.
    bytes: u64,
    /// Only what went between the relay and the broadcaster's NAT (nft counters): the
    /// broadcaster's own connection to the relay, plus its leg of a circuit when one is open.
    bcast_bytes: u64,
}

/// Follow a viewer's `--json` events until its first video frame (2 min at most); then a few
/// seconds more for the outcome of hole punching.
fn follow(v: &Wf, started: Instant, ticket_direct: bool) -> Option<Sample> {
    let mut media = String::from("?");
    let mut control = None;
    let mut after_ms = 0;
    let mut ttff = None;
    let deadline = started + Duration::from_secs(120);
    while ttff.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = v.out.recv_timeout(left).ok()?;
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match ev["event"].as_str() {
            Some("ice_connected") => media = ev["path"].as_str().unwrap_or("?").to_owned(),
            Some("hole_punched") => control = Some("hole-punched"),
            Some("hole_punch_failed") => control = control.or(Some("relayed")),
            Some("first_frame") if ev["kind"] == "video" => {
                ttff = Some(started.elapsed());
                after_ms = ev["after_ms"].as_u64().unwrap_or(0);
            }
            _ => {}
        }
    }
    if control.is_none()
        && let Some(l) = try_wait_line(&v.out, Duration::from_secs(3), |l| {
            l.contains("\"hole_punched\"") || l.contains("\"hole_punch_failed\"")
        })
    {
        control = Some(if l.contains("\"hole_punched\"") {
            "hole-punched"
        } else {
            "relayed"
        });
    }
    let control = control
        .unwrap_or(if ticket_direct { "direct" } else { "relayed" })
        .to_owned();
    Some(Sample {
        ttff: ttff?,
        after_ms,
        media,
        control,
    })
}

fn direct_first(ticket: &str) -> bool {
    natlab::ticket_addrs(ticket)
        .first()
        .is_some_and(|a| !a.contains("/p2p-circuit"))
}

/// Case 1: public broadcaster, viewer behind a cone NAT.
fn cone() -> Vec<Sample> {
    let mut lab = Lab::new().expect("the benchmark needs the NAT lab");
    let public = lab.public_host();
    let home = lab.nat_host(NatKind::Cone);
    let (_b, ticket, _) = broadcaster(&mut lab, &public, &[]);
    let t = Instant::now();
    let (v, _) = viewer(&mut lab, &home, "viewer", &ticket, &[], &[]);
    follow(&v, t, direct_first(&ticket)).into_iter().collect()
}

/// Case 2: broadcaster and viewer behind two cone NATs, a public relay, coturn as STUN.
fn two_cones() -> Vec<Sample> {
    let mut lab = Lab::new().expect("the benchmark needs the NAT lab");
    let public = lab.public_host();
    let turn = lab.turn_server(&public).expect("coturn");
    let (_relay, boot) = public_node(&mut lab, &public, "relay", &["--relay"]);
    let a = lab.nat_host(NatKind::Cone);
    let b = lab.nat_host(NatKind::Cone);
    let mut net = boot.clone();
    net.extend(args(&["--stun", &turn.stun_url]));
    let (_bc, ticket, _) = broadcaster(&mut lab, &a, &net);
    let t = Instant::now();
    let (v, _) = viewer(&mut lab, &b, "viewer", &ticket, &net, &[]);
    follow(&v, t, direct_first(&ticket)).into_iter().collect()
}

/// CPU seconds a process used so far.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line are utime and stime; `after` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// Bytes received plus sent on a lab host's interface.
fn if_bytes(lab: &Lab, host: &Host) -> u64 {
    ["rx_bytes", "tx_bytes"]
        .iter()
        .map(|f| {
            let out = lab.output(
                host,
                "cat",
                &[&format!("/sys/class/net/eth0/statistics/{f}")],
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

/// Count, in `host`'s namespace, the bytes exchanged with `peer` (read by [`peer_bytes`]).
fn count_peer(lab: &Lab, host: &Host, peer: std::net::Ipv4Addr) {
    let peer = peer.to_string();
    let rules: [&[&str]; 5] = [
        &["add", "table", "inet", "wfbench"],
        &[
            "add",
            "chain",
            "inet",
            "wfbench",
            "in",
            "{ type filter hook input priority 0 ; }",
        ],
        &[
            "add",
            "chain",
            "inet",
            "wfbench",
            "out",
            "{ type filter hook output priority 0 ; }",
        ],
        &[
            "add", "rule", "inet", "wfbench", "in", "ip", "saddr", &peer, "counter",
        ],
        &[
            "add", "rule", "inet", "wfbench", "out", "ip", "daddr", &peer, "counter",
        ],
    ];
    for r in rules {
        let out = lab.output(host, "nft", r);
        assert!(
            out.status.success(),
            "nft {r:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Bytes counted so far by [`count_peer`]'s rules.
fn peer_bytes(lab: &Lab, host: &Host) -> u64 {
    let out = lab.output(host, "nft", &["-j", "list", "table", "inet", "wfbench"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["rule"]["expr"].as_array())
                .flatten()
                .filter_map(|e| e["counter"]["bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

fn cost(lab: &Lab, host: &Host, pid: u32, during: impl FnOnce()) -> Cost {
    let (c0, b0, p0) = (cpu_s(pid), if_bytes(lab, host), peer_bytes(lab, host));
    during();
    Cost {
        cpu_s: cpu_s(pid) - c0,
        bytes: if_bytes(lab, host) - b0,
        bcast_bytes: peer_bytes(lab, host) - p0,
    }
}

/// Case 3: broadcaster behind a cone NAT, viewer behind a symmetric NAT: control relayed,
/// media through TURN. Returns the viewer's sample and the costs (relay idle, relay with the
/// circuit, coturn with the stream), each over [`WINDOW`].
fn symmetric() -> (Vec<Sample>, Option<[Cost; 3]>) {
    let mut lab = Lab::new().expect("the benchmark needs the NAT lab");
    let p0 = lab.public_host();
    let p1 = lab.public_host();
    let turn = lab.turn_server(&p1).expect("coturn");
    let (relay, boot) = public_node(&mut lab, &p0, "relay", &["--relay"]);
    let relay_pid = lab.child(relay.idx).id();
    let a = lab.nat_host(NatKind::Cone);
    let b = lab.nat_host(NatKind::Symmetric);
    let mut net = boot.clone();
    net.extend(args(&["--stun", &turn.stun_url, "--turn", &turn.url]));
    net.extend(args(&["--turn-user", &turn.user]));
    let env = [("WATERFALL_TURN_CREDENTIAL", turn.password.as_str())];
    let mut bnet = net.clone();
    let cred = lab.path("turn-credential");
    std::fs::write(&cred, format!("{}\n", turn.password)).unwrap();
    bnet.push("--turn-credential-file".into());
    bnet.push(cred.to_string_lossy().into_owned());
    count_peer(&lab, &p0, a.nat_ip.expect("behind a NAT"));
    let (_bc, ticket, _) = broadcaster(&mut lab, &a, &bnet);
    std::thread::sleep(SETTLE);
    let idle = cost(&lab, &p0, relay_pid, || std::thread::sleep(WINDOW));
    let t = Instant::now();
    let (v, _) = viewer(&mut lab, &b, "viewer", &ticket, &net, &env);
    let Some(s) = follow(&v, t, direct_first(&ticket)) else {
        return (Vec::new(), None);
    };
    let turn_pid = std::fs::read_to_string(lab.path("turn.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    std::thread::sleep(SETTLE);
    let (t0, tb0) = (turn_pid.map(cpu_s), if_bytes(&lab, &p1));
    let busy = cost(&lab, &p0, relay_pid, || std::thread::sleep(WINDOW));
    let turn_cost = match (turn_pid, t0) {
        (Some(pid), Some(c0)) => Cost {
            cpu_s: cpu_s(pid) - c0,
            bytes: if_bytes(&lab, &p1) - tb0,
            bcast_bytes: 0,
        },
        _ => Cost::default(),
    };
    (vec![s], Some([idle, busy, turn_cost]))
}

/// Case 4: a tree across three cone NATs; one child per node, so the second viewer joins
/// below the first. Returns (first viewer, second viewer).
fn tree() -> (Vec<Sample>, Vec<Sample>) {
    let mut lab = Lab::new().expect("the benchmark needs the NAT lab");
    let public = lab.public_host();
    let turn = lab.turn_server(&public).expect("coturn");
    let (_relay, boot) = public_node(&mut lab, &public, "relay", &["--relay"]);
    let a = lab.nat_host(NatKind::Cone);
    let b = lab.nat_host(NatKind::Cone);
    let c = lab.nat_host(NatKind::Cone);
    let mut net = boot.clone();
    net.extend(args(&["--stun", &turn.stun_url]));
    let mut bnet = net.clone();
    bnet.extend(args(&["--max-children", "1"]));
    let (_bc, ticket, _) = broadcaster(&mut lab, &a, &bnet);
    let t = Instant::now();
    let (v1, _) = viewer(&mut lab, &b, "viewer1", &ticket, &bnet, &[]);
    let s1 = follow(&v1, t, direct_first(&ticket));
    let t = Instant::now();
    let (v2, _) = viewer(&mut lab, &c, "viewer2", &ticket, &net, &[]);
    // The second viewer's parent is the first: its libp2p path is not the ticket's.
    let s2 = follow(&v2, t, false);
    (s1.into_iter().collect(), s2.into_iter().collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn shares(v: &[Sample], f: impl Fn(&Sample) -> &str) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for s in v {
        match counts.iter_mut().find(|(k, _)| k == f(s)) {
            Some((_, n)) => *n += 1,
            None => counts.push((f(s).to_owned(), 1)),
        }
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k} {n}/{}", v.len()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn row(case: &str, runs: usize, v: &[Sample]) {
    let ttff: Vec<f64> = v.iter().map(|s| s.ttff.as_secs_f64()).collect();
    let after: Vec<f64> = v.iter().map(|s| s.after_ms as f64 / 1000.0).collect();
    let (lo, hi) = range(&ttff);
    let (alo, ahi) = range(&after);
    println!(
        "| {case} | {}/{runs} | {:.2} s ({lo:.2}–{hi:.2}) | {:.2} s ({alo:.2}–{ahi:.2}) | {} | {} |",
        v.len(),
        median(ttff.clone()),
        median(after.clone()),
        shares(v, |s| &s.media),
        shares(v, |s| &s.control),
    );
}

#[test]
#[ignore = "a benchmark: prints NAT traversal figures (minutes; needs root, nft, coturn)"]
fn nat_traversal_figures() {
    if Lab::new().is_none() {
        return;
    }
    let runs: usize = std::env::var("NATBENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // `NATBENCH_CASES=3` (say) runs only the listed cases.
    let cases = std::env::var("NATBENCH_CASES").unwrap_or_else(|_| "1234".into());
    let (mut c1, mut c2, mut c3, mut t1, mut t2) = (vec![], vec![], vec![], vec![], vec![]);
    let mut costs = Vec::new();
    for i in 0..runs {
        eprintln!("=== run {} of {runs}", i + 1);
        if cases.contains('1') {
            c1.extend(cone());
        }
        if cases.contains('2') {
            c2.extend(two_cones());
        }
        if cases.contains('3') {
            let (s, c) = symmetric();
            c3.extend(s);
            costs.extend(c);
        }
        if cases.contains('4') {
            let (a, b) = tree();
            t1.extend(a);
            t2.extend(b);
        }
    }
    println!("\nNAT traversal, {runs} runs per case (median (min–max))\n");
    println!(
        "| case | runs with a first frame | time to first frame | of which from parent connection start | media path (ICE) | control path (libp2p to the parent) |"
    );
    println!("|---|---|---|---|---|---|");
    let ran = |c: char| cases.contains(c);
    if ran('1') {
        row("1. public broadcaster, viewer behind a cone NAT", runs, &c1);
    }
    if ran('2') {
        row("2. broadcaster and viewer behind two cone NATs", runs, &c2);
    }
    if ran('3') {
        row("3. viewer behind a symmetric NAT (TURN)", runs, &c3);
    }
    if ran('4') {
        row(
            "4. tree across three NATs: first viewer (depth 1)",
            runs,
            &t1,
        );
        row(
            "4. tree across three NATs: second viewer (depth 2, parent behind a NAT)",
            runs,
            &t2,
        );
    }
    if !costs.is_empty() {
        let w = WINDOW.as_secs_f64();
        let col = |f: &dyn Fn(&[Cost; 3]) -> f64| -> (f64, f64, f64) {
            let v: Vec<f64> = costs.iter().map(f).collect();
            let (lo, hi) = range(&v);
            (median(v), lo, hi)
        };
        let fmt =
            |(m, lo, hi): (f64, f64, f64), unit: &str| format!("{m:.2} {unit} ({lo:.2}–{hi:.2})");
        println!(
            "\nRelay and TURN cost over {w:.0} s windows, {} runs (median (min–max))\n",
            costs.len()
        );
        println!("| what | CPU | bytes/s on the host's interface |");
        println!("|---|---|---|");
        println!(
            "| relay, idle (the broadcaster's reservation) | {} | {} |",
            fmt(col(&|c| c[0].cpu_s / w * 100.0), "%"),
            fmt(col(&|c| c[0].bytes as f64 / w / 1000.0), "kB/s"),
        );
        println!(
            "| relay, one circuit (viewer ↔ broadcaster control) + the viewer's reservation | {} | {} |",
            fmt(col(&|c| c[1].cpu_s / w * 100.0), "%"),
            fmt(col(&|c| c[1].bytes as f64 / w / 1000.0), "kB/s"),
        );
        println!(
            "| relay, difference (the circuit and the viewer's own connection to the relay) | {} | {} |",
            fmt(col(&|c| (c[1].cpu_s - c[0].cpu_s) / w * 100.0), "%"),
            fmt(
                col(&|c| (c[1].bytes as f64 - c[0].bytes as f64) / w / 1000.0),
                "kB/s"
            ),
        );
        println!(
            "| relay ↔ broadcaster only, idle / with the circuit / difference (the circuit's broadcaster leg) | — | {} / {} / {} |",
            fmt(col(&|c| c[0].bcast_bytes as f64 / w / 1000.0), "kB/s"),
            fmt(col(&|c| c[1].bcast_bytes as f64 / w / 1000.0), "kB/s"),
            fmt(
                col(&|c| (c[1].bcast_bytes as f64 - c[0].bcast_bytes as f64) / w / 1000.0),
                "kB/s"
            ),
        );
        println!(
            "| coturn, one TURN media stream (the test clip, both directions) | {} | {} |",
            fmt(col(&|c| c[2].cpu_s / w * 100.0), "%"),
            fmt(col(&|c| c[2].bytes as f64 / w / 1000.0), "kB/s"),
        );
    }
}
