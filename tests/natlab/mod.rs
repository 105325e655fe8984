//! A NAT lab built from Linux network namespaces, for the `nat_*` tests.
//!
//! Topology (every address exists only inside namespaces this lab creates):
//!
//! ```text
//!   public host  203.0.113.10+i ──┐
//!   public host  ...              ├── bridge (own namespace, no address)
//!   router k WAN 203.0.113.100+k ─┘
//!   router k LAN 192.168.k.1 ── host k 192.168.k.2 (default route via the router)
//!   sink         203.0.113.254 ──┘ (default route of public hosts and routers)
//! ```
//!
//! A router forwards LAN -> WAN and established/related traffic back (policy drop otherwise),
//! drops unsolicited traffic to itself, and masquerades on its WAN leg: plain `masquerade` keeps the source port for every destination
//! and accepts replies only from the contacted address and port (a port-restricted cone NAT);
//! `masquerade random,fully-random` picks a new port per destination (a symmetric NAT). The
//! input drop matters: without it, a peer's packet that reaches the router before our own
//! first packet to that peer leaves a conntrack entry for the router itself, and masquerade
//! then picks a new port for our flow (a cone NAT turning symmetric, hole punching failing);
//! a dropped packet's entry is never confirmed, as on home routers.
//!
//! Public hosts and routers route everything else to the *sink*, a namespace that does not
//! forward: like the internet, it swallows packets to private addresses of other sites
//! silently. (Without a default route, sending there fails at once with "network
//! unreachable", which no real host sees, and coturn closes a TURN allocation on such an
//! error.) The sink has no route at all and no namespace has a link outside the lab, so nothing
//! can leave it.
//!
//! Processes run in a namespace through `ip netns exec` (which execs the program, so the pid we
//! hold is the program's). [`Lab`]'s `Drop` kills every process it started by pid and deletes
//! every namespace it created, whether the test passed or panicked. Labs in one test binary run
//! one at a time (a global lock): each starts several full nodes and the machines have 2 cores.
//!
//! [`Lab::new`] returns `None`, after printing why, where namespaces cannot be made (not root,
//! no `ip` or `nft`); tests then return early.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

/// The waterfall binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_waterfall");

static LAB_LOCK: Mutex<()> = Mutex::new(());

/// The sink's address: the default gateway of the public segment.
pub const SINK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// How a router translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping, port-restricted filtering (nft `masquerade`).
    Cone,
    /// A new mapping per destination (nft `masquerade random,fully-random`).
    Symmetric,
}

/// A host of the lab: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// The host's own address.
    pub ip: Ipv4Addr,
    /// The public address of its NAT router, if it is behind one.
    pub nat_ip: Option<Ipv4Addr>,
    /// The namespace of its NAT router, if it is behind one.
    pub router_ns: Option<String>,
}

/// A coturn server running in the lab.
#[derive(Debug, Clone)]
pub struct Turn {
    /// `turn:IP:3478?transport=udp`.
    pub url: String,
    /// `stun:IP:3478`.
    pub stun_url: String,
    pub user: String,
    pub password: String,
}

/// One lab: namespaces and processes, all removed on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<(String, Child)>,
    public_hosts: u8,
    routers: u8,
    pub dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    run_ok("ip", args, None);
}

fn run_ok(prog: &str, args: &[&str], stdin: Option<&str>) {
    run(prog, args, stdin).unwrap_or_else(|e| panic!("{e}"));
}

