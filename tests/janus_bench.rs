//! Side by side with a real SFU (issue 15): the waterfall tree and Janus (Debian's `janus`, its
//! streaming plugin) serving the same VP8 stream to the same N viewers, on the same machine in
//! the same run. A hand-run benchmark (`#[ignore]`), figures printed for `BENCHMARKS.md`:
//!
//! ```text
//! cargo build --release --bin waterfall
//! WATERFALL_BENCH_BIN=target/release/waterfall JANUS_BENCH_VIEWERS=12 \
//!   cargo test --test janus_bench -- --ignored --nocapture tree_and_janus
//! ```
//!
//! `apt-get install janus` first (Debian's 1.1.2). `JANUS_BENCH_SECS` sets how long each system
//! streams; `JANUS_BENCH_DUMP=DIR` keeps every send and arrival time.
//!
//! Topology: a link lab (see `linklab`), the source's host on node 0, one viewer per node after
//! it. Both systems get the same clip (10 s of VP8 at ~500 kbit/s, looped), paced at 30 fps by a
//! process of this benchmark that notes when it sends every frame:
//! - **tree**: `waterfall broadcast --video -` on node 0 reads the frames from its stdin;
//!   `waterfall watch --video -` on every viewer node writes what it plays to stdout, where this
//!   process reads it (fanout 4: depth 2 for 12 viewers).
//! - **Janus**: the source is RTP to the streaming plugin's port on node 0 (packetized as a
//!   browser would, 1,200-byte payloads); every viewer node runs a small WebRTC client (this test
//!   binary again, in the `janus-viewer` role) that speaks Janus's HTTP API (create, attach,
//!   watch, answer, start), reassembles the frames and prints when each arrived.
//!
//! A frame is recognised at a viewer by a hash of its bytes (neither system changes them: no
//! transcoding, and waterfall's end-to-end encryption is undone at the viewer), so the latency
//! of each frame is its arrival time minus its send time, on the one clock of this machine.
//! Measured over a window once every viewer plays: latency p50/p95 (all viewers' frames), frames
//! delivered, first frame (viewer start to first frame), upload of node 0 (the source host: the
//! broadcaster, or Janus), CPU of the serving side (Janus; the broadcaster and every relay) per
//! forwarded Mbit/s (all bytes sent by every node of the system), and the total CPU.
//!
//! Skips, saying why, without root, `ip`, `janus` or `ffmpeg`.

mod linklab;
mod natlab;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use linklab::{LinkLab, Node, node_args as lab_args};
use natlab::have;

/// The waterfall binary: this build's, or `WATERFALL_BENCH_BIN` (an optimized build, so that
/// CPU figures compare like with like: Janus is optimized C).
fn bin() -> String {
    std::env::var("WATERFALL_BENCH_BIN").unwrap_or_else(|_| natlab::BIN.to_owned())
}

const FPS: u64 = 30;
const JANUS_HTTP: u16 = 8088;
const JANUS_RTP: u16 = 5004;
/// Seconds measured once every viewer plays.
const WINDOW: Duration = Duration::from_secs(20);

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

fn frame_hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// The frames of an IVF file (after its 32-byte header).
fn ivf_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 32;
    while at + 12 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 12;
        if at + len > bytes.len() {
            break;
        }
        out.push(bytes[at..at + len].to_vec());
        at += len;
    }
    out
}

/// Reads IVF from a stream: the header, then `(arrival ns, frame hash)` per frame, until EOF.
fn read_ivf_stream(mut r: impl Read, tx: mpsc::Sender<(u128, u64)>) {
    let mut header = [0u8; 32];
    if r.read_exact(&mut header).is_err() {
        return;
    }
    let mut fh = [0u8; 12];
    while r.read_exact(&mut fh).is_ok() {
        let len = u32::from_le_bytes(fh[..4].try_into().unwrap()) as usize;
        let mut f = vec![0u8; len];
        if r.read_exact(&mut f).is_err() {
            return;
        }
        if tx.send((now_ns(), frame_hash(&f))).is_err() {
            return;
        }
    }
}

