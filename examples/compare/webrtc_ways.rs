//! The two WebRTC ways: the waterfall tree (whole nodes: libp2p swarm + DHT + WebRTC relay) and
//! the star (the media layer alone: one `Broadcaster` with every viewer attached directly), plus
//! the tree under churn.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::time::timeout;
use waterfall::media::{Broadcaster, MediaKey, Viewer};
use waterfall::{
    Broadcast, FileSource, KdfParams, MediaConfig, MediaEvent, MediaSource, Node, RoomConfig,
    RoomEvent, SinkTarget, Sinks, SourceOptions, Ticket, Watch, WatchConfig,
};

use super::{
    DRAIN, Pct, ProcFigures, Recv, RunResult, SETTLE, ViewerOutcome, analyse, cpu_seconds,
    fifo_receiver, lo_bytes, now_us, pct, peak_rss_mb, spawn_pacer,
};

/// Children per relay (the room's default fanout); the broadcaster takes as many.
pub const FANOUT: u16 = 4;
/// Viewers joining at once.
const JOIN_BATCH: usize = 4;
/// Bytes a data message has on the data channel: payload + nonce + tag of the media E2EE.
const DATA_WIRE: u64 = (super::PAYLOAD + waterfall::media::e2ee::OVERHEAD) as u64;
const PASSWORD: &str = "bench";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A video source that is never started: WebRTC negotiation needs a media track, the work is the
/// data channel.
async fn idle_video() -> anyhow::Result<Box<dyn MediaSource>> {
    let src = FileSource::open(fixture("f.ivf"), SourceOptions::default()).await?;
    Ok(Box::new(src))
}

/// Wait at most `within` for an event that satisfies `pred`; `None` if the events end or the
/// time passes first.
async fn first_event<E>(
    mut events: impl futures::Stream<Item = E> + Unpin,
    within: Duration,
    pred: impl Fn(&E) -> bool,
) -> Option<()> {
    use futures::StreamExt;
    let found = async {
        while let Some(e) = events.next().await {
            if pred(&e) {
                return Some(());
            }
        }
        None
    };
    timeout(within, found).await.ok().flatten()
}

fn window_copies(recv: &Recv, w: (u64, u64)) -> u64 {
    recv.snapshot()
        .iter()
        .filter(|r| r.0 >= w.0 && r.0 < w.1)
        .count() as u64
}

// ------------------------------------------------------------------ star

struct StarViewer {
    _viewer: Viewer,
    recv: Recv,
    join_us: u64,
}

async fn star_viewer(
    bc: &Broadcaster,
    key: &MediaKey,
    dir: &Path,
    i: usize,
) -> anyhow::Result<StarViewer> {
    let path = dir.join(format!("d{i}"));
    let recv = fifo_receiver(&path)?;
    let join_us = now_us();
    let sinks = Sinks {
        data: Some(SinkTarget::File(path)),
        ..Default::default()
    };
    let (viewer, mut ev) = Viewer::new(key.clone(), sinks, MediaConfig::default());
    let offer = viewer.connect_parent().await?;
    let (_id, answer) = bc.attach_child(&offer).await?;
    viewer.parent_answer(&answer).await?;
    let events = futures::stream::poll_fn(|cx| ev.poll_recv(cx));
    first_event(events, Duration::from_secs(30), |e| {
        matches!(e, MediaEvent::ParentConnected)
    })
    .await
    .context("viewer connects within 30 s")?;
    tokio::spawn(async move { while ev.recv().await.is_some() {} });
    Ok(StarViewer {
        _viewer: viewer,
        recv,
        join_us,
    })
}

/// The star: one `Broadcaster`, every viewer its direct child.
pub async fn star(n: usize, secs: u64) -> anyhow::Result<RunResult> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let key = MediaKey::new([7; 32]);
    let (bc, mut bev) = Broadcaster::new(
        vec![idle_video().await?],
        key.clone(),
        MediaConfig::default(),
    )?;
    tokio::spawn(async move { while bev.recv().await.is_some() {} });
    let bc = Arc::new(bc);
    let b2 = bc.clone();
    let (seq, stop) = spawn_pacer(move |m| {
        let _ = b2.send_data(&m);
    });
    let mut viewers = Vec::new();
    let mut notes = Vec::new();
    for batch in (0..n).collect::<Vec<_>>().chunks(JOIN_BATCH) {
        let joins = batch.iter().map(|&i| star_viewer(&bc, &key, dir.path(), i));
        for r in join_all(joins).await {
            match r {
                Ok(v) => viewers.push(v),
                Err(e) => notes.push(format!("join failed: {e:#}")),
            }
        }
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let ((w0, w1), procs) = measure(&seq, &stop, secs).await;
    let outcomes: Vec<ViewerOutcome> = viewers
        .iter()
        .map(|v| ViewerOutcome {
            recv: v.recv.clone(),
            depth: Some(1),
            join_start_us: v.join_us,
            copies_in_window: None,
        })
        .collect();
    // Every viewer is a direct child: the source sent each copy it delivered.
    let upload: u64 = viewers
        .iter()
        .map(|v| window_copies(&v.recv, (w0, w1)) * DATA_WIRE)
        .sum();
    let mut r = analyse(
        "star",
        n,
        secs,
        (w0, w1),
        &outcomes,
        (
            upload,
            "data-channel payload incl. E2EE (copies delivered by direct children x 1240 B)",
        ),
        procs,
        setup_s,
    );
    r.notes = notes;
    Ok(r)
}

