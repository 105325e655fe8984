//! Hello, waterfall: Alice broadcasts a clip, Bob watches it by ticket and writes it to a file.
//! Both nodes run here, on loopback (the builder's default). `cargo run --example hello`
use std::time::Duration;
use waterfall::MediaEvent::{ParentConnected, SourceEnded};
use waterfall::RoomEvent::{self, BroadcastEnded, Ended, Media};
use waterfall::{FileSource, Node, RoomConfig, RoomEvents, SinkTarget, Sinks, SourceOptions};

/// Prints `who`'s events until one matches `last` (at most 20 s apart).
async fn until(who: &str, events: &mut RoomEvents, last: impl Fn(&RoomEvent) -> bool) {
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
        println!("{who}: {ev:?}");
        if last(&ev) {
            break;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clip = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/f.ivf");
    let source = Box::new(FileSource::open(clip, SourceOptions::default()).await?);
    let alice = Node::builder().spawn().await?;
    let cfg = RoomConfig::new("hello").source(source).autostart(false);
    let (room, mut alice_events) = alice.broadcast(cfg).await?;
    let bob = Node::builder().spawn().await?;
    let out = std::env::temp_dir().join("waterfall-hello.ivf");
    let sinks = Sinks {
        video: Some(SinkTarget::File(out.clone())),
        ..Sinks::default()
    };
    let cfg = waterfall::WatchConfig::new().sinks(sinks);
    let (watch, mut events) = bob.watch(room.ticket().clone(), cfg).await?;
    until("bob", &mut events, |e| matches!(e, Media(ParentConnected))).await;
    room.start(); // once Bob is connected, so that he gets the whole clip
    until("alice", &mut alice_events, |e| {
        matches!(e, Media(SourceEnded { .. }))
    })
    .await;
    room.leave().await; // the clip is over: Alice ends the broadcast, Bob is told
    until("bob", &mut events, |e| matches!(e, BroadcastEnded | Ended)).await;
    watch.leave().await;
    let bytes = std::fs::metadata(&out)?.len();
    println!("bob wrote {bytes} bytes to {}", out.display());
    Ok(())
}
