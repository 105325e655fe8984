//! A link lab: one network namespace per node on one bridge, with per-node loss and rate limits,
//! for tests of media over real, imperfect links (`real_links`).
//!
//! Topology (every address exists only inside namespaces this lab creates):
//!
//! ```text
//!   node 0  10.77.0.10 ── veth l0 ─┐
//!   node 1  10.77.0.11 ── veth l1 ─┼── br0 (own namespace, no address)
//!   ...                            │     table bridge wflinks: per-port random drops
//!   node i  10.77.0.(10+i) ────────┘
//! ```
//!
//! **Loss** is applied on the bridge, in a `bridge`-family nftables table of the bridge's
//! namespace (`numgen random mod 100 < N drop`): a drop on a node's own egress would make its
//! `sendto` fail with EPERM, which real loss never does. [`Link::loss_up`] drops that share of
//! what the node sends (frames entering the bridge from its port), [`Link::loss_down`] of what
//! it receives (frames leaving the bridge through its port); each rule draws its own number,
//! so a packet between two lossy nodes crosses two independent chances of loss. The kernel here
//! has no netem, so there is no delay in this lab (NFQUEUE would be the way).
//!
//! **Rate**: [`LinkLab::set_rate`] puts a `tbf` on the node's side of its veth (its uplink).
//!
//! Processes run through `ip netns exec` (which execs the program, so the pid held is the
//! program's). [`LinkLab`]'s `Drop` kills every process it started (by pid; a stopped one is
//! continued first, so it can die) and deletes every namespace it made, whether the test passed
//! or panicked; namespaces left by a test process killed outright carry its pid in their name and
//! are removed by the next lab. Labs in one test binary run one at a time (a global lock): each
//! runs a dozen full nodes on a 2-core machine.
//!
//! [`LinkLab::new`] returns `None`, after printing why, where namespaces cannot be made (not
//! root, no `ip` or `nft`); tests then return early.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::natlab::{BIN, Wf, have, lines, remove_stale_namespaces, run};

static LAB_LOCK: Mutex<()> = Mutex::new(());
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);
/// Prefix of every namespace name; the test process's pid follows it.
const PREFIX: &str = "wfll";
/// Nodes a lab holds at most (one /24, and the neighbour tables' defaults hold well below it).
pub const MAX_NODES: usize = 40;

/// One node's link to the bridge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Link {
    /// Percent of what the node sends that is dropped.
    pub loss_up: u8,
    /// Percent of what the node receives that is dropped.
    pub loss_down: u8,
}

/// A node of the lab: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Node {
    /// Index in the lab.
    pub i: usize,
    /// Namespace name.
    pub ns: String,
    /// The node's address.
    pub ip: Ipv4Addr,
    /// The bridge port of its veth (in the bridge namespace).
    pub port: String,
}

