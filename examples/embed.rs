//! Embedding waterfall in another program, through the public API only.
//!
//! One process, two nodes on loopback:
//!
//! 1. a broadcaster node opens the fixture clip (VP8 video + Opus audio) and broadcasts it into a
//!    password-protected room; the room hands out a *ticket* (room name, broadcaster, addresses
//!    and a password check);
//! 2. a viewer node starts with the broadcaster as its bootstrap peer, watches the room by ticket
//!    and writes what arrives to files in a temporary directory;
//! 3. the program prints the viewer's room events (joined, media connected, first frames,
//!    statistics) for a few seconds, then both leave and shut down cleanly.
//!
//! `cargo run --example embed -- [--secs N]` (default 6 s). `RUST_LOG=waterfall=debug` shows the
//! library's logs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::time::{Instant, timeout};
use waterfall::media::MediaKind;
use waterfall::{
    FileSource, KdfParams, MediaEvent, MediaSource, Node, RoomConfig, RoomEvent, SinkTarget, Sinks,
    SourceOptions, WatchConfig,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()
        .context("--secs takes a number")?
        .unwrap_or(6)
        .clamp(1, 120);
    // The whole program is bounded: watching plus generous set-up and tear-down time.
    timeout(Duration::from_secs(secs + 60), run(secs))
        .await
        .context("the example did not finish in time")?
}

async fn run(secs: u64) -> anyhow::Result<()> {
    // KdfParams::TEST_ONLY keeps the start fast; real programs keep the default (STRONG), which
    // makes guessing a room's password from its DHT record expensive.
    let broadcaster = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .spawn()
        .await
        .context("broadcaster node")?;
    println!("broadcaster node {}", broadcaster.peer_id());

    // Loop the 3 s clip so there is something to watch for the whole run.
    let opts = SourceOptions {
        loops: Some((secs / 3 + 2) as u32),
        ..SourceOptions::default()
    };
    let video = FileSource::open(fixture("f.ivf"), opts.clone()).await?;
    let audio = FileSource::open(fixture("f.ogg"), opts).await?;
    // The broadcaster's own events (children joining) are printed too.
    let (room, mut b_events) = broadcaster
        .broadcast(
            RoomConfig::new("embed-demo")
                .password("correct horse")
                .fanout(4)
                .source(Box::new(video) as Box<dyn MediaSource>)
                .source(Box::new(audio)),
        )
        .await
        .context("broadcast")?;
    let ticket = room.ticket().clone();
    println!("ticket: {ticket}");

    let viewer = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .bootstrap(broadcaster.addrs().await?)
        .spawn()
        .await
        .context("viewer node")?;
    println!("viewer node {}", viewer.peer_id());
    let dir = tempfile::tempdir()?;
    let (v_path, a_path, d_path) = (
        dir.path().join("video.ivf"),
        dir.path().join("audio.ogg"),
        dir.path().join("data.txt"),
    );
    let t0 = Instant::now();
    let (watching, mut v_events) = viewer
        .watch(
            ticket,
            WatchConfig::new().password("correct horse").sinks(Sinks {
                video: Some(SinkTarget::File(v_path.clone())),
                audio: Some(SinkTarget::File(a_path.clone())),
                data: Some(SinkTarget::File(d_path.clone())),
            }),
        )
        .await
        .context("watch")?;
    println!("watch() returned after {} ms", t0.elapsed().as_millis());

    let end = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => {
                // The data channel carries application messages down the tree (as lines).
                if room.send_data(format!("hello #{sent}").as_bytes()).is_ok() {
                    sent += 1;
                }
            }
            ev = b_events.recv() => match ev {
                Some(RoomEvent::ChildAdded(p)) => println!("[broadcaster] child added: {p}"),
                Some(RoomEvent::Media(MediaEvent::ChildConnected(id))) => {
                    println!("[broadcaster] child media connected: {id:?}")
                }
                Some(_) => {}
                None => anyhow::bail!("the broadcaster's room ended early"),
            },
            ev = v_events.recv() => match ev {
                Some(ev) => print_event(t0, &ev),
                None => anyhow::bail!("the viewer's room ended early"),
            },
        }
    }
    let status = watching.status().await?;
    println!(
        "viewer status: parent {:?}, depth {:?}, {} children (capacity {})",
        status.parent.map(|p| p.to_string()),
        status.depth,
        status.children.len(),
        status.capacity
    );

    // Leave: the viewer first (its parent is told), then the broadcaster (its record is ended).
    watching.leave().await;
    room.leave().await;
    viewer.shutdown().await;
    broadcaster.shutdown().await;

    let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let lines = std::fs::read_to_string(&d_path).unwrap_or_default();
    println!(
        "received: video {} bytes, audio {} bytes, {} of {sent} data lines",
        size(&v_path),
        size(&a_path),
        lines.lines().count()
    );
    anyhow::ensure!(size(&v_path) > 32, "no video frame arrived");
    println!("done");
    Ok(())
}

fn print_event(t0: Instant, ev: &RoomEvent) {
    let ms = t0.elapsed().as_millis();
    match ev {
        RoomEvent::Joined { parent, depth } => {
            println!("[viewer +{ms} ms] joined: parent {parent}, depth {depth}")
        }
        RoomEvent::Media(MediaEvent::ParentConnected) => {
            println!("[viewer +{ms} ms] media connection to the parent is up")
        }
        RoomEvent::Media(MediaEvent::FirstFrame { kind, after }) => println!(
            "[viewer +{ms} ms] first {} frame ({} ms after the media session started)",
            match kind {
                MediaKind::Video => "video",
                MediaKind::Audio => "audio",
            },
            after.as_millis()
        ),
        RoomEvent::Media(MediaEvent::Stats(s)) => println!(
            "[viewer +{ms} ms] stats: {} kbit/s in, {} video / {} audio frames, {} data messages, \
             {} gaps, {} dropped",
            s.bitrate_bps / 1000,
            s.video_frames,
            s.audio_frames,
            s.data_messages,
            s.gaps,
            s.frames_dropped
        ),
        other => println!("[viewer +{ms} ms] {other:?}"),
    }
}
