//! A room tree of N nodes in one process, printed as a tree.
//!
//! Node 0 broadcasts a room: the fixture clip (VP8 + Opus, looped; with `--audio-only` just the
//! Opus track, lighter for large meshes) and beside it a generated stream of data lines (one every
//! 200 ms over the room's data channel). A room needs at least one media track today: the media
//! layer refuses children of a broadcaster without tracks. Nodes 1..N join it one after the other; each takes
//! the best free slot it hears of, so with fanout K the tree fills level by level. When every node
//! is attached the example streams for a few seconds, asks every node for its
//! [`RoomStatus`](waterfall::RoomStatus) and prints the tree (peer ids, depth, what
//! each node received), then every node leaves and shuts down. The whole run is bounded.
//!
//! ```text
//! cargo run --release --example local_mesh -- [--nodes 8] [--fanout 2] [--audio-only] [--secs 4]
//! ```
//!
//! Discovery: by default the viewers get the broadcaster's loopback address as their bootstrap
//! peer and watch by ticket. With `--mdns --ip ADDR` every node instead runs mDNS, has no
//! bootstrap address, listens (libp2p and WebRTC) on `ADDR`, and the viewers find the room by
//! its name alone. mDNS needs a real interface with a multicast route, so run that mode inside a
//! network namespace of its own (see `examples/README.md`):
//!
//! ```text
//! ip netns add wf-mesh
//! ip -n wf-mesh link add wfm0 type veth peer name wfm1
//! ip -n wf-mesh addr add 10.77.0.1/24 dev wfm0
//! ip -n wf-mesh link set lo up && ip -n wf-mesh link set wfm0 up && ip -n wf-mesh link set wfm1 up
//! ip -n wf-mesh route add 224.0.0.0/4 dev wfm0
//! ip netns exec wf-mesh target/release/examples/local_mesh --mdns --ip 10.77.0.1
//! ip netns del wf-mesh
//! ```
//!
//! `WF_MESH_TRACE=1` prints every room event; `RUST_LOG=waterfall=debug` the library's logs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use libp2p::{Multiaddr, PeerId};
use tokio::time::{Instant, timeout};
use waterfall::media::MediaKind;
use waterfall::{
    FileSource, KdfParams, MediaConfig, MediaEvent, MediaSource, MediaStats, Node, NodeError,
    RoomConfig, RoomEvent, RoomEvents, RoomStatus, SourceOptions, Ticket, Watch, WatchConfig,
    WatchTarget,
};

const ROOM: &str = "local-mesh";
const PASSWORD: &str = "mesh demo";

struct Args {
    nodes: usize,
    fanout: u16,
    audio_only: bool,
    secs: u64,
    mdns: Option<IpAddr>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        nodes: 8,
        fanout: 2,
        audio_only: false,
        secs: 4,
        mdns: None,
    };
    let mut mdns = false;
    let mut ip = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => a.nodes = val("--nodes")?.parse()?,
            "--fanout" => a.fanout = val("--fanout")?.parse()?,
            "--secs" => a.secs = val("--secs")?.parse()?,
            "--ip" => ip = Some(val("--ip")?.parse::<IpAddr>()?),
            "--audio-only" => a.audio_only = true,
            "--mdns" => mdns = true,
            "-h" | "--help" => {
                println!(
                    "local_mesh [--nodes N] [--fanout K] [--audio-only] [--secs S] [--mdns --ip ADDR]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    anyhow::ensure!((2..=200).contains(&a.nodes), "--nodes must be 2..=200");
    anyhow::ensure!(a.fanout >= 1, "--fanout must be at least 1");
    a.secs = a.secs.clamp(1, 120);
    if mdns {
        let ip = ip.context("--mdns needs --ip ADDR (the namespace's address)")?;
        anyhow::ensure!(
            !ip.is_loopback(),
            "mDNS needs a real interface: give the namespace's address"
        );
        a.mdns = Some(ip);
    }
    Ok(a)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn short(p: &PeerId) -> String {
    let s = p.to_string();
    format!("…{}", &s[s.len().saturating_sub(8)..])
}

/// What a member's event reader has seen.
#[derive(Default)]
struct Progress {
    joined: bool,
    connected: bool,
    first_video: bool,
    stats: Option<MediaStats>,
}

/// A viewer of the room (the broadcaster is kept apart: it has the other handle).
struct Member {
    node: Node,
    room: Watch,
    progress: Arc<Mutex<Progress>>,
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a room's events into its [`Progress`] until the room ends.
fn spawn_reader(mut events: RoomEvents) -> Arc<Mutex<Progress>> {
    let progress = Arc::new(Mutex::new(Progress::default()));
    let p = progress.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if std::env::var_os("WF_MESH_TRACE").is_some() {
                eprintln!("event {ev:?}");
            }
            let mut g = lock(&p);
            match ev {
                RoomEvent::Joined { .. } | RoomEvent::Rejoined { .. } => g.joined = true,
                RoomEvent::Media(MediaEvent::ParentConnected) => g.connected = true,
                RoomEvent::Media(MediaEvent::FirstFrame {
                    kind: MediaKind::Video,
                    ..
                }) => g.first_video = true,
                RoomEvent::Media(MediaEvent::Stats(s)) => g.stats = Some(s),
                RoomEvent::Ended => break,
                _ => {}
            }
        }
    });
    progress
}

