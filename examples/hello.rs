//! Hello, waterfall: `hello FILE.ivf` broadcasts a video file and prints a ticket; `hello TICKET
//! OUT.ivf`, in another terminal, watches it into a file. `cargo run --example hello -- ARGS`.
use futures::StreamExt;
use waterfall::MediaEvent::{ChildConnected, SourceEnded};
use waterfall::RoomEvent::{BroadcastEnded, Media};
use waterfall::{FileSource, Node, RoomConfig, SinkTarget, Sinks, Ticket, WatchConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let node = Node::builder().spawn().await?; // on loopback, without mDNS: the defaults
    if let [ticket, out] = &args[..] {
        let video = Some(SinkTarget::File(out.into()));
        let cfg = WatchConfig::new().sinks(Sinks {
            video,
            ..Default::default()
        });
        let (watch, mut events) = node.watch(ticket.parse::<Ticket>()?, cfg).await?;
        while let Some(ev) = events.next().await.filter(|e| !matches!(e, BroadcastEnded)) {
            println!("{ev:?}");
        }
        watch.leave().await; // the file is closed valid
    } else if let [file] = &args[..] {
        let clip = Box::new(FileSource::open(file, Default::default()).await?);
        // Played once a viewer is connected, so that it sees the whole file.
        let cfg = RoomConfig::new("hello").source(clip).autostart(false);
        let (room, mut events) = node.broadcast(cfg).await?;
        println!("ticket: {}", room.ticket());
        let playing = |e: &_| !matches!(e, Media(SourceEnded { .. }));
        while let Some(ev) = events.next().await.filter(playing) {
            if matches!(ev, Media(ChildConnected(_))) {
                room.start();
            }
        }
        room.leave().await; // the viewer is told that the broadcast is over
    } else {
        anyhow::bail!("usage: hello FILE.ivf | hello TICKET OUT.ivf");
    }
    node.shutdown().await;
    Ok(())
}