/// The measured window of a run: lets the viewers settle, then takes the pacer's sequence number
/// and the process figures at the start and the end of `secs` seconds; lets the last messages
/// drain and stops the pacer.
async fn measure(
    seq: &std::sync::atomic::AtomicU64,
    stop: &tokio::sync::watch::Sender<bool>,
    secs: u64,
) -> ((u64, u64), ProcFigures) {
    let sample = || {
        (
            seq.load(std::sync::atomic::Ordering::SeqCst),
            cpu_seconds(),
            lo_bytes(),
        )
    };
    tokio::time::sleep(SETTLE).await;
    let (w0, cpu0, lo0) = sample();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (w1, cpu1, lo1) = sample();
    tokio::time::sleep(DRAIN).await;
    let _ = stop.send(true);
    let procs = ProcFigures {
        cpu_s_window: cpu1 - cpu0,
        cpu_s_total: cpu1,
        peak_rss_mb: peak_rss_mb(),
        lo_bytes_window: lo1 - lo0,
    };
    ((w0, w1), procs)
}

// ------------------------------------------------------------------ tree

struct TreeViewer {
    node: Node,
    room: Option<Watch>,
    recv: Recv,
    join_us: u64,
    rejoins: Arc<Mutex<Vec<u64>>>,
}

fn tree_cfg() -> waterfall::proto::Config {
    waterfall::proto::Config::default()
}

async fn tree_root() -> anyhow::Result<(Node, Broadcast, Ticket, Vec<libp2p::Multiaddr>)> {
    let b = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .max_children(FANOUT)
        .spawn()
        .await?;
    let cfg = RoomConfig::new("bench")
        .password(PASSWORD)
        .fanout(FANOUT)
        .source(idle_video().await?)
        .autostart(false)
        .tree(tree_cfg());
    let (room, mut ev) = b.broadcast(cfg).await?;
    tokio::spawn(async move { while ev.recv().await.is_some() {} });
    let ticket = room.ticket().clone();
    let boot = b.addrs().await?;
    Ok((b, room, ticket, boot))
}

async fn tree_viewer(
    dir: &Path,
    i: usize,
    boot: &[libp2p::Multiaddr],
    ticket: &Ticket,
) -> anyhow::Result<TreeViewer> {
    let path = dir.join(format!("d{i}"));
    let recv = fifo_receiver(&path)?;
    let join_us = now_us();
    let node = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .bootstrap(boot.to_vec())
        .spawn()
        .await?;
    let (room, mut ev) = node
        .watch(
            ticket.clone(),
            WatchConfig::new()
                .password(PASSWORD)
                .sinks(Sinks {
                    data: Some(SinkTarget::File(path)),
                    ..Default::default()
                })
                .tree(tree_cfg()),
        )
        .await?;
    first_event(&mut ev, Duration::from_secs(40), |e| {
        matches!(e, RoomEvent::Media(MediaEvent::ParentConnected))
    })
    .await
    .context("viewer connects to a parent within 40 s")?;
    let rejoins = Arc::new(Mutex::new(Vec::new()));
    let rj = rejoins.clone();
    tokio::spawn(async move {
        while let Some(e) = ev.recv().await {
            if let RoomEvent::Rejoined { outage_ms, .. } = e {
                rj.lock().unwrap_or_else(|p| p.into_inner()).push(outage_ms);
            }
        }
    });
    Ok(TreeViewer {
        node,
        room: Some(room),
        recv,
        join_us,
        rejoins,
    })
}

async fn join_tree(
    n: usize,
    dir: &Path,
    boot: &[libp2p::Multiaddr],
    ticket: &Ticket,
    notes: &mut Vec<String>,
) -> Vec<TreeViewer> {
    let mut viewers = Vec::new();
    for batch in (0..n).collect::<Vec<_>>().chunks(JOIN_BATCH) {
        let joins = batch.iter().map(|&i| tree_viewer(dir, i, boot, ticket));
        for r in join_all(joins).await {
            match r {
                Ok(v) => viewers.push(v),
                Err(e) => notes.push(format!("join failed: {e:#}")),
            }
        }
    }
    viewers
}

