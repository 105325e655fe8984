//! Node-level figures, all nodes in this one process on loopback (a benchmark: it reports, it
//! does not assert).
//!
//! ```text
//! cargo run --release --example node_bench -- [--json] [--viewers 20,50] [--wave 10]
//!     [--only join,memory,hops,cpu]
//! ```
//!
//! - **join** (a, c): for each viewer count, a fresh room (the fixture clip looped, fanout 4);
//!   viewers join one after the other, then (another fresh room) in concurrent waves of
//!   `--wave`. For each viewer: time from the `watch()` call to `RoomEvent::Joined` (a parent in
//!   the tree), to `MediaEvent::ParentConnected` (WebRTC up) and to the first video frame written
//!   (`MediaEvent::FirstFrame`). The clip has a keyframe every second, so the first frame waits
//!   up to 1 s for one. Keys are derived with `KdfParams::TEST_ONLY`; the cost of the real
//!   (`STRONG`) derivation, paid once per `watch()`, is reported separately.
//! - **memory** (b): VmRSS of this process before and after starting 20 idle nodes bootstrapped
//!   from one more node, divided by 20 (the bootstrap node's share is included). Runs first, on a
//!   fresh heap.
//! - **hops** (d): a chain (every node takes at most one child) of 5 viewers below the
//!   broadcaster. The broadcaster sends timestamped data lines; each viewer's data sink is a file
//!   polled every millisecond, so an arrival is timestamped within ~1 ms. Reported: latency by
//!   depth and the per-hop increment.
//! - **cpu** (e): process CPU (utime+stime from /proc/self/stat) per wall second while a 10 s
//!   1280x720 2.5 Mbit/s VP8 clip (made with ffmpeg at run time in a temp dir; skipped without
//!   ffmpeg) streams to 4 viewers, (i) directly from the broadcaster and (ii) through one relay
//!   node that forwards to the 4. Alternated twice; the ratio and the difference (the relay's
//!   cost, in cores) are reported.
//!
//! The machine is shared and noisy: compare figures of one run, read medians and spread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use waterfall::media::MediaKind;
use waterfall::{
    Broadcast, FileSource, KdfParams, MediaEvent, MediaSource, Node, RoomConfig, RoomEvent,
    RoomEvents, RoomKeys, SinkTarget, Sinks, SourceOptions, Ticket, Watch, WatchConfig,
};