/// One lab: namespaces, link rules and processes, all removed on drop.
pub struct LinkLab {
    prefix: String,
    bridge: String,
    nodes: Vec<Node>,
    links: Vec<Link>,
    procs: Vec<(String, Child)>,
    pub dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

fn ip(args: &[&str]) {
    run("ip", args, None).unwrap_or_else(|e| panic!("{e}"));
}

impl LinkLab {
    /// A new lab with its bridge and no node, or `None` (with the reason printed) where
    /// network namespaces cannot be made here.
    pub fn new() -> Option<LinkLab> {
        let serial = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let uid = Command::new("id").arg("-u").output().ok();
        if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
            eprintln!("linklab: skipped: network namespaces need root");
            return None;
        }
        for prog in ["ip", "nft", "tc"] {
            if !have(prog) {
                eprintln!("linklab: skipped: `{prog}` is not installed (iproute2, nftables)");
                return None;
            }
        }
        remove_stale_namespaces(PREFIX);
        let n = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}x{n}", std::process::id());
        let bridge = format!("{prefix}br");
        if let Err(e) = run("ip", &["netns", "add", &bridge], None) {
            eprintln!("linklab: skipped: cannot create a network namespace: {e}");
            return None;
        }
        let lab = LinkLab {
            prefix,
            bridge: bridge.clone(),
            nodes: Vec::new(),
            links: Vec::new(),
            procs: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            _serial: serial,
        };
        ip(&["-n", &bridge, "link", "set", "lo", "up"]);
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        lab.apply_rules();
        Some(lab)
    }

    /// A new node on the bridge (10.77.0.10, .11, ...), with a clean link.
    pub fn add_node(&mut self) -> Node {
        let i = self.nodes.len();
        assert!(i < MAX_NODES, "a link lab holds {MAX_NODES} nodes");
        let ns = format!("{}n{i}", self.prefix);
        ip(&["netns", "add", &ns]);
        let port = format!("l{i}");
        let addr = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
        let node = Node {
            i,
            ns: ns.clone(),
            ip: addr,
            port: port.clone(),
        };
        // Pushed before the links exist: the namespace is deleted on drop even if a step fails.
        self.nodes.push(node.clone());
        self.links.push(Link::default());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        node
    }

    /// Every node so far.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Sets a node's loss (replacing what it had).
    pub fn set_link(&mut self, node: &Node, link: Link) {
        assert!(link.loss_up <= 100 && link.loss_down <= 100);
        self.links[node.i] = link;
        self.apply_rules();
    }

    /// The same loss on every node so far, both ways.
    pub fn set_loss_everywhere(&mut self, pct: u8) {
        for l in &mut self.links {
            *l = Link {
                loss_up: pct,
                loss_down: pct,
            };
        }
        self.apply_rules();
    }

    /// Rewrites the bridge's loss table from `links` (one atomic `nft -f`).
    fn apply_rules(&self) {
        let mut rules = String::new();
        for (n, l) in self.nodes.iter().zip(&self.links) {
            if l.loss_up > 0 {
                rules.push_str(&format!(
                    "  iifname \"{}\" numgen random mod 100 < {} counter drop\n",
                    n.port, l.loss_up
                ));
            }
            if l.loss_down > 0 {
                rules.push_str(&format!(
                    "  oifname \"{}\" numgen random mod 100 < {} counter drop\n",
                    n.port, l.loss_down
                ));
            }
        }
        // `add` then `delete` then the new table: works whether or not the table exists yet.
        let script = format!(
            "table bridge wflinks\ndelete table bridge wflinks\n\
             table bridge wflinks {{\n chain links {{\n  type filter hook forward priority 0; \
             policy accept;\n{rules} }}\n}}\n"
        );
        run(
            "ip",
            &["netns", "exec", &self.bridge, "nft", "-f", "-"],
            Some(&script),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Limits what `node` sends to `kbit` kbit/s (a tbf on its veth), or lifts the limit.
    pub fn set_rate(&self, node: &Node, kbit: Option<u32>) {
        match kbit {
            Some(k) => ip(&[
                "netns",
                "exec",
                &node.ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{k}kbit"),
                "burst",
                "32kbit",
                "latency",
                "400ms",
            ]),
            None => {
                let _ = run(
                    "ip",
                    &[
                        "netns", "exec", &node.ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                    ],
                    None,
                );
            }
        }
    }

    /// Packets the bridge's loss rules dropped so far, all nodes together (rule counters;
    /// rewriting the rules resets them).
    pub fn dropped(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.bridge,
                "nft",
                "list",
                "table",
                "bridge",
                "wflinks",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.lines()
            .filter_map(|l| {
                let at = l.find("counter packets ")? + "counter packets ".len();
                l[at..].split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }

    /// A path in the lab's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The VP8 clip of the lab's media tests: 10 s of `testsrc` at ~500 kbit/s, 320x240 at
    /// 30 fps, a keyframe every `gop` frames (`clip.ivf` in the lab's directory, made with
    /// ffmpeg); `None` where ffmpeg cannot make it.
    pub fn vp8_clip(&self, gop: u32) -> Option<PathBuf> {
        let out = self.path("clip.ivf");
        let made = Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=320x240:rate=30",
            ])
            .args([
                "-t",
                "10",
                "-c:v",
                "libvpx",
                "-deadline",
                "realtime",
                "-b:v",
                "500k",
            ])
            .args(["-g", &gop.to_string(), "-y"])
            .arg(&out)
            .status()
            .is_ok_and(|s| s.success());
        made.then_some(out)
    }

    /// Start `waterfall ARGS` on `node` with its own data directory `name` (see
    /// [`node_args`]); the lab kills it on drop.
    pub fn waterfall(&mut self, node: &Node, name: &str, args: &[String]) -> Wf {
        let data_dir = self.path(name);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns, BIN])
            .args(args)
            .args(node_args(&data_dir))
            .env_remove("RUST_LOG")
            .env_remove("WATERFALL_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A debugging aid: LINKLAB_LOG is handed to every process as its RUST_LOG.
        if let Some(filter) = std::env::var_os("LINKLAB_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        // stdout carries a JSON line per second per node: echoed only on request.
        let echo = std::env::var_os("LINKLAB_ECHO").is_some();
        let out = lines(
            child.stdout.take().expect("piped"),
            &format!("{name} out"),
            echo,
        );
        let err = lines(
            child.stderr.take().expect("piped"),
            &format!("{name} err"),
            true,
        );
        self.procs.push((name.to_owned(), child));
        Wf {
            idx: self.procs.len() - 1,
            out,
            err,
            data_dir,
        }
    }

    /// The pid of a started process.
    pub fn pid(&self, idx: usize) -> u32 {
        self.procs[idx].1.id()
    }

    /// Sends `sig` (`STOP`, `CONT`, `INT`, `KILL`, ...) to one started process, by its pid.
    pub fn signal(&self, idx: usize, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid(idx).to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {}", self.pid(idx));
    }

    /// Waits at most `within` for a started process to exit; its status if it did.
    pub fn wait_exit(&mut self, idx: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.procs[idx].1.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a started process still runs.
    pub fn running(&mut self, idx: usize) -> bool {
        matches!(self.procs[idx].1.try_wait(), Ok(None))
    }
}

/// The options every `waterfall` process of a lab gets: mDNS off, TCP, QUIC and WebRTC on every
/// interface (the namespace's own), its own data directory.
pub fn node_args(data_dir: &std::path::Path) -> Vec<String> {
    [
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--listen",
        "/ip4/0.0.0.0/udp/0/quic-v1",
        "--no-mdns",
        "--udp-bind",
        "0.0.0.0",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([data_dir.to_string_lossy().into_owned()])
    .collect()
}

impl Drop for LinkLab {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            if matches!(c.try_wait(), Ok(None)) {
                // A stopped process takes SIGKILL too, but continue it so nothing lingers.
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for ns in self
            .nodes
            .iter()
            .map(|n| n.ns.as_str())
            .chain([self.bridge.as_str()])
        {
            let ok = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("linklab: could not delete namespace {ns}");
            }
        }
    }
}