async fn spawn_node(args: &Args, bootstrap: Vec<Multiaddr>) -> anyhow::Result<Node> {
    let mut b = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .max_children(args.fanout);
    if let Some(ip) = args.mdns {
        let proto = if ip.is_ipv4() { "ip4" } else { "ip6" };
        b = b
            .mdns(true)
            .listen(vec![format!("/{proto}/{ip}/tcp/0").parse()?])
            .media(MediaConfig::default().udp_bind(ip));
    } else {
        b = b.bootstrap(bootstrap);
    }
    Ok(b.spawn().await?)
}

/// Watch by ticket (bootstrap mode) or by name (mDNS mode: retried until mDNS has found a peer
/// that knows the room record; bounded).
async fn join(node: &Node, args: &Args, ticket: &Ticket) -> anyhow::Result<(Watch, RoomEvents)> {
    let cfg = || WatchConfig::new().password(PASSWORD).tree(tree_config());
    if args.mdns.is_none() {
        return Ok(node.watch(ticket.clone(), cfg()).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node.watch(WatchTarget::Name(ROOM.into()), cfg()).await {
            Ok(room) => return Ok(room),
            Err(NodeError::RoomNotFound { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn tree_config() -> waterfall::proto::Config {
    // A demo of a stable tree: no make-before-break moves while it is printed.
    waterfall::proto::Config::default().rebalance_interval_ms(0)
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut pred: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !pred() {
        if Instant::now() >= deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // webrtc-rs warns about packets written before DTLS is up: noise for a demo.
                tracing_subscriber::EnvFilter::new("warn,rtc=error,webrtc=error")
            }),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args = parse_args()?;
    // Bounded: joining takes well under 2 s per node on loopback; the rest is fixed.
    let limit = Duration::from_secs(60 + 3 * args.nodes as u64 + args.secs);
    timeout(limit, run(args))
        .await
        .context("local_mesh did not finish in time")?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let b = spawn_node(&args, Vec::new()).await?;
    let mut cfg = RoomConfig::new(ROOM)
        .password(PASSWORD)
        .fanout(args.fanout)
        .tree(tree_config());
    let opts = SourceOptions {
        loops: Some(1000),
        ..SourceOptions::default()
    };
    if !args.audio_only {
        cfg = cfg.source(
            Box::new(FileSource::open(fixture("f.ivf"), opts.clone()).await?)
                as Box<dyn MediaSource>,
        );
    }
    cfg = cfg.source(Box::new(FileSource::open(fixture("f.ogg"), opts).await?));
    let (room, events) = b.broadcast(cfg).await.context("broadcast")?;
    let ticket = room.ticket().clone();
    let root_progress = spawn_reader(events);
    let boot = b.addrs().await?;
    eprintln!(
        "broadcaster {} on {} ({})",
        b.peer_id(),
        boot.first().map(|a| a.to_string()).unwrap_or_default(),
        if args.mdns.is_some() {
            "viewers find the room by name over mDNS"
        } else {
            "viewers bootstrap from it and watch by ticket"
        }
    );

    let mut members = Vec::new();
    for i in 1..args.nodes {
        let node = spawn_node(&args, boot.clone()).await?;
        let (room, events) = join(&node, &args, &ticket)
            .await
            .with_context(|| format!("node {i} joins"))?;
        let progress = spawn_reader(events);
        let p = progress.clone();
        wait_until(
            &format!("node {i} attached"),
            Duration::from_secs(20),
            || lock(&p).joined,
        )
        .await?;
        eprintln!(
            "node {i:>3} {} joined after {:.1} s",
            short(&node.peer_id()),
            t0.elapsed().as_secs_f64()
        );
        members.push(Member {
            node,
            room,
            progress,
        });
    }
    // Every viewer's media connection up, then stream for a while.
    wait_until("media connections", Duration::from_secs(30), || {
        members.iter().all(|m| lock(&m.progress).connected)
    })
    .await?;
    // A generated stream of data lines runs beside the media.
    let stream_end = Instant::now() + Duration::from_secs(args.secs);
    let mut n = 0u64;
    while Instant::now() < stream_end {
        if room.send_data(format!("line {n}").as_bytes()).is_ok() {
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the last stats tick arrive.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Node i's status and progress, the broadcaster's as node 0.
    let mut status: HashMap<PeerId, (usize, RoomStatus)> = HashMap::new();
    status.insert(b.peer_id(), (0, room.status().await?));
    for (i, m) in members.iter().enumerate() {
        status.insert(m.node.peer_id(), (i + 1, m.room.status().await?));
    }
    let progress: Vec<_> = std::iter::once(&root_progress)
        .chain(members.iter().map(|m| &m.progress))
        .cloned()
        .collect();
    let root_id = b.peer_id();
    println!(
        "room {ROOM:?}: {} nodes, fanout {}, {} data lines sent, formed in {:.1} s",
        args.nodes,
        args.fanout,
        n,
        t0.elapsed().as_secs_f64() - args.secs as f64 - 1.1
    );
    let mut printed = BTreeMap::new();
    print_tree(&root_id, &status, &progress, 0, &mut printed);
    let missing: Vec<_> = status
        .iter()
        .filter(|(p, _)| !printed.contains_key(*p))
        .map(|(p, (i, s))| {
            format!(
                "node {i} {} (parent {:?})",
                short(p),
                s.parent.map(|x| short(&x))
            )
        })
        .collect();
    let max_depth = status
        .values()
        .filter_map(|(_, s)| s.depth)
        .max()
        .unwrap_or(0);
    println!(
        "max depth {max_depth}; {} of {} nodes reachable from the broadcaster",
        printed.len(),
        args.nodes
    );
    if !missing.is_empty() {
        println!("not in the tree: {}", missing.join(", "));
    }

    // Leave: leaves first, so that nobody is orphaned on the way out; the broadcaster last.
    let mut by_depth: Vec<(u16, Member)> = members
        .into_iter()
        .map(|m| {
            let d = status
                .get(&m.node.peer_id())
                .and_then(|(_, s)| s.depth)
                .unwrap_or(0);
            (d, m)
        })
        .collect();
    by_depth.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
    // Shut the nodes down only once every room is left: the broadcaster's leave stores the
    // "ended" room record in the DHT, which needs live peers to finish promptly.
    let mut nodes = Vec::new();
    for (_, m) in by_depth {
        m.room.leave().await;
        nodes.push(m.node);
    }
    room.leave().await;
    nodes.push(b);
    for n in nodes {
        n.shutdown().await;
    }
    eprintln!("all nodes left after {:.1} s", t0.elapsed().as_secs_f64());
    if !missing.is_empty() {
        bail!("{} nodes are not in the tree", missing.len());
    }
    Ok(())
}

fn print_tree(
    peer: &PeerId,
    status: &HashMap<PeerId, (usize, RoomStatus)>,
    progress: &[Arc<Mutex<Progress>>],
    indent: usize,
    printed: &mut BTreeMap<PeerId, ()>,
) {
    if printed.insert(*peer, ()).is_some() {
        println!("{}{} (cycle!)", "  ".repeat(indent), short(peer));
        return;
    }
    let Some((i, s)) = status.get(peer) else {
        println!("{}{} (not one of ours)", "  ".repeat(indent), short(peer));
        return;
    };
    let p = lock(&progress[*i]);
    let received = match (&p.stats, *i) {
        (_, 0) => "broadcaster".to_owned(),
        (Some(st), _) => format!(
            "{} video / {} audio frames, {} data lines",
            st.video_frames, st.audio_frames, st.data_messages
        ),
        (None, _) => "no stats yet".to_owned(),
    };
    drop(p);
    println!(
        "{}{} node {i} depth {} children {}/{}: {received}",
        "  ".repeat(indent),
        short(peer),
        s.depth.map_or("-".into(), |d| d.to_string()),
        s.children.len(),
        s.capacity,
    );
    for c in &s.children {
        // The child's own view must agree that we are its parent.
        if let Some((_, cs)) = status.get(c)
            && cs.parent != Some(*peer)
        {
            println!(
                "{}{} claims parent {:?}",
                "  ".repeat(indent + 1),
                short(c),
                cs.parent.map(|x| short(&x))
            );
            continue;
        }
        print_tree(c, status, progress, indent + 1, printed);
    }
}