const PASSWORD: &str = "bench";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Args {
    json: bool,
    viewers: Vec<usize>,
    wave: usize,
    only: Option<Vec<String>>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        json: false,
        viewers: vec![20, 50],
        wave: 10,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |n: &str| it.next().with_context(|| format!("{n} needs a value"));
        match arg.as_str() {
            "--json" => a.json = true,
            "--viewers" => {
                a.viewers = val("--viewers")?
                    .split(',')
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--wave" => a.wave = val("--wave")?.parse()?,
            "--only" => a.only = Some(val("--only")?.split(',').map(str::to_owned).collect()),
            "--bench" => {} // passed by `cargo bench`-style runners
            other => bail!("unknown argument {other:?}"),
        }
    }
    anyhow::ensure!(
        a.viewers.iter().all(|n| (1..=200).contains(n)),
        "--viewers: 1..=200 each"
    );
    anyhow::ensure!((1..=50).contains(&a.wave), "--wave: 1..=50");
    Ok(a)
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Median, p95, min, max of a sample (milliseconds or any unit).
fn summary(mut xs: Vec<f64>) -> Value {
    if xs.is_empty() {
        return json!({ "n": 0 });
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    json!({
        "n": xs.len(),
        "p50": round(q(0.5)),
        "p95": round(q(0.95)),
        "min": round(xs[0]),
        "max": round(xs[xs.len() - 1]),
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn fmt_summary(v: &Value) -> String {
    if v["n"].as_u64().unwrap_or(0) == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {:>8.2}  p95 {:>8.2}  [{:.2} .. {:.2}]  n={}",
        v["p50"].as_f64().unwrap_or(f64::NAN),
        v["p95"].as_f64().unwrap_or(f64::NAN),
        v["min"].as_f64().unwrap_or(f64::NAN),
        v["max"].as_f64().unwrap_or(f64::NAN),
        v["n"]
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of this process, in clock ticks.
fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the ')' field 0 is the state; utime and stime are fields 11 and 12.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// Nodes and rooms

fn tree_cfg() -> waterfall::proto::Config {
    // Measure joins, not make-before-break moves.
    waterfall::proto::Config::default().rebalance_interval_ms(0)
}

async fn node(max_children: Option<u16>, boot: Vec<Multiaddr>) -> anyhow::Result<Node> {
    let mut b = Node::builder().kdf(KdfParams::TEST_ONLY).bootstrap(boot);
    if let Some(m) = max_children {
        b = b.max_children(m);
    }
    Ok(b.spawn().await?)
}

struct Room {
    node: Node,
    room: Broadcast,
    ticket: Ticket,
    boot: Vec<Multiaddr>,
    events: RoomEvents,
}

async fn room(
    name: &str,
    video: &Path,
    loops: Option<u32>,
    audio: bool,
    max_children: u16,
    autostart: bool,
) -> anyhow::Result<Room> {
    let node = node(Some(max_children), Vec::new()).await?;
    let opts = SourceOptions {
        loops,
        ..SourceOptions::default()
    };
    let mut cfg = RoomConfig::new(name)
        .password(PASSWORD)
        .fanout(4)
        .source(Box::new(FileSource::open(video, opts.clone()).await?) as Box<dyn MediaSource>);
    if audio {
        cfg = cfg.source(Box::new(FileSource::open(fixture("f.ogg"), opts).await?));
    }
    let (room, events) = node
        .broadcast(cfg.autostart(autostart).tree(tree_cfg()))
        .await?;
    let ticket = room.ticket().clone();
    let boot = node.addrs().await?;
    Ok(Room {
        node,
        room,
        ticket,
        boot,
        events,
    })
}

/// When things happened to one viewer, measured from its `watch()` call.
#[derive(Default, Clone, Copy)]
struct Times {
    /// `watch()` returned (key derivation + record lookup done).
    returned: Option<Duration>,
    joined: Option<Duration>,
    connected: Option<Duration>,
    first_video: Option<Duration>,
    /// Media payload bytes received so far (from the last stats event).
    bytes_in: u64,
}

struct Viewer {
    node: Node,
    room: Watch,
    times: Arc<Mutex<Times>>,
}

impl Viewer {
    fn times(&self) -> Times {
        *self.times.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watch by ticket, timing from the call; a task records the milestones.
async fn watch(node: Node, ticket: &Ticket, sinks: Sinks) -> anyhow::Result<Viewer> {
    let t0 = Instant::now();
    let (room, mut events) = node
        .watch(
            ticket.clone(),
            WatchConfig::new()
                .password(PASSWORD)
                .sinks(sinks)
                .tree(tree_cfg()),
        )
        .await?;
    let times = Arc::new(Mutex::new(Times {
        returned: Some(t0.elapsed()),
        ..Times::default()
    }));
    let t = times.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let now = t0.elapsed();
            let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
            match ev {
                RoomEvent::Joined { .. } => {
                    g.joined.get_or_insert(now);
                }
                RoomEvent::Media(MediaEvent::ParentConnected) => {
                    g.connected.get_or_insert(now);
                }
                RoomEvent::Media(MediaEvent::FirstFrame {
                    kind: MediaKind::Video,
                    ..
                }) => {
                    g.first_video.get_or_insert(now);
                }
                RoomEvent::Media(MediaEvent::Stats(st)) => g.bytes_in = st.bytes_in,
                RoomEvent::Ended => break,
                _ => {}
            }
        }
    });
    Ok(Viewer { node, room, times })
}

async fn wait_for(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !pred() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Leave every room (in parallel), then stop every node.
async fn teardown(viewers: Vec<Viewer>, root: Room) {
    let mut nodes = Vec::new();
    let mut leaves = Vec::new();
    for v in viewers {
        nodes.push(v.node);
        leaves.push(v.room.leave());
    }
    futures::future::join_all(leaves).await;
    root.room.leave().await;
    nodes.push(root.node);
    futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
}

// ---------------------------------------------------------------------------------------------
// (a) + (c) join latency and time to first frame

async fn join_run(n: usize, wave: usize) -> anyhow::Result<Value> {
    let name = format!("join-{n}-{wave}");
    let root = room(&name, &fixture("f.ivf"), Some(10_000), true, 4, true).await?;
    let mut viewers: Vec<Viewer> = Vec::new();
    let mut failures = 0usize;
    let t_all = Instant::now();
    let mut i = 0;
    while i < n {
        let k = wave.min(n - i);
        // Nodes start before the clock runs: the figure is the room join, not the node start.
        let mut nodes = Vec::new();
        for _ in 0..k {
            nodes.push(node(None, root.boot.clone()).await?);
        }
        let joined = futures::future::join_all(
            nodes
                .into_iter()
                .map(|nd| watch(nd, &root.ticket, Sinks::default())),
        )
        .await;
        let start = viewers.len();
        for j in joined {
            match j {
                Ok(v) => viewers.push(v),
                Err(e) => {
                    failures += 1;
                    eprintln!("  watch failed: {e}");
                }
            }
        }
        let batch = &viewers[start..];
        if !wait_for(Duration::from_secs(30), || {
            batch.iter().all(|v| v.times().first_video.is_some())
        })
        .await
        {
            eprintln!("  some viewers of this batch saw no video within 30 s");
        }
        i += k;
    }
    let formed = t_all.elapsed();
    let mut depths = Vec::new();
    for v in &viewers {
        if let Ok(s) = v.room.status().await
            && let Some(d) = s.depth
        {
            depths.push(d);
        }
    }
    let times: Vec<Times> = viewers.iter().map(Viewer::times).collect();
    let pick = |f: fn(&Times) -> Option<Duration>| -> Vec<f64> {
        times.iter().filter_map(f).map(ms).collect()
    };
    let missing = times.iter().filter(|t| t.first_video.is_none()).count();
    let out = json!({
        "viewers": n,
        "wave": wave,
        "watch_returned_ms": summary(pick(|t| t.returned)),
        "to_joined_ms": summary(pick(|t| t.joined)),
        "to_parent_connected_ms": summary(pick(|t| t.connected)),
        "to_first_video_frame_ms": summary(pick(|t| t.first_video)),
        "attached": depths.len(),
        "max_depth": depths.iter().max(),
        "watch_errors": failures,
        "without_video": missing,
        "all_joined_s": round(formed.as_secs_f64()),
    });
    teardown(viewers, root).await;
    Ok(out)
}

async fn kdf_cost() -> anyhow::Result<Value> {
    let mut xs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        tokio::task::spawn_blocking(|| {
            RoomKeys::derive("bench", Some(PASSWORD), KdfParams::STRONG)
        })
        .await??;
        xs.push(ms(t.elapsed()));
    }
    Ok(summary(xs))
}

// ---------------------------------------------------------------------------------------------
// (b) memory per idle node

async fn memory() -> anyhow::Result<Value> {
    const N: usize = 20;
    // Settle the runtime's own allocations first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = vm_rss_kib();
    let boot = node(None, Vec::new()).await?;
    let addrs = boot.addrs().await?;
    let mut nodes = vec![boot];
    for _ in 0..N {
        nodes.push(node(None, addrs.clone()).await?);
    }
    // Let the connections, identify and the DHT bootstrap settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = vm_rss_kib();
    // Idle CPU of the 21 nodes over 5 s.
    let (c0, t0) = (cpu_ticks(), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cores = (cpu_ticks() - c0) as f64 / clock_ticks_per_sec() / t0.elapsed().as_secs_f64();
    let connected = nodes[0].net().connected_peers().await.map(|p| p.len()).ok();
    futures::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    Ok(json!({
        "nodes": N,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "per_node_kib": round((after.saturating_sub(before)) as f64 / N as f64),
        "idle_cpu_cores_all_nodes": round(idle_cores * 1000.0) / 1000.0,
        "bootstrap_connected_peers": connected,
    }))
}

// ---------------------------------------------------------------------------------------------
// (d) per-hop latency along a chain

async fn hops(depth: usize) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let root = room("chain", &fixture("f.ivf"), Some(10_000), true, 1, true).await?;
    let mut viewers = Vec::new();
    let mut files = Vec::new();
    for d in 1..=depth {
        let file = dir.path().join(format!("d{d}.txt"));
        let nd = node(Some(1), root.boot.clone()).await?;
        let sinks = Sinks {
            data: Some(SinkTarget::File(file.clone())),
            ..Sinks::default()
        };
        let v = watch(nd, &root.ticket, sinks).await?;
        if !wait_for(Duration::from_secs(30), || v.times().connected.is_some()).await {
            bail!("chain node {d} did not connect within 30 s");
        }
        viewers.push(v);
        files.push(file);
    }
    let mut depths = Vec::new();
    for v in &viewers {
        depths.push(v.room.status().await?.depth);
    }
    // Data channels open shortly after the media connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    const MSGS: usize = 40;
    // A plain thread polls the sink files in a tight loop (resolution: tens of microseconds)
    // while the runtime sends one line every 50 ms. Both are bounded in time.
    let epoch = std::time::Instant::now();
    let poll_files = files.clone();
    let poller = std::thread::spawn(move || {
        let n = poll_files.len();
        let mut arrivals = vec![vec![None::<f64>; MSGS]; n];
        let mut seen_len = vec![0usize; n];
        let deadline = epoch + Duration::from_millis(MSGS as u64 * 50 + 5_000);
        while std::time::Instant::now() < deadline {
            for (d, f) in poll_files.iter().enumerate() {
                let len = std::fs::metadata(f).map(|m| m.len() as usize).unwrap_or(0);
                if len > seen_len[d] {
                    let t = ms(epoch.elapsed());
                    let text = std::fs::read_to_string(f).unwrap_or_default();
                    for line in text.get(seen_len[d]..).unwrap_or("").lines() {
                        if let Some(m) = line
                            .strip_prefix("msg ")
                            .and_then(|m| m.parse::<usize>().ok())
                            && m < MSGS
                        {
                            arrivals[d][m].get_or_insert(t);
                        }
                    }
                    // Only whole lines count as seen.
                    seen_len[d] = text.rfind('\n').map_or(0, |i| i + 1);
                }
            }
            if arrivals.iter().all(|a| a.iter().all(Option::is_some)) {
                break;
            }
            std::thread::yield_now();
        }
        arrivals
    });
    let mut sent = vec![0f64; MSGS];
    for (m, at) in sent.iter_mut().enumerate() {
        *at = ms(epoch.elapsed());
        root.room.send_data(format!("msg {m}").as_bytes())?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrivals = tokio::task::spawn_blocking(move || poller.join())
        .await?
        .map_err(|_| anyhow::anyhow!("poller panicked"))?;
    let mut by_depth = Vec::new();
    let mut per_hop = Vec::new();
    for (d, at) in arrivals.iter().enumerate() {
        let lat: Vec<f64> = at
            .iter()
            .zip(&sent)
            .filter_map(|(a, s)| a.map(|a| a - s))
            .collect();
        by_depth.push(json!({ "depth": d + 1, "latency_ms": summary(lat) }));
    }
    for pair in arrivals.windows(2) {
        for (a, b) in pair[0].iter().zip(&pair[1]) {
            if let (Some(a), Some(b)) = (a, b) {
                per_hop.push(b - a);
            }
        }
    }
    let out = json!({
        "chain_depths": depths,
        "messages": MSGS,
        "by_depth": by_depth,
        "per_hop_ms": summary(per_hop),
    });
    teardown(viewers, root).await;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// (e) relay CPU

fn make_clip(dir: &Path) -> Option<PathBuf> {
    let out = dir.join("hd.ivf");
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=1280x720:rate=30",
        ])
        // Noise keeps the encoder at its target rate (the bare test pattern compresses to ~1.4
        // Mbit/s); alls=20 gives ~2.45 Mbit/s.
        .args(["-vf", "noise=alls=20:allf=t", "-t", "10", "-c:v", "libvpx"])
        .args(["-deadline", "realtime", "-cpu-used", "8", "-g", "30", "-y"])
        .args(["-b:v", "2500k", "-minrate", "2500k", "-maxrate", "2500k"])
        .arg(&out)
        .status()
        .ok()?;
    status.success().then_some(out)
}

/// Streams the clip to 4 leaves, directly or through one relay; CPU cores used while streaming.
async fn cpu_run(clip: &Path, relay: bool) -> anyhow::Result<(f64, f64, Vec<u64>)> {
    let mut root = room("cpu", clip, None, false, if relay { 1 } else { 4 }, false).await?;
    let mut viewers = Vec::new();
    if relay {
        let r = watch(
            node(Some(4), root.boot.clone()).await?,
            &root.ticket,
            Sinks::default(),
        )
        .await?;
        if !wait_for(Duration::from_secs(30), || r.times().connected.is_some()).await {
            bail!("relay did not connect");
        }
        viewers.push(r);
    }
    for _ in 0..4 {
        let v = watch(
            node(Some(0), root.boot.clone()).await?,
            &root.ticket,
            Sinks::default(),
        )
        .await?;
        if !wait_for(Duration::from_secs(30), || v.times().connected.is_some()).await {
            bail!("leaf did not connect");
        }
        viewers.push(v);
    }
    let relay_children = if relay {
        viewers[0].room.status().await?.children.len()
    } else {
        root.room.status().await?.children.len()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (cpu_ticks(), Instant::now());
    root.room.start();
    let ended = timeout(Duration::from_secs(40), async {
        while let Some(ev) = root.events.recv().await {
            if let RoomEvent::Media(MediaEvent::SourceEnded { .. }) = ev {
                return;
            }
        }
    })
    .await;
    let cores = (cpu_ticks() - c0) as f64 / clock_ticks_per_sec() / t0.elapsed().as_secs_f64();
    if ended.is_err() {
        eprintln!("  the clip did not end within 40 s");
    }
    // The last stats tick, then what the leaves received.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let leaves = &viewers[usize::from(relay)..];
    let leaf_kbytes: Vec<u64> = leaves.iter().map(|v| v.times().bytes_in / 1000).collect();
    teardown(viewers, root).await;
    Ok((cores, relay_children as f64, leaf_kbytes))
}

async fn cpu() -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    eprintln!("  encoding a 10 s 1280x720 2.5 Mbit/s VP8 clip with ffmpeg...");
    let Some(clip) = make_clip(dir.path()) else {
        return Ok(json!({ "skipped": "ffmpeg with libvpx not available" }));
    };
    let bytes = std::fs::metadata(&clip)?.len();
    let (mut direct, mut relayed, mut leaf_kb) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..2 {
        let (d, dk, db) = cpu_run(&clip, false).await?;
        let (r, rk, rb) = cpu_run(&clip, true).await?;
        eprintln!(
            "  rep {rep}: direct {d:.3} cores ({dk} children at the root, leaves got {db:?} kB), \
             via relay {r:.3} cores ({rk} children at the relay, leaves got {rb:?} kB)"
        );
        leaf_kb.extend(db.into_iter().chain(rb).map(|x| x as f64));
        direct.push(d);
        relayed.push(r);
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    let (d, r) = (med(&direct), med(&relayed));
    Ok(json!({
        "clip_kbps": round(bytes as f64 * 8.0 / 10.0 / 1000.0),
        "direct_cores": direct.iter().map(|x| round(x * 1000.0) / 1000.0).collect::<Vec<_>>(),
        "via_relay_cores": relayed.iter().map(|x| round(x * 1000.0) / 1000.0).collect::<Vec<_>>(),
        "ratio_relay_over_direct": round(r / d),
        "relay_cost_cores": round((r - d) * 1000.0) / 1000.0,
        "leaf_received_kbytes": summary(leaf_kb),
    }))
}

// ---------------------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args = parse_args()?;
    // Bounded as a whole: generous for the default set on a loaded 2-core machine.
    timeout(Duration::from_secs(1800), run(args))
        .await
        .context("node_bench did not finish within 30 minutes")?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = serde_json::Map::new();
    let mut table = String::new();
    let t = Instant::now();
    if args.wants("memory") {
        eprintln!("[memory] 20 idle nodes...");
        let m = memory().await?;
        table += &format!(
            "memory: {} KiB per idle node (VmRSS {} -> {} KiB for 20 nodes + 1 bootstrap); idle \
             CPU of all 21: {} cores; bootstrap connected to {} peers\n",
            m["per_node_kib"],
            m["rss_before_kib"],
            m["rss_after_kib"],
            m["idle_cpu_cores_all_nodes"],
            m["bootstrap_connected_peers"]
        );
        report.insert("memory".into(), m);
    }
    if args.wants("join") {
        let k = kdf_cost().await?;
        table += &format!(
            "room key derivation (STRONG, once per watch/broadcast), ms: {}\n",
            fmt_summary(&k)
        );
        report.insert("kdf_strong_ms".into(), k);
        let mut runs = Vec::new();
        for &n in &args.viewers {
            for wave in [1, args.wave] {
                eprintln!("[join] {n} viewers, wave {wave}...");
                let r = join_run(n, wave).await?;
                table += &format!(
                    "join {n:>3} viewers, {}: all joined in {} s, max depth {}, {} without video\n  \
                     watch() returned (ms)          {}\n  \
                     watch -> joined (ms)           {}\n  \
                     watch -> parent connected (ms) {}\n  \
                     watch -> first video frame (ms) {}\n",
                    if wave == 1 {
                        "sequential".to_owned()
                    } else {
                        format!("waves of {wave}")
                    },
                    r["all_joined_s"],
                    r["max_depth"],
                    r["without_video"],
                    fmt_summary(&r["watch_returned_ms"]),
                    fmt_summary(&r["to_joined_ms"]),
                    fmt_summary(&r["to_parent_connected_ms"]),
                    fmt_summary(&r["to_first_video_frame_ms"]),
                );
                runs.push(r);
            }
        }
        report.insert("join".into(), Value::Array(runs));
    }
    if args.wants("hops") {
        eprintln!("[hops] chain of 5...");
        let h = hops(5).await?;
        table += &format!(
            "data-line latency along a chain (depths {}):\n",
            h["chain_depths"]
        );
        for d in h["by_depth"].as_array().into_iter().flatten() {
            table += &format!(
                "  depth {} (ms) {}\n",
                d["depth"],
                fmt_summary(&d["latency_ms"])
            );
        }
        table += &format!("  per hop (ms)  {}\n", fmt_summary(&h["per_hop_ms"]));
        report.insert("hops".into(), h);
    }
    if args.wants("cpu") {
        eprintln!("[cpu] relay forwarding to 4...");
        let c = cpu().await?;
        if c.get("skipped").is_some() {
            table += &format!("relay cpu: skipped ({})\n", c["skipped"]);
        } else {
            table += &format!(
                "relay cpu ({} kbit/s clip, 4 viewers): direct {} cores, via relay {} cores; \
                 ratio {}, relay cost {} cores\n",
                c["clip_kbps"],
                c["direct_cores"],
                c["via_relay_cores"],
                c["ratio_relay_over_direct"],
                c["relay_cost_cores"]
            );
        }
        report.insert("relay_cpu".into(), c);
    }
    report.insert("wall_s".into(), json!(round(t.elapsed().as_secs_f64())));
    if args.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(&Value::Object(report))?);
    } else {
        print!("{table}");
        println!("wall time {:.0} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
