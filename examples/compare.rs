//! Side-by-side benchmark: the waterfall relay tree, libp2p gossipsub (default and small-mesh
//! parameters) and a star (the source sends to every viewer over WebRTC), on the same work, in
//! the same run; plus the tree under churn and the simulator at 1,000 and 10,000 nodes.
//!
//! One command regenerates everything (JSON, SVG plots and `BENCHMARKS.md`):
//!
//! ```text
//! cargo run --release --example compare -- all            # N = 10, 25, 50, 100
//! cargo run --release --example compare -- all --ns 10,25 --secs 10 --no-sim   # quicker
//! cargo run --release --example compare -- report         # rewrite BENCHMARKS.md from the JSON
//! ```
//!
//! The work: the source emits 30 messages per second of 1,200 bytes (the issue's "30 frames/s of
//! about 1.2 KB", ~288 kbit/s). Each message starts with its sequence number and its send time
//! (microseconds on a process-wide monotonic clock), so every receiver computes the end-to-end
//! latency itself. The tree and the star carry the messages on the WebRTC data channel (the
//! same relay hub as the RTP media: per-child queue, forwarded as soon as it arrives); a viewer's
//! data sink is a named pipe (FIFO) read by a thread that stamps every line as it arrives, so no
//! change to `src/` is needed to observe delivery. Gossipsub carries them as gossip messages.
//!
//! Each (way, N) runs in a fresh child process (this executable re-executed with `one WAY N
//! SECS`), inside its own network namespace when `unshare -n` is available, so that CPU time,
//! peak memory and loopback byte counters belong to that run alone. The parent collects one JSON
//! line per child.
//!
//! Timeline of one run: start the source and the 30 msg/s pacer; join the viewers while the
//! stream runs (time to first message = from the start of the join to the first message); once
//! every viewer is in, wait 2 s, then measure a window of SECS seconds; wait 3 s for stragglers.
//! Latency, delivery and duplicates count only the messages sent inside the window.

#[path = "compare/gossip.rs"]
mod gossip;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/webrtc_ways.rs"]
mod webrtc_ways;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Payload bytes per message.
pub const PAYLOAD: usize = 1200;
/// Messages per second.
pub const RATE_HZ: u64 = 30;
/// Settle time between the last join and the measurement window.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Time after the window for late messages.
pub const DRAIN: Duration = Duration::from_secs(3);

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the process-wide epoch (monotonic; every node is in this process).
pub fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// One probe message: `"<seq> <send_us> xxxx…"`, exactly [`PAYLOAD`] bytes of ASCII.
pub fn probe(seq: u64) -> Vec<u8> {
    let mut v = format!("{seq} {} ", now_us()).into_bytes();
    v.resize(PAYLOAD, b'x');
    v
}

/// Parses `(seq, send_us)` from a probe (or from the line a data sink wrote for it).
pub fn parse_probe(b: &[u8]) -> Option<(u64, u64)> {
    let mut it = b.split(|c| *c == b' ');
    let seq = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    let sent = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    Some((seq, sent))
}

/// What one receiver saw: `(seq, send_us, recv_us)` per message, duplicates included.
#[derive(Clone, Default)]
pub struct Recv(pub Arc<Mutex<Vec<(u64, u64, u64)>>>);

impl Recv {
    pub fn push(&self, seq: u64, sent: u64) {
        let now = now_us();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((seq, sent, now));
    }
    pub fn snapshot(&self) -> Vec<(u64, u64, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn first_us(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .map(|r| r.2)
    }
}

/// A named pipe a viewer's data sink writes to, read by a thread that stamps each line.
pub fn fifo_receiver(path: &Path) -> std::io::Result<Recv> {
    let st = std::process::Command::new("mkfifo").arg(path).status()?;
    if !st.success() {
        return Err(std::io::Error::other("mkfifo failed"));
    }
    let recv = Recv::default();
    let r = recv.clone();
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("fifo".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            use std::io::BufRead;
            // Blocks until the sink opens the pipe for writing (its first message).
            let Ok(f) = std::fs::File::open(&path) else {
                return;
            };
            let mut rd = std::io::BufReader::with_capacity(16 * 1024, f);
            let mut line = Vec::with_capacity(PAYLOAD + 2);
            // Bounded: ends at EOF (the sink closed) or when the process exits.
            while rd.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                if let Some((seq, sent)) = parse_probe(&line) {
                    r.push(seq, sent);
                }
                line.clear();
            }
        })?;
    Ok(recv)
}

