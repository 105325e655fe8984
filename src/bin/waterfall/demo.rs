//! `waterfall demo`: the whole system on one machine, with no external service.
//!
//! A broadcaster and several viewers, each a complete node (its own libp2p swarm and WebRTC
//! stack) in this process, talk over loopback: the viewers find the room in the DHT through the
//! broadcaster's ticket, build the relay tree (fanout 2 by default, so six viewers reach depth 2),
//! and receive a test clip (VP8 video and Opus audio shipped in the binary) that every relay
//! forwards without decoding. Progress is shown once a second; at the end every viewer's IVF and
//! Ogg files are left in the output directory and checked frame by frame against the source.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use waterfall::crypto::KdfParams;
use waterfall::media::source::read_all_frames;
use waterfall::{
    Broadcast, FileSource, MediaEvent, MediaSource, Node, RoomConfig, RoomEvent, RoomEvents,
    SinkTarget, Sinks, SourceOptions, Watch, WatchConfig,
};

/// The shipped clip: 3 s of 320x240 VP8 (keyframe every 30 frames).
const CLIP_IVF: &[u8] = include_bytes!("../../../tests/fixtures/f.ivf");
/// The shipped clip's audio: 3 s of Opus.
const CLIP_OGG: &[u8] = include_bytes!("../../../tests/fixtures/f.ogg");

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Viewers to start.
    #[arg(long, default_value_t = 6)]
    pub viewers: usize,
    /// Children per relay.
    #[arg(long, default_value_t = 2)]
    pub fanout: u16,
    /// How many times the 3-second clip plays.
    #[arg(long, default_value_t = 2)]
    pub loops: u32,
    /// Where the viewers' files go.
    #[arg(long, default_value = "waterfall-demo")]
    pub out: PathBuf,
}

struct Viewer {
    node: Node,
    room: Watch,
    events: RoomEvents,
    video: PathBuf,
    audio: PathBuf,
    frames: u64,
}