/// Runs `prog ARGS` (with `stdin` written to it), its stderr in the error on failure.
/// Shared with `linklab`.
pub fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("spawning {prog}: {e}"))?;
    if let Some(s) = stdin {
        use std::io::Write;
        let mut w = child.stdin.take().expect("piped stdin");
        w.write_all(s.as_bytes())
            .map_err(|e| format!("writing to {prog}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{prog} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces named `PREFIX<pid>x...` of labs whose test process died without running `Drop`
/// (killed by a signal). Shared with `linklab`.
pub fn remove_stale_namespaces(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some((pid, _)) = name.strip_prefix(prefix).and_then(|r| r.split_once('x')) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether `prog` is on the PATH. Shared with `linklab`.
pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Lab {
    /// A new, empty lab with its bridge, or `None` (with the reason printed) where network
    /// namespaces cannot be made here.
    pub fn new() -> Option<Lab> {
        let serial = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let uid = Command::new("id").arg("-u").output().ok();
        if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
            eprintln!("natlab: skipped: network namespaces need root");
            return None;
        }
        for prog in ["ip", "nft"] {
            if !have(prog) {
                eprintln!("natlab: skipped: `{prog}` is not installed (iproute2, nftables)");
                return None;
            }
        }
        remove_stale_namespaces("wfnat");
        let n = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wfnat{}x{n}", std::process::id());
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            procs: Vec::new(),
            public_hosts: 0,
            routers: 0,
            dir: tempfile::tempdir().expect("temp dir"),
            _serial: serial,
        };
        let br = lab.ns_name("br");
        let made = Command::new("ip")
            .args(["netns", "add", &br])
            .stderr(Stdio::piped())
            .output();
        match made {
            Ok(o) if o.status.success() => lab.namespaces.push(br.clone()),
            Ok(o) => {
                eprintln!(
                    "natlab: skipped: cannot create a network namespace: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("natlab: skipped: cannot run ip: {e}");
                return None;
            }
        }
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        let sink = lab.add_ns("sk");
        lab.attach(&sink, "sk", "eth0", SINK);
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &sink,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=0",
            ],
            None,
        );
        Some(lab)
    }

    fn ns_name(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    /// The sink's namespace.
    pub fn sink_ns(&self) -> &str {
        &self.namespaces[1]
    }

    fn bridge(&self) -> &str {
        &self.namespaces[0]
    }

    fn add_ns(&mut self, what: &str) -> String {
        let ns = self.ns_name(what);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Attach `ns` to the bridge with `addr` on its interface `ifname`.
    fn attach(&self, ns: &str, port: &str, ifname: &str, addr: Ipv4Addr) {
        let br = self.bridge().to_owned();
        ip(&[
            "-n", &br, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns,
        ]);
        ip(&["-n", &br, "link", "set", port, "master", "br0", "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            ifname,
        ]);
        ip(&["-n", ns, "link", "set", ifname, "up"]);
    }

    /// A host on the public segment (203.0.113.10, .11, ...).
    pub fn public_host(&mut self) -> Host {
        let i = self.public_hosts;
        self.public_hosts += 1;
        let ns = self.add_ns(&format!("p{i}"));
        let addr = Ipv4Addr::new(203, 0, 113, 10 + i);
        self.attach(&ns, &format!("p{i}"), "eth0", addr);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &SINK.to_string(),
        ]);
        Host {
            ns,
            ip: addr,
            nat_ip: None,
            router_ns: None,
        }
    }

    /// A router with a NAT of `kind` (WAN 203.0.113.(101+k)) and one host behind it
    /// (192.168.(k+1).2).
    pub fn nat_host(&mut self, kind: NatKind) -> Host {
        let k = self.routers;
        self.routers += 1;
        let router = self.add_ns(&format!("r{k}"));
        let host = self.add_ns(&format!("h{k}"));
        let wan = Ipv4Addr::new(203, 0, 113, 101 + k);
        self.attach(&router, &format!("r{k}"), "wan", wan);
        ip(&[
            "-n",
            &router,
            "route",
            "add",
            "default",
            "via",
            &SINK.to_string(),
        ]);
        let lan_net = k + 1;
        ip(&[
            "-n", &router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
            &host,
        ]);
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("192.168.{lan_net}.1/24"),
            "dev",
            "lan",
        ]);
        ip(&["-n", &router, "link", "set", "lan", "up"]);
        let host_ip = Ipv4Addr::new(192, 168, lan_net, 2);
        ip(&[
            "-n",
            &host,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &host, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            &format!("192.168.{lan_net}.1"),
        ]);
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
            None,
        );
        let masq = match kind {
            NatKind::Cone => "masquerade",
            NatKind::Symmetric => "masquerade random,fully-random",
        };
        let rules = format!(
            "table ip wfnat {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  \
             oifname \"wan\" {masq}\n }}\n}}\n\
             table ip wffilter {{\n chain fw {{\n  type filter hook forward priority filter; \
             policy drop;\n  ct state established,related accept\n  iifname \"lan\" oifname \
             \"wan\" accept\n }}\n chain in {{\n  type filter hook input priority filter; \
             policy drop;\n  ct state established,related accept\n  iifname \"lo\" accept\n  \
             iifname \"lan\" accept\n }}\n}}\n"
        );
        run_ok(
            "ip",
            &["netns", "exec", &router, "nft", "-f", "-"],
            Some(&rules),
        );
        Host {
            ns: host,
            ip: host_ip,
            nat_ip: Some(wan),
            router_ns: Some(router),
        }
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.ns]).arg(program);
        c
    }

    /// Run a command to completion inside `host`.
    pub fn output(&self, host: &Host, program: &str, args: &[&str]) -> Output {
        self.command(host, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Start `cmd` (built with [`Lab::command`]); the lab kills it on drop. Returns the child's
    /// index for [`Lab::child`] and [`Lab::kill`].
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> usize {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        self.procs.push((name.to_owned(), child));
        self.procs.len() - 1
    }

    /// A started process.
    pub fn child(&mut self, i: usize) -> &mut Child {
        &mut self.procs[i].1
    }

    /// Kill one started process now (by its pid) and reap it.
    pub fn kill(&mut self, i: usize) {
        let c = &mut self.procs[i].1;
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Start coturn on `host` as STUN and TURN server (long-term credentials), or `None` with
    /// the reason printed when coturn is not installed.
    pub fn turn_server(&mut self, host: &Host) -> Option<Turn> {
        if !have("turnserver") {
            eprintln!("natlab: coturn (turnserver) is not installed: TURN case skipped");
            return None;
        }
        let db = self.dir.path().join("turndb");
        let log = self.dir.path().join("turn.log");
        let (user, password) = ("wf", "lab-secret");
        let mut cmd = self.command(host, "turnserver");
        cmd.args([
            "-n",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--lt-cred-mech",
            "--simple-log",
            "--realm=waterfall.test",
            "--listening-port=3478",
            "--min-port=49152",
            "--max-port=49999",
        ])
        .arg(format!("--listening-ip={}", host.ip))
        .arg(format!("--relay-ip={}", host.ip))
        .arg(format!("--user={user}:{password}"))
        .arg("--userdb")
        .arg(&db)
        .arg("--log-file")
        .arg(&log)
        .arg("--pidfile")
        .arg(self.dir.path().join("turn.pid"))
        .arg("--verbose")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.spawn("turnserver", cmd);
        // Ready when it answers a STUN binding request.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The client waits forever for an answer that never comes: bound it.
            let out = self.output(
                host,
                "timeout",
                &["2", "turnutils_stunclient", &host.ip.to_string()],
            );
            if String::from_utf8_lossy(&out.stdout).contains("reflexive addr")
                || String::from_utf8_lossy(&out.stderr).contains("reflexive addr")
            {
                break;
            }
            assert!(Instant::now() < deadline, "coturn did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(Turn {
            url: format!("turn:{}:3478?transport=udp", host.ip),
            stun_url: format!("stun:{}:3478", host.ip),
            user: user.into(),
            password: password.into(),
        })
    }

    /// A path in the lab's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.path("turn.log"))
        {
            // A failing TURN case is explained by the server's side.
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for l in tail.iter().rev() {
                eprintln!("[turn log] {l}");
            }
        }
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let ok = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("natlab: could not delete namespace {ns}");
            }
        }
    }
}