/// The source's pacer: [`RATE_HZ`] probes per second until `stop`; returns the next seq counter.
pub fn spawn_pacer<F>(send: F) -> (Arc<AtomicU64>, tokio::sync::watch::Sender<bool>)
where
    F: Fn(Vec<u8>) + Send + 'static,
{
    let seq = Arc::new(AtomicU64::new(0));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let s = seq.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_HZ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Bounded by the stop signal (the parent also kills the child after a deadline).
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let n = s.fetch_add(1, Ordering::SeqCst);
                    send(probe(n));
                }
                _ = stop_rx.changed() => return,
            }
        }
    });
    (seq, stop_tx)
}

/// Percentiles of a sample (nearest rank), in the sample's unit.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Pct {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn pct(mut v: Vec<f64>) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Pct {
        count: v.len(),
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: *v.last().unwrap_or(&0.0),
    }
}

/// One viewer's outcome, for the common analysis.
pub struct ViewerOutcome {
    pub recv: Recv,
    /// Depth in the tree (1 = child of the source); `None` if unknown (gossip) or detached.
    pub depth: Option<u16>,
    /// When its join started (µs on the epoch clock).
    pub join_start_us: u64,
    /// Copies of messages received (gossip: before de-duplication), when known.
    pub copies_in_window: Option<u64>,
}

/// Process-level figures of one run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcFigures {
    pub cpu_s_window: f64,
    pub cpu_s_total: f64,
    pub peak_rss_mb: f64,
    pub lo_bytes_window: u64,
}

/// CPU seconds (user + system) of this process.
pub fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux.
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

/// Peak resident set size of this process, MiB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Bytes received on `lo` (in a private network namespace: this run's traffic only).
pub fn lo_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|b| b.parse().ok())
        })
        .unwrap_or(0)
}

/// The result of one (way, N) run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub way: String,
    pub n: usize,
    pub secs: u64,
    pub viewers_joined: usize,
    pub window_msgs: u64,
    pub payload_bytes: usize,
    /// Latency over every viewer, ms.
    pub latency_all_ms: Pct,
    /// Latency at the deepest viewers (tree: max depth; star: every viewer is at depth 1;
    /// gossip: the viewer with the highest median), ms.
    pub latency_deepest_ms: Pct,
    pub deepest_depth: Option<u16>,
    pub depth_histogram: BTreeMap<u16, usize>,
    /// Distinct window messages received / (viewers × window messages).
    pub delivery_ratio: f64,
    /// Extra copies received per useful byte.
    pub dup_ratio: f64,
    /// Bytes the source uploaded during the window (see `source_upload_basis`).
    pub source_upload_bytes: u64,
    pub source_upload_basis: String,
    /// Source upload as a bit rate, kbit/s.
    pub source_upload_kbps: f64,
    /// Every byte on loopback during the window (IP level, control traffic included).
    pub wire_bytes: u64,
    /// `wire_bytes` per useful payload byte delivered.
    pub wire_per_useful: f64,
    pub cpu_s_per_node: f64,
    pub cpu_s_total: f64,
    pub peak_rss_mb_per_node: f64,
    pub peak_rss_mb: f64,
    /// Time from the start of a join to the first message, ms.
    pub ttff_ms: Pct,
    pub setup_s: f64,
    pub netns: bool,
    pub notes: Vec<String>,
}