/// A process in a lab namespace, killed (by pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ns_cmd(node: &Node, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &node.ns, prog]);
    c
}

fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) : utime is 14th, stime 15th.
    let rest = &s[s.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn tx_bytes(node: &Node) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .expect("cat tx_bytes");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn ticks_per_sec() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on Linux everywhere this runs.
    100.0
}

/// What one system did in the window.
#[derive(Debug, Default)]
struct Figures {
    latencies_ms: Vec<f64>,
    delivered: f64,
    first_frame_s: Vec<f64>,
    source_kbps: f64,
    serving_cpu_pct: f64,
    total_cpu_pct: f64,
    forwarded_mbps: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Frame send log: global index -> send ns; and hash -> clip index.
struct Sends {
    sent: Vec<u128>,
    by_hash: HashMap<u64, usize>,
    clip_len: usize,
}

impl Sends {
    /// The latency of a frame that arrived at `at` with this hash: the latest send of that clip
    /// frame before the arrival.
    fn latency(&self, at: u128, hash: u64) -> Option<f64> {
        let k = *self.by_hash.get(&hash)?;
        let mut g = k;
        let mut best = None;
        while g < self.sent.len() {
            if self.sent[g] <= at {
                best = Some(self.sent[g]);
            } else {
                break;
            }
            g += self.clip_len;
        }
        best.map(|s| (at - s) as f64 / 1e6)
    }
}

/// Paces the clip at 30 fps into `sink` for `secs`, logging each send time into `sent`.
fn pace(frames: &[Vec<u8>], secs: u64, mut sink: impl FnMut(usize, &[u8]) -> bool) -> Vec<u128> {
    let mut sent = Vec::new();
    let start = Instant::now();
    let total = secs * FPS;
    for g in 0..total as usize {
        let due = start + Duration::from_nanos(g as u64 * 1_000_000_000 / FPS);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        sent.push(now_ns());
        if !sink(g, &frames[g % frames.len()]) {
            break;
        }
    }
    sent
}

/// Collects `(arrival, hash)` from every viewer until `until`; returns per viewer the arrivals.
fn collect(rxs: &[mpsc::Receiver<(u128, u64)>], until: Instant, per: &mut [Vec<(u128, u64)>]) {
    while Instant::now() < until {
        for (i, rx) in rxs.iter().enumerate() {
            while let Ok(x) = rx.try_recv() {
                per[i].push(x);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The figures of a run: sends, arrivals per viewer, viewer start times and the window.
fn figures(
    sends: &Sends,
    per: &[Vec<(u128, u64)>],
    starts: &[u128],
    window: (u128, u128),
) -> Figures {
    let mut f = Figures::default();
    let in_window = sends
        .sent
        .iter()
        .filter(|&&s| s >= window.0 && s < window.1)
        .count();
    let mut got = 0usize;
    for (i, arr) in per.iter().enumerate() {
        if let Some((t, _)) = arr.first() {
            f.first_frame_s.push((t - starts[i]) as f64 / 1e9);
        }
        for &(at, h) in arr {
            if let Some(l) = sends.latency(at, h) {
                let sent = at - (l * 1e6) as u128;
                if sent >= window.0 && sent < window.1 {
                    f.latencies_ms.push(l);
                    got += 1;
                }
            }
        }
    }
    f.delivered = got as f64 / (in_window * per.len()).max(1) as f64;
    f
}

fn run_tree(lab: &mut LinkLab, nodes: &[Node], frames: &[Vec<u8>], clip_secs: u64) -> Figures {
    let mut a: Vec<String> = [
        "broadcast",
        "--room",
        "bench",
        "--no-password",
        "--video",
        "-",
        "--max-children",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(lab_args(&lab.path("b")));
    let mut b = ns_cmd(&nodes[0], &bin())
        .args(&a)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("broadcaster");
    let mut stdin = b.stdin.take().expect("stdin");
    let stdout = b.stdout.take().expect("stdout");
    let bpid = b.id();
    let _b = Proc(b);
    // The IVF header first: the broadcaster tells the format from stdin's first bytes before
    // it prints the ticket.
    // IVF header for the stream (the clip's own would do; the size and rate are what matter).
    let mut header = Vec::from(*b"DKIF");
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&32u16.to_le_bytes());
    header.extend_from_slice(b"VP80");
    header.extend_from_slice(&320u16.to_le_bytes());
    header.extend_from_slice(&240u16.to_le_bytes());
    header.extend_from_slice(&(FPS as u32).to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    stdin.write_all(&header).expect("header");
    // The ticket, before the pacer starts: frames queued in the pipe before the broadcaster
    // reads them would be played late by as much, for the whole run (it paces by timestamp).
    let mut lines = BufReader::new(stdout).lines();
    let ticket = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .find(|l| l.starts_with("wf1"))
        .expect("a ticket");
    std::thread::spawn(move || for _ in lines {});
    let frames_owned: Vec<Vec<u8>> = frames.to_vec();
    let pacer = std::thread::spawn(move || {
        pace(&frames_owned, clip_secs, |g, f| {
            let mut h = (f.len() as u32).to_le_bytes().to_vec();
            h.extend_from_slice(&(g as u64).to_le_bytes());
            stdin.write_all(&h).is_ok() && stdin.write_all(f).is_ok() && stdin.flush().is_ok()
        })
    });
    // Viewers, a moment apart.
    let mut viewers = Vec::new();
    let mut rxs = Vec::new();
    let mut starts = Vec::new();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let mut a: Vec<String> = ["watch", &ticket, "--no-password", "--video", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--max-children".into(), "4".into()]);
        a.extend(lab_args(&lab.path(&format!("v{i}"))));
        starts.push(now_ns());
        let mut c = ns_cmd(n, &bin())
            .args(&a)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("viewer");
        let out = c.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || read_ivf_stream(out, tx));
        rxs.push(rx);
        viewers.push(Proc(c));
        std::thread::sleep(Duration::from_millis(300));
    }
    let pids: Vec<u32> = std::iter::once(bpid)
        .chain(viewers.iter().map(|p| p.0.id()))
        .collect();
    measure(nodes, &rxs, &starts, &pids, &pids, pacer, frames)
}

/// Waits until every viewer plays, measures the window, and joins the pacer.
fn measure(
    nodes: &[Node],
    rxs: &[mpsc::Receiver<(u128, u64)>],
    starts: &[u128],
    serving: &[u32],
    all: &[u32],
    pacer: std::thread::JoinHandle<Vec<u128>>,
    frames: &[Vec<u8>],
) -> Figures {
    let mut per = vec![Vec::new(); rxs.len()];
    let deadline = Instant::now() + Duration::from_secs(60);
    while per.iter().any(Vec::is_empty) && Instant::now() < deadline {
        collect(rxs, Instant::now() + Duration::from_millis(200), &mut per);
    }
    let playing = per.iter().filter(|p| !p.is_empty()).count();
    eprintln!("  {playing}/{} viewers play", rxs.len());
    collect(rxs, Instant::now() + Duration::from_secs(2), &mut per);
    let tx0: Vec<u64> = nodes.iter().map(tx_bytes).collect();
    let cpu0_serving: u64 = serving.iter().map(|p| cpu_ticks(*p)).sum();
    let cpu0_all: u64 = all.iter().map(|p| cpu_ticks(*p)).sum();
    let w0 = now_ns();
    let t0 = Instant::now();
    collect(rxs, t0 + WINDOW, &mut per);
    let w1 = now_ns();
    let secs = t0.elapsed().as_secs_f64();
    let tx1: Vec<u64> = nodes.iter().map(tx_bytes).collect();
    let cpu1_serving: u64 = serving.iter().map(|p| cpu_ticks(*p)).sum();
    let cpu1_all: u64 = all.iter().map(|p| cpu_ticks(*p)).sum();
    // Stragglers: frames sent in the window that arrive a little after it.
    collect(rxs, Instant::now() + Duration::from_secs(2), &mut per);
    let sent = pacer.join().expect("pacer");
    let mut by_hash = HashMap::new();
    for (k, f) in frames.iter().enumerate() {
        by_hash.entry(frame_hash(f)).or_insert(k);
    }
    let sends = Sends {
        sent,
        by_hash,
        clip_len: frames.len(),
    };
    if let Some(dir) = std::env::var_os("JANUS_BENCH_DUMP") {
        let dir = PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let s: String = sends.sent.iter().map(|t| format!("{t}\n")).collect();
        let _ = std::fs::write(dir.join("sent.txt"), s);
        for (i, arr) in per.iter().enumerate() {
            let a: String = arr
                .iter()
                .map(|(t, h)| format!("{t} {h} {:?}\n", sends.by_hash.get(h)))
                .collect();
            let _ = std::fs::write(dir.join(format!("got{i}.txt")), a);
        }
    }
    let mut f = figures(&sends, &per, starts, (w0, w1));
    f.source_kbps = (tx1[0] - tx0[0]) as f64 * 8.0 / secs / 1e3;
    let forwarded: u64 = tx1.iter().zip(&tx0).map(|(a, b)| a - b).sum();
    f.forwarded_mbps = forwarded as f64 * 8.0 / secs / 1e6;
    f.serving_cpu_pct = (cpu1_serving - cpu0_serving) as f64 / ticks_per_sec() / secs * 100.0;
    f.total_cpu_pct = (cpu1_all - cpu0_all) as f64 / ticks_per_sec() / secs * 100.0;
    f
}

fn janus_config(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let lib = "/usr/lib/x86_64-linux-gnu/janus";
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            "general: {{\n configs_folder = \"{d}\"\n plugins_folder = \"{lib}/plugins\"\n \
             transports_folder = \"{lib}/transports\"\n events_folder = \"{lib}/events\"\n \
             loggers_folder = \"{lib}/loggers\"\n debug_level = 3\n}}\nmedia: {{\n}}\n\
             nat: {{\n ice_enforce_list = \"eth0\"\n}}\nplugins: {{\n disable = \
             \"libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,\
             libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_textroom.so,\
             libjanus_videocall.so,libjanus_videoroom.so,libjanus_voicemail.so\"\n}}\n\
             transports: {{\n disable = \"libjanus_mqtt.so,libjanus_nanomsg.so,\
             libjanus_pfunix.so,libjanus_rabbitmq.so,libjanus_websockets.so\"\n}}\n\
             events: {{\n broadcast = false\n}}\nloggers: {{\n disable = \"libjanus_jsonlog.so\"\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("janus.plugin.streaming.jcfg"),
        format!(
            "general: {{\n}}\nbench: {{\n type = \"rtp\"\n id = 1\n description = \"bench\"\n \
             audio = false\n video = true\n videoport = {JANUS_RTP}\n videopt = 96\n \
             videocodec = \"vp8\"\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("janus.transport.http.jcfg"),
        format!(
            "general: {{\n json = \"plain\"\n base_path = \"/janus\"\n http = true\n \
             port = {JANUS_HTTP}\n https = false\n}}\nadmin: {{\n admin_http = false\n}}\n"
        ),
    )
    .unwrap();
}

fn run_janus(
    lab: &mut LinkLab,
    nodes: &[Node],
    frames: &[Vec<u8>],
    clip_secs: u64,
) -> Option<Figures> {
    let conf = lab.path("janus");
    janus_config(&conf);
    let janus = ns_cmd(&nodes[0], "janus")
        .args(["-F"])
        .arg(&conf)
        .arg("-C")
        .arg(conf.join("janus.jcfg"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("janus");
    let jpid = janus.id();
    let _janus = Proc(janus);
    std::thread::sleep(Duration::from_secs(2));
    // The source: this binary again, in node 0, sending RTP to Janus's port there and printing
    // each frame's send time.
    let exe = std::env::current_exe().expect("test binary");
    let mut src = ns_cmd(&nodes[0], &exe.to_string_lossy())
        .args([
            "--exact",
            "janus_role",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("JANUS_ROLE", "source")
        .env("JANUS_CLIP", lab.path("clip.ivf"))
        .env("JANUS_SECS", clip_secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("source");
    let sout = src.stdout.take().expect("stdout");
    let _src = Proc(src);
    let (stx, srx) = mpsc::channel::<u128>();
    let pacer = std::thread::spawn(move || {
        let mut sent = Vec::new();
        for l in BufReader::new(sout).lines().map_while(Result::ok) {
            // libtest's "test janus_role ... " has no newline: the first line follows it.
            if let Some(v) = l.rfind("SENT ").map(|i| &l[i + 5..]) {
                let ns: u128 = v.trim().parse().unwrap_or(0);
                sent.push(ns);
                let _ = stx.send(ns);
            }
        }
        sent
    });
    // The first frame out: Janus has a stream to offer.
    srx.recv_timeout(Duration::from_secs(10)).ok()?;
    let mut viewers = Vec::new();
    let mut rxs = Vec::new();
    let mut starts = Vec::new();
    for n in nodes.iter().skip(1) {
        starts.push(now_ns());
        let mut c = ns_cmd(n, &exe.to_string_lossy())
            .args([
                "--exact",
                "janus_role",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("JANUS_ROLE", "viewer")
            .env("JANUS_URL", format!("{}:{JANUS_HTTP}", nodes[0].ip))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("janus viewer");
        let out = c.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let Some(i) = l.rfind("GOT ") else { continue };
                let mut it = l[i..].split_whitespace();
                if it.next() == Some("GOT")
                    && let (Some(a), Some(h)) = (it.next(), it.next())
                    && let (Ok(a), Ok(h)) = (a.parse(), h.parse())
                    && tx.send((a, h)).is_err()
                {
                    return;
                }
            }
        });
        rxs.push(rx);
        viewers.push(Proc(c));
        std::thread::sleep(Duration::from_millis(300));
    }
    let all: Vec<u32> = std::iter::once(jpid)
        .chain(viewers.iter().map(|p| p.0.id()))
        .collect();
    Some(measure(nodes, &rxs, &starts, &[jpid], &all, pacer, frames))
}

fn report(name: &str, f: &mut Figures) {
    let mut first = f.first_frame_s.clone();
    eprintln!(
        "{name:>6}: latency p50 {:.1} ms p95 {:.1} ms | delivered {:.2} % | first frame p50 {:.2} s max {:.2} s | \
         source host upload {:.0} kbit/s | forwarded {:.2} Mbit/s | serving CPU {:.1} % ({:.2} %/Mbit/s) | total CPU {:.1} %",
        pct(&mut f.latencies_ms, 0.5),
        pct(&mut f.latencies_ms, 0.95),
        f.delivered * 100.0,
        pct(&mut first, 0.5),
        pct(&mut first, 1.0),
        f.source_kbps,
        f.forwarded_mbps,
        f.serving_cpu_pct,
        f.serving_cpu_pct / f.forwarded_mbps.max(1e-9),
        f.total_cpu_pct,
    );
}

#[test]
#[ignore = "a benchmark: run by hand (see the module docs)"]
fn tree_and_janus_side_by_side() {
    if std::env::var_os("JANUS_ROLE").is_some() {
        return;
    }
    for prog in ["janus", "ffmpeg"] {
        if !have(prog) {
            eprintln!("janus_bench: skipped: `{prog}` is not installed");
            return;
        }
    }
    let Some(mut lab) = LinkLab::new() else {
        return;
    };
    let n: usize = std::env::var("JANUS_BENCH_VIEWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let nodes: Vec<Node> = (0..=n).map(|_| lab.add_node()).collect();
    let clip = lab.vp8_clip(30).expect("ffmpeg makes the clip");
    let frames = ivf_frames(&std::fs::read(&clip).unwrap());
    let secs = std::env::var("JANUS_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20 + n as u64 / 2 + WINDOW.as_secs() + 10);
    eprintln!(
        "{n} viewers, {} clip frames, {secs} s per system",
        frames.len()
    );
    eprintln!("tree:");
    let mut tree = run_tree(&mut lab, &nodes, &frames, secs);
    eprintln!("janus:");
    let mut janus = run_janus(&mut lab, &nodes, &frames, secs).expect("janus serves the stream");
    report("tree", &mut tree);
    report("janus", &mut janus);
    eprintln!(
        "ratios tree/janus: latency p50 {:.2}, source host upload {:.2}, serving CPU per forwarded Mbit/s {:.2}, total CPU {:.2}",
        pct(&mut tree.latencies_ms, 0.5) / pct(&mut janus.latencies_ms, 0.5),
        tree.source_kbps / janus.source_kbps,
        (tree.serving_cpu_pct / tree.forwarded_mbps)
            / (janus.serving_cpu_pct / janus.forwarded_mbps),
        tree.total_cpu_pct / janus.total_cpu_pct,
    );
}

/// The roles this binary plays inside the lab's namespaces (see `run_janus`); a no-op when run
/// as a test.
#[test]
#[ignore = "a role of the benchmark, not a test"]
fn janus_role() {
    match std::env::var("JANUS_ROLE").as_deref() {
        Ok("source") => role_source(),
        Ok("viewer") => {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            if let Err(e) = rt.block_on(role_viewer()) {
                eprintln!("janus viewer: {e:#}");
            }
        }
        _ => {}
    }
}

/// Sends the clip as RTP (VP8, payload type 96) to Janus's port on this host, paced at 30 fps,
/// printing `SENT <ns>` per frame.
fn role_source() {
    use bytes::Bytes;
    use rtc::rtp::packetizer::Payloader;
    let clip = std::env::var("JANUS_CLIP").expect("JANUS_CLIP");
    let secs: u64 = std::env::var("JANUS_SECS").unwrap().parse().unwrap();
    let frames = ivf_frames(&std::fs::read(clip).unwrap());
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut pay = rtc::rtp::codec::vp8::Vp8Payloader::default();
    let mut seq: u16 = 1;
    let ssrc: u32 = 0x5eed_0001;
    let stdout = std::io::stdout();
    pace(&frames, secs, |g, f| {
        // Before sending: a viewer may have the frame before this process prints.
        let at = now_ns();
        let parts = pay
            .payload(1200, &Bytes::copy_from_slice(f))
            .unwrap_or_default();
        let ts = (g as u64 * 90_000 / FPS) as u32;
        let last = parts.len().saturating_sub(1);
        for (i, p) in parts.iter().enumerate() {
            let mut pkt = Vec::with_capacity(12 + p.len());
            pkt.push(0x80);
            pkt.push(96 | if i == last { 0x80 } else { 0 });
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend_from_slice(&ts.to_be_bytes());
            pkt.extend_from_slice(&ssrc.to_be_bytes());
            pkt.extend_from_slice(p);
            seq = seq.wrapping_add(1);
            let _ = sock.send_to(&pkt, ("127.0.0.1", JANUS_RTP));
        }
        let mut o = stdout.lock();
        writeln!(o, "SENT {at}").is_ok() && o.flush().is_ok()
    });
}

/// One HTTP/1.0 request to Janus (so the body is not chunked), its JSON body back.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(40)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let json = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| anyhow::anyhow!("no HTTP body"))?;
    Ok(serde_json::from_str(json)?)
}

/// A WebRTC viewer of Janus's streaming mountpoint 1: prints `GOT <ns> <hash>` per frame.
async fn role_viewer() -> anyhow::Result<()> {
    use rtc::rtp::packetizer::Depacketizer;
    use serde_json::json;
    use waterfall::media::peer::{Peer, PeerEvent};
    use waterfall::media::{MediaConfig, SdpKind, SignalBlob};
    use webrtc::media_stream::track_remote::TrackRemoteEvent;

    let addr = std::env::var("JANUS_URL")?;
    let a = addr.clone();
    let create = tokio::task::spawn_blocking(move || {
        http(
            &a,
            "POST",
            "/janus",
            Some(&json!({"janus": "create", "transaction": "c"})),
        )
    })
    .await??;
    let session = create["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("create: {create}"))?;
    let a = addr.clone();
    let attach = tokio::task::spawn_blocking(move || {
        http(
            &a,
            "POST",
            &format!("/janus/{session}"),
            Some(
                &json!({"janus": "attach", "plugin": "janus.plugin.streaming", "transaction": "a"}),
            ),
        )
    })
    .await??;
    let handle = attach["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("attach: {attach}"))?;
    let a = addr.clone();
    tokio::task::spawn_blocking(move || {
        http(
            &a,
            "POST",
            &format!("/janus/{session}/{handle}"),
            Some(&json!({"janus": "message", "transaction": "w", "body": {"request": "watch", "id": 1}})),
        )
    })
    .await??;
    // The offer comes as an event on the session's long poll.
    let mut offer = None;
    for _ in 0..10 {
        let a = addr.clone();
        let ev = tokio::task::spawn_blocking(move || {
            http(&a, "GET", &format!("/janus/{session}?maxev=1"), None)
        })
        .await??;
        if let Some(sdp) = ev["jsep"]["sdp"].as_str() {
            offer = Some(sdp.to_owned());
            break;
        }
    }
    let offer = offer.ok_or_else(|| anyhow::anyhow!("no offer from Janus"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let config = MediaConfig::default().udp_bind("0.0.0.0".parse()?);
    let peer = Peer::new(&config, tx).await?;
    let answer = peer
        .accept_offer(&SignalBlob {
            kind: SdpKind::Offer,
            sdp: offer,
        })
        .await?;
    let a = addr.clone();
    tokio::task::spawn_blocking(move || {
        http(
            &a,
            "POST",
            &format!("/janus/{session}/{handle}"),
            Some(
                &json!({"janus": "message", "transaction": "s", "body": {"request": "start"},
                "jsep": {"type": "answer", "sdp": answer.sdp}}),
            ),
        )
    })
    .await??;
    // Keep the session alive: Janus ends sessions with no long poll for 60 s.
    let a = addr.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..600 {
            if http(&a, "GET", &format!("/janus/{session}?maxev=1"), None).is_err() {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    while let Some(ev) = rx.recv().await {
        let PeerEvent::Track(track) = ev else {
            continue;
        };
        let mut frame = Vec::new();
        let mut ts = None;
        let mut vp8 = rtc::rtp::codec::vp8::Vp8Packet::default();
        while let Some(ev) = track.poll().await {
            let TrackRemoteEvent::OnRtpPacket(p) = ev else {
                continue;
            };
            if ts != Some(p.header.timestamp) {
                frame.clear();
                ts = Some(p.header.timestamp);
            }
            if let Ok(part) = vp8.depacketize(&p.payload) {
                frame.extend_from_slice(&part);
            }
            if p.header.marker {
                println!("GOT {} {}", now_ns(), frame_hash(&frame));
                frame.clear();
            }
        }
        break;
    }
    drop(peer);
    Ok(())
}