/// Lines of a child's stdout (or stderr), delivered on a channel by a reader thread; each line
/// is also echoed to the test's stderr with `tag` so a failing test shows what happened.
pub fn lines(
    out: impl std::io::Read + Send + 'static,
    tag: &str,
    echo: bool,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let tag = tag.to_owned();
    std::thread::spawn(move || {
        // Status lines end in '\r', not '\n': split on both, so later lines stay apart.
        let mut r = BufReader::new(out);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&buf).into_owned();
            buf.clear();
            for l in text.split(['\r', '\n']).filter(|l| !l.trim().is_empty()) {
                if echo {
                    eprintln!("[{tag}] {l}");
                }
                if tx.send(l.to_owned()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Wait for a line matching `pred`; panics with `what` after `within`.
pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    what: &str,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    try_wait_line(rx, within, pred).unwrap_or_else(|| panic!("no {what} within {within:?}"))
}

/// Wait for a line matching `pred`, or `None` after `within` or when the stream ends.
pub fn try_wait_line(
    rx: &mpsc::Receiver<String>,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return Some(l),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Frames in an IVF file (0 when it cannot be read).
pub fn frames(path: &Path) -> usize {
    waterfall::media::source::read_all_frames(path)
        .map(|f| f.len())
        .unwrap_or(0)
}

/// The clip every broadcaster sends.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `ffmpeg` decodes the file without an error (skipped, with a note, without ffmpeg).
pub fn ffmpeg_decodes(path: &Path) {
    match Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
    {
        Ok(out) => assert!(
            out.status.success() && out.stderr.is_empty(),
            "ffmpeg rejects {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!(
            "ffmpeg not installed: decode check of {} skipped",
            path.display()
        ),
    }
}

/// A `waterfall` process in the lab, with its stdout and stderr lines.
pub struct Wf {
    /// Index for [`Lab::kill`].
    pub idx: usize,
    /// stdout lines (tickets, `--json` events).
    pub out: mpsc::Receiver<String>,
    /// stderr lines (messages).
    pub err: mpsc::Receiver<String>,
    /// Its data directory (identity).
    pub data_dir: PathBuf,
}

/// Listen on every interface of the namespace, TCP and QUIC, on `port` (0 = any).
pub fn listen_all(port: u16) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("/ip4/0.0.0.0/tcp/{port}"),
        "--listen".into(),
        format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
    ]
}

impl Lab {
    /// The peer id a data directory's identity has (created on first use).
    pub fn peer_id(&self, data_dir: &Path) -> String {
        let out = Command::new(BIN)
            .args(["keygen", "--data-dir"])
            .arg(data_dir)
            .output()
            .expect("running keygen");
        assert!(out.status.success(), "keygen failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Start `waterfall ARGS` on `host` with its own data directory `name` (and mDNS off,
    /// WebRTC on every interface); `env` adds environment variables.
    pub fn waterfall(
        &mut self,
        host: &Host,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Wf {
        let data_dir = self.path(name);
        let mut cmd = self.command(host, BIN);
        cmd.args(args)
            .args(["--no-mdns", "--udp-bind", "0.0.0.0", "--data-dir"])
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let idx = self.spawn(name, cmd);
        let child = self.child(idx);
        let out = lines(
            child.stdout.take().expect("piped"),
            &format!("{name} out"),
            true,
        );
        let err = lines(
            child.stderr.take().expect("piped"),
            &format!("{name} err"),
            true,
        );
        Wf {
            idx,
            out,
            err,
            data_dir,
        }
    }
}

/// Every line still queued on `rx` (those a `wait_line` passed over are gone).
pub fn rest(rx: &mpsc::Receiver<String>) -> Vec<String> {
    rx.try_iter().collect()
}

/// No log line of another crate (or a warning of ours) among `lines`: what a user sees on
/// stderr in a working setup is our messages and notices, nothing else. webrtc-rs reports a
/// refused TURN allocation as an `ERROR` and libp2p's AutoNAT warns about routine timeouts;
/// the CLI's default filter silences both (our own notices say what matters in words).
pub fn assert_quiet(who: &str, lines: &[String]) {
    for l in lines {
        let t = l.trim_start();
        assert!(
            !(t.starts_with("ERROR") || t.starts_with("WARN") || t.contains("libp2p_")),
            "{who} printed log noise: {l:?}\nall of its stderr:\n{}",
            lines.join("\n")
        );
    }
}

// ----- the waterfall roles of the NAT cases (nat_media.rs, nat_bench.rs) -----

/// Owned strings of `list`.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The room password every NAT case uses, in a file; returns its path.
pub fn write_password(lab: &Lab) -> String {
    let pw = lab.path("pw.txt");
    std::fs::write(&pw, "nat-secret\n").unwrap();
    pw.to_string_lossy().into_owned()
}

/// Start a broadcaster of the looping clip on `host`; returns it, its ticket and the lines it
/// printed before the ticket.
pub fn broadcaster(lab: &mut Lab, host: &Host, extra: &[String]) -> (Wf, String, Vec<String>) {
    let pw = write_password(lab);
    let video = fixture("f.ivf").to_string_lossy().into_owned();
    let mut a = args(&[
        "broadcast",
        "--room",
        "nat-room",
        "--password-file",
        &pw,
        "--video",
        &video,
        "--loop",
        "--json",
    ]);
    a.extend(listen_all(0));
    a.extend_from_slice(extra);
    let b = lab.waterfall(host, "bcast", &a, &[]);
    let seen = std::cell::RefCell::new(Vec::new());
    let ticket = wait_line(&b.out, "ticket", Duration::from_secs(90), |l| {
        seen.borrow_mut().push(l.to_owned());
        l.starts_with("wf1")
    });
    (b, ticket, seen.into_inner())
}

/// The addresses a ticket carries.
pub fn ticket_addrs(ticket: &str) -> Vec<String> {
    ticket
        .parse::<waterfall::wire::Ticket>()
        .expect("a valid ticket")
        .addrs
}

/// Start a viewer of `ticket` on `host` writing `name.ivf`.
pub fn viewer(
    lab: &mut Lab,
    host: &Host,
    name: &str,
    ticket: &str,
    extra: &[String],
    env: &[(&str, &str)],
) -> (Wf, std::path::PathBuf) {
    let pw = lab.path("pw.txt").to_string_lossy().into_owned();
    let video = lab.path(&format!("{name}.ivf"));
    let mut a = args(&[
        "watch",
        ticket,
        "--password-file",
        &pw,
        "--video",
        &video.to_string_lossy(),
        "--json",
    ]);
    a.extend(listen_all(0));
    a.extend_from_slice(extra);
    (lab.waterfall(host, name, &a, env), video)
}

/// A public `waterfall node` called `name` on `host`, listening on port 4001 (TCP and QUIC);
/// returns it and its bootstrap flags (both transports: AutoNAT learns a QUIC address of ours
/// only over a QUIC connection, and only a QUIC dial-back fails fast enough to tell).
pub fn public_node(lab: &mut Lab, host: &Host, name: &str, extra: &[&str]) -> (Wf, Vec<String>) {
    let dir = lab.path(name);
    let id = lab.peer_id(&dir);
    let mut a = args(&["node"]);
    a.extend(listen_all(4001));
    a.extend(args(extra));
    let r = lab.waterfall(host, name, &a, &[]);
    wait_line(&r.err, "node listening", Duration::from_secs(30), |l| {
        l.starts_with("listening:")
    });
    let ip = host.ip;
    let boot = vec![
        "--bootstrap".into(),
        format!("/ip4/{ip}/tcp/4001/p2p/{id}"),
        "--bootstrap".into(),
        format!("/ip4/{ip}/udp/4001/quic-v1/p2p/{id}"),
    ];
    (r, boot)
}