/// The common analysis of a finished run.
#[allow(clippy::too_many_arguments)]
pub fn analyse(
    way: &str,
    n: usize,
    secs: u64,
    window: (u64, u64),
    viewers: &[ViewerOutcome],
    source_upload: (u64, &str),
    procs: ProcFigures,
    setup_s: f64,
) -> RunResult {
    let (w0, w1) = window;
    let wmsgs = w1.saturating_sub(w0);
    let mut all = Vec::new();
    let mut per_viewer: Vec<(Option<u16>, Vec<f64>)> = Vec::new();
    let mut distinct_total = 0u64;
    let mut copies_total = 0u64;
    let mut ttff = Vec::new();
    let mut hist = BTreeMap::new();
    for v in viewers {
        let recs = v.recv.snapshot();
        if let Some(first) = recs.first() {
            ttff.push(first.2.saturating_sub(v.join_start_us) as f64 / 1000.0);
        }
        let mut seen = HashSet::new();
        let mut lats = Vec::new();
        let mut copies = 0u64;
        for (seq, sent, rcv) in recs {
            if seq < w0 || seq >= w1 {
                continue;
            }
            copies += 1;
            if seen.insert(seq) {
                lats.push(rcv.saturating_sub(sent) as f64 / 1000.0);
            }
        }
        distinct_total += seen.len() as u64;
        copies_total += v.copies_in_window.unwrap_or(copies).max(seen.len() as u64);
        all.extend_from_slice(&lats);
        if let Some(d) = v.depth {
            *hist.entry(d).or_insert(0) += 1;
        }
        per_viewer.push((v.depth, lats));
    }
    let deepest_depth = per_viewer.iter().filter_map(|(d, _)| *d).max();
    let deepest: Vec<f64> = match deepest_depth {
        Some(d) => per_viewer
            .iter()
            .filter(|(x, _)| *x == Some(d))
            .flat_map(|(_, l)| l.iter().copied())
            .collect(),
        None => per_viewer
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .max_by(|a, b| pct(a.1.clone()).p50.total_cmp(&pct(b.1.clone()).p50))
            .map(|(_, l)| l.clone())
            .unwrap_or_default(),
    };
    let useful = distinct_total * PAYLOAD as u64;
    RunResult {
        way: way.into(),
        n,
        secs,
        viewers_joined: viewers.len(),
        window_msgs: wmsgs,
        payload_bytes: PAYLOAD,
        latency_all_ms: pct(all),
        latency_deepest_ms: pct(deepest),
        deepest_depth,
        depth_histogram: hist,
        delivery_ratio: distinct_total as f64 / (n as u64 * wmsgs).max(1) as f64,
        dup_ratio: copies_total.saturating_sub(distinct_total) as f64
            / distinct_total.max(1) as f64,
        source_upload_bytes: source_upload.0,
        source_upload_basis: source_upload.1.into(),
        source_upload_kbps: source_upload.0 as f64 * 8.0 / 1000.0 / secs.max(1) as f64,
        wire_bytes: procs.lo_bytes_window,
        wire_per_useful: procs.lo_bytes_window as f64 / useful.max(1) as f64,
        cpu_s_per_node: procs.cpu_s_window / (n + 1) as f64,
        cpu_s_total: procs.cpu_s_window,
        peak_rss_mb_per_node: procs.peak_rss_mb / (n + 1) as f64,
        peak_rss_mb: procs.peak_rss_mb,
        ttff_ms: pct(ttff),
        setup_s,
        netns: std::env::var("COMPARE_NETNS").is_ok(),
        notes: Vec::new(),
    }
}

/// Everything the orchestrator collects.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AllResults {
    pub machine: report::Machine,
    pub command: String,
    pub runs: Vec<RunResult>,
    pub failures: Vec<String>,
    pub churn: Option<webrtc_ways::ChurnResult>,
    pub sim: Vec<serde_json::Value>,
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benchmarks")
}

fn main() -> anyhow::Result<()> {
    let _ = EPOCH.get_or_init(Instant::now);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COMPARE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match args.first().map(String::as_str) {
        Some("one") => {
            let way = args.get(1).cloned().unwrap_or_default();
            let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
            let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()?;
            let line = rt.block_on(async move {
                match way.as_str() {
                    "star" => serde_json::to_string(&webrtc_ways::star(n, secs).await?),
                    "tree" => serde_json::to_string(&webrtc_ways::tree(n, secs).await?),
                    "churn" => serde_json::to_string(&webrtc_ways::churn(n, secs).await?),
                    "gossip-default" => {
                        serde_json::to_string(&gossip::run(n, secs, gossip::Mesh::Default).await?)
                    }
                    "gossip-small" => {
                        serde_json::to_string(&gossip::run(n, secs, gossip::Mesh::Small).await?)
                    }
                    other => anyhow::bail!("unknown way {other:?}"),
                }
                .map_err(anyhow::Error::from)
            })?;
            println!("RESULT {line}");
            // Threads blocked on pipes and in-flight connections need not be unwound.
            std::process::exit(0);
        }
        Some("sim") => {
            let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            println!("RESULT {}", serde_json::to_string(&report::sim(n))?);
            Ok(())
        }
        Some("report") => {
            let dir = out_dir();
            let all: AllResults =
                serde_json::from_str(&std::fs::read_to_string(dir.join("results.json"))?)?;
            report::write_all(&all, &dir)
        }
        Some("all") => report::orchestrate(&args[1..], &out_dir()),
        _ => {
            eprintln!(
                "usage: compare all [--ns 10,25,50,100] [--secs 20] [--churn-n 50] [--churn-secs 40] [--no-sim] [--ways star,tree,...]\n       compare one WAY N SECS | sim N | report"
            );
            Ok(())
        }
    }
}