/// Run the demo; progress on stderr.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let src_dir = args.out.join("source");
    std::fs::create_dir_all(&src_dir)?;
    let (clip_v, clip_a) = (src_dir.join("clip.ivf"), src_dir.join("clip.ogg"));
    std::fs::write(&clip_v, CLIP_IVF)?;
    std::fs::write(&clip_a, CLIP_OGG)?;
    let password = "demo password";

    eprintln!(
        "waterfall demo: 1 broadcaster + {} viewers, fanout {}, clip played {} time(s), all on loopback",
        args.viewers, args.fanout, args.loops
    );
    let kdf = KdfParams::STRONG;
    let b = Node::builder()
        .kdf(kdf)
        .max_children(args.fanout)
        .spawn()
        .await?;
    let opts = SourceOptions {
        loops: Some(args.loops.saturating_sub(1)),
        ..SourceOptions::default()
    };
    let v = FileSource::open(&clip_v, opts.clone()).await?;
    let a = FileSource::open(&clip_a, opts).await?;
    // Every viewer gets every frame: no rebalancing moves during the short demo, and the clip
    // starts once every viewer is attached.
    let tree = waterfall::proto::Config::default().rebalance_interval_ms(0);
    let cfg = RoomConfig::new("waterfall-demo")
        .password(password)
        .fanout(args.fanout)
        .source(Box::new(v) as Box<dyn MediaSource>)
        .source(Box::new(a))
        .tree(tree.clone())
        .autostart(false);
    let (broom, mut bevents) = b.broadcast(cfg).await?;
    let ticket = broom.ticket().clone();
    eprintln!("broadcaster {} — ticket:\n  {ticket}", b.peer_id());
    let boot = b.addrs().await?;

    let mut viewers = Vec::new();
    for i in 0..args.viewers {
        let node = Node::builder()
            .kdf(kdf)
            .bootstrap(boot.clone())
            .max_children(args.fanout)
            .spawn()
            .await?;
        let video = args.out.join(format!("viewer-{i}.ivf"));
        let audio = args.out.join(format!("viewer-{i}.ogg"));
        let sinks = Sinks {
            video: Some(SinkTarget::File(video.clone())),
            audio: Some(SinkTarget::File(audio.clone())),
            data: None,
        };
        let (room, mut events) = node
            .watch(
                ticket.clone(),
                WatchConfig::new()
                    .password(password)
                    .sinks(sinks)
                    .tree(tree.clone()),
            )
            .await?;
        // Wait for this viewer's media path before the next joins: a tidy, predictable tree.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(RoomEvent::Media(MediaEvent::ParentConnected))) => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => bail!("viewer {i} did not connect to a parent within 30 s"),
            }
        }
        let st = room.status().await?;
        eprintln!(
            "  viewer {i} {} joined at depth {}",
            node.peer_id(),
            st.depth.map(|d| d.to_string()).unwrap_or("?".into())
        );
        viewers.push(Viewer {
            node,
            room,
            events,
            video,
            audio,
            frames: 0,
        });
    }
    print_tree(&b, &broom, &viewers).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    broom.start();
    let stream_start = Instant::now();
    let expected = Duration::from_secs(3 * u64::from(args.loops.max(1)));
    let mut ended = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + expected + Duration::from_secs(30);
    while ended < 2 {
        tokio::select! {
            ev = bevents.recv() => match ev {
                Some(RoomEvent::Media(MediaEvent::SourceEnded { error, .. })) => {
                    if let Some(e) = error {
                        bail!("source failed: {e}");
                    }
                    ended += 1;
                }
                Some(_) => {}
                None => bail!("broadcaster stopped"),
            },
            _ = tick.tick() => {
                for v in viewers.iter_mut() {
                    while let Some(ev) = v.events.try_recv() {
                        if let RoomEvent::Media(MediaEvent::Stats(s)) = ev {
                            v.frames = s.video_frames;
                        }
                    }
                }
                let frames: Vec<String> = viewers.iter().map(|v| v.frames.to_string()).collect();
                eprintln!(
                    "  {:>4.1}s / {:.0}s  video frames per viewer: [{}]",
                    stream_start.elapsed().as_secs_f64(),
                    expected.as_secs_f64(),
                    frames.join(" ")
                );
            }
            _ = tokio::time::sleep_until(deadline) => {
                bail!("the stream did not finish in time");
            }
        }
    }
    // Let the last packets drain through the tree.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let src_v = read_all_frames(&clip_v).context("reading the source clip")?;
    let src_a = read_all_frames(&clip_a).context("reading the source clip")?;
    let loops = args.loops.max(1) as usize;
    // Leave deepest first, so that nobody is orphaned (and repaired) on the way out.
    let mut handles = Vec::new();
    for v in viewers.into_iter().rev() {
        v.room.leave().await;
        v.node.shutdown().await;
        handles.push((v.video, v.audio));
    }
    handles.reverse();
    let mut report = Vec::new();
    for (i, (video, audio)) in handles.into_iter().enumerate() {
        let got_v =
            read_all_frames(&video).with_context(|| format!("reading {}", video.display()))?;
        let got_a =
            read_all_frames(&audio).with_context(|| format!("reading {}", audio.display()))?;
        let ok_v = got_v.len() == src_v.len() * loops
            && got_v
                .iter()
                .enumerate()
                .all(|(k, f)| f.data == src_v[k % src_v.len()].data);
        let ok_a = got_a.len() == src_a.len() * loops
            && got_a
                .iter()
                .enumerate()
                .all(|(k, f)| f.data == src_a[k % src_a.len()].data);
        eprintln!(
            "  viewer {i}: {} video frames {}, {} audio frames {} -> {}, {}",
            got_v.len(),
            if ok_v { "identical" } else { "DIFFER" },
            got_a.len(),
            if ok_a { "identical" } else { "DIFFER" },
            video.display(),
            audio.display()
        );
        if !(ok_v && ok_a) {
            report.push(format!("viewer {i}"));
        }
    }
    broom.leave().await;
    b.shutdown().await;
    if !report.is_empty() {
        bail!("output differs from the source for: {}", report.join(", "));
    }
    eprintln!(
        "done in {:.1}s: every viewer holds every frame of the source, byte for byte. \
         Play one with: ffplay {}",
        t0.elapsed().as_secs_f64(),
        args.out.join("viewer-0.ivf").display()
    );
    Ok(())
}

async fn print_tree(b: &Node, broom: &Broadcast, viewers: &[Viewer]) {
    use std::collections::BTreeMap;
    let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let root = b.peer_id().to_string();
    if let Ok(s) = broom.status().await {
        children.insert(
            root.clone(),
            s.children.iter().map(|c| c.to_string()).collect(),
        );
    }
    for v in viewers {
        if let Ok(s) = v.room.status().await {
            children.insert(
                v.node.peer_id().to_string(),
                s.children.iter().map(|c| c.to_string()).collect(),
            );
        }
    }
    eprintln!("relay tree:");
    fn walk(id: &str, depth: usize, children: &BTreeMap<String, Vec<String>>, seen: &mut usize) {
        *seen += 1;
        if *seen > 10_000 {
            return;
        }
        let short = &id[id.len().saturating_sub(8)..];
        eprintln!("  {}{} (depth {depth})", "    ".repeat(depth), short);
        for c in children.get(id).into_iter().flatten() {
            walk(c, depth + 1, children, seen);
        }
    }
    let mut seen = 0;
    walk(&root, 0, &children, &mut seen);
}