/// A tree run's broadcaster, sending paced data messages, and the viewers joined under it.
struct PacedTree {
    /// The broadcaster's node and room (the pacer's sender holds the room too).
    _broadcaster: (Node, Arc<Broadcast>),
    /// Messages sent so far.
    seq: Arc<std::sync::atomic::AtomicU64>,
    /// Stops the pacer.
    stop: tokio::sync::watch::Sender<bool>,
    viewers: Vec<TreeViewer>,
    /// What went wrong while joining.
    notes: Vec<String>,
}

async fn paced_tree(n: usize, dir: &Path) -> anyhow::Result<PacedTree> {
    let (node, room, ticket, boot) = tree_root().await?;
    let room = Arc::new(room);
    let r2 = room.clone();
    let (seq, stop) = spawn_pacer(move |m| {
        let _ = r2.send_data(&m);
    });
    let mut notes = Vec::new();
    let viewers = join_tree(n, dir, &boot, &ticket, &mut notes).await;
    Ok(PacedTree {
        _broadcaster: (node, room),
        seq,
        stop,
        viewers,
        notes,
    })
}

async fn depth_of(v: &TreeViewer) -> Option<u16> {
    match &v.room {
        Some(r) => r.status().await.ok().and_then(|s| s.depth),
        None => None,
    }
}

/// The waterfall tree: a broadcaster node and `n` viewer nodes, fanout [`FANOUT`].
pub async fn tree(n: usize, secs: u64) -> anyhow::Result<RunResult> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let PacedTree {
        _broadcaster,
        seq,
        stop,
        viewers,
        notes,
    } = paced_tree(n, dir.path()).await?;
    let setup_s = t0.elapsed().as_secs_f64();
    let ((w0, w1), procs) = measure(&seq, &stop, secs).await;
    let mut outcomes = Vec::new();
    let mut upload = 0;
    for v in &viewers {
        let depth = depth_of(v).await;
        if depth == Some(1) {
            upload += window_copies(&v.recv, (w0, w1)) * DATA_WIRE;
        }
        outcomes.push(ViewerOutcome {
            recv: v.recv.clone(),
            depth,
            join_start_us: v.join_us,
            copies_in_window: None,
        });
    }
    let mut r = analyse(
        "tree",
        n,
        secs,
        (w0, w1),
        &outcomes,
        (
            upload,
            "data-channel payload incl. E2EE (copies delivered to depth-1 viewers x 1240 B)",
        ),
        procs,
        setup_s,
    );
    r.notes = notes;
    Ok(r)
}

// ------------------------------------------------------------------ churn

/// The tree under churn.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnResult {
    pub n: usize,
    pub secs: u64,
    pub kill_interval_s: u64,
    pub rounds: usize,
    pub killed: usize,
    pub killed_per_round: Vec<usize>,
    pub relays_per_round: Vec<usize>,
    pub survivors: usize,
    /// Survivors that saw at least one gap.
    pub viewers_with_outage: usize,
    /// Gaps in message arrival longer than `gap_threshold_ms` at surviving viewers, ms.
    pub outage_gap_ms: Pct,
    pub gap_threshold_ms: f64,
    /// Outages the tree itself reported (`RoomEvent::Rejoined { outage_ms }`), ms.
    pub rejoin_outage_ms: Pct,
    /// Distinct window messages at survivors / (survivors × window messages).
    pub delivery_ratio: f64,
    pub dup_ratio: f64,
    pub latency_all_ms: Pct,
    /// Extra delays (> 100 ms) between consecutive sends of the source: the process stalled.
    #[serde(default)]
    pub source_stall_ms: Pct,
    pub kill_method: String,
    pub notes: Vec<String>,
}

/// Kill 10 % of the relays (viewers with children) every 10 s, for `secs` seconds.
pub async fn churn(n: usize, secs: u64) -> anyhow::Result<ChurnResult> {
    const INTERVAL: u64 = 10;
    const GAP_MS: f64 = 250.0;
    let dir = tempfile::tempdir()?;
    let PacedTree {
        _broadcaster,
        seq,
        stop,
        mut viewers,
        notes,
    } = paced_tree(n, dir.path()).await?;
    tokio::time::sleep(SETTLE).await;
    let w0 = seq.load(std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    let mut killed_per_round = Vec::new();
    let mut relays_per_round = Vec::new();
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut round = 1;
    while round * INTERVAL < secs {
        tokio::time::sleep_until((start + Duration::from_secs(round * INTERVAL)).into()).await;
        let mut relays = Vec::new();
        for (i, v) in viewers.iter().enumerate() {
            if let Some(r) = &v.room
                && let Ok(s) = r.status().await
                && !s.children.is_empty()
            {
                relays.push(i);
            }
        }
        let k = relays.len().div_ceil(10);
        relays_per_round.push(relays.len());
        let mut victims = Vec::new();
        for _ in 0..k {
            // xorshift: a fixed, reproducible choice.
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            let j = (rng_state % relays.len() as u64) as usize;
            victims.push(relays.swap_remove(j));
        }
        for &i in &victims {
            let v = &mut viewers[i];
            // The swarm goes first, so no goodbye reaches anyone over libp2p; then the room
            // stops, which closes its WebRTC connections.
            v.node.net().shutdown().await;
            if let Some(r) = v.room.take() {
                r.leave().await;
            }
            v.node.shutdown().await;
        }
        killed_per_round.push(victims.len());
        round += 1;
    }
    tokio::time::sleep_until((start + Duration::from_secs(secs)).into()).await;
    let w1 = seq.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(DRAIN).await;
    let _ = stop.send(true);
    let survivors: Vec<&TreeViewer> = viewers.iter().filter(|v| v.room.is_some()).collect();
    // Send times of every window message (any receiver knows them): a stall of the source
    // process (the kills run in the same process) must not count as a tree outage.
    let mut sent_at = std::collections::BTreeMap::new();
    for v in &survivors {
        for r in v.recv.snapshot() {
            if r.0 >= w0 && r.0 < w1 {
                sent_at.insert(r.0, r.1);
            }
        }
    }
    let period = 1_000_000 / super::RATE_HZ;
    let sends: Vec<(u64, u64)> = sent_at.iter().map(|(a, b)| (*a, *b)).collect();
    let mut stall_after = std::collections::BTreeMap::new();
    let mut source_stalls = Vec::new();
    for w in sends.windows(2) {
        let extra = (w[1].1 - w[0].1).saturating_sub(period * (w[1].0 - w[0].0));
        stall_after.insert(w[0].0, extra);
        if extra > 100_000 {
            source_stalls.push(extra as f64 / 1000.0);
        }
    }
    let mut gaps = Vec::new();
    let mut with_outage = 0;
    let mut rejoins = Vec::new();
    let mut lats = Vec::new();
    let mut distinct = 0u64;
    let mut copies = 0u64;
    for v in &survivors {
        let mut recs: Vec<(u64, u64, u64)> = v
            .recv
            .snapshot()
            .into_iter()
            .filter(|r| r.0 >= w0 && r.0 < w1)
            .collect();
        copies += recs.len() as u64;
        recs.sort_by_key(|r| r.0);
        recs.dedup_by_key(|r| r.0);
        distinct += recs.len() as u64;
        lats.extend(recs.iter().map(|r| r.2.saturating_sub(r.1) as f64 / 1000.0));
        // Arrival gaps between consecutive messages, minus the source's own stalls in between.
        let mut had = false;
        for w in recs.windows(2) {
            let raw = w[1].2.saturating_sub(w[0].2);
            let stall: u64 = stall_after.range(w[0].0..w[1].0).map(|(_, x)| *x).sum();
            let g = raw.saturating_sub(stall) as f64 / 1000.0;
            if g > GAP_MS {
                gaps.push(g);
                had = true;
            }
        }
        if had {
            with_outage += 1;
        }
        rejoins.extend(
            v.rejoins
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|&x| x as f64),
        );
    }
    let wmsgs = w1 - w0;
    Ok(ChurnResult {
        n,
        secs,
        kill_interval_s: INTERVAL,
        rounds: killed_per_round.len(),
        killed: killed_per_round.iter().sum(),
        killed_per_round,
        relays_per_round,
        survivors: survivors.len(),
        viewers_with_outage: with_outage,
        outage_gap_ms: pct(gaps),
        gap_threshold_ms: GAP_MS,
        rejoin_outage_ms: pct(rejoins),
        delivery_ratio: distinct as f64 / (survivors.len() as u64 * wmsgs).max(1) as f64,
        dup_ratio: copies.saturating_sub(distinct) as f64 / distinct.max(1) as f64,
        latency_all_ms: pct(lats),
        source_stall_ms: pct(source_stalls),
        kill_method: "in-process: the victim's libp2p swarm is shut down, then its room left and \
                      node stopped (its WebRTC connections close, so children see the loss at once; \
                      a crashed process would add ICE failure detection time)"
            .into(),
        notes,
    })
}
