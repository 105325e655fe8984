//! The whole node end to end on loopback: a broadcaster and viewers, each a real node (libp2p
//! swarm + WebRTC), find the room through the DHT, form the tree, and stream real VP8 + Opus.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::room::{builder, clip, node};
use support::{ffmpeg_ok, fixture, frames};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use waterfall::media::source::read_all_frames;
use waterfall::{
    Broadcast, MediaEvent, Node, NodeError, RoomConfig, RoomEvent, RoomEvents, SinkTarget, Sinks,
    Ticket, Watch, WatchConfig, WatchTarget,
};

fn tree_cfg() -> waterfall::proto::Config {
    // Byte-identical delivery is asserted: no make-before-break moves during the test.
    waterfall::proto::Config::default().rebalance_interval_ms(0)
}

struct Watcher {
    node: Node,
    room: Watch,
    events: RoomEvents,
    video: PathBuf,
    audio: PathBuf,
    data: PathBuf,
}

async fn watcher(
    dir: &Path,
    i: usize,
    boot: &[libp2p::Multiaddr],
    ticket: &Ticket,
    pw: &str,
) -> Watcher {
    let node = node(boot.to_vec()).await;
    let video = dir.join(format!("v{i}.ivf"));
    let audio = dir.join(format!("v{i}.ogg"));
    let data = dir.join(format!("v{i}.txt"));
    let (room, events) = node
        .watch(
            ticket.clone(),
            WatchConfig::new()
                .password(pw)
                .sinks(Sinks {
                    video: Some(SinkTarget::File(video.clone())),
                    audio: Some(SinkTarget::File(audio.clone())),
                    data: Some(SinkTarget::File(data.clone())),
                })
                .tree(tree_cfg()),
        )
        .await
        .unwrap_or_else(|e| panic!("viewer {i} joins: {e}"));
    Watcher {
        node,
        room,
        events,
        video,
        audio,
        data,
    }
}

/// Wait until viewer `i`'s media connection to its parent is up.
async fn wait_connected(events: &mut RoomEvents, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, events.recv()).await {
            Ok(Some(RoomEvent::Media(MediaEvent::ParentConnected))) => return,
            Ok(Some(_)) => {}
            Ok(None) => panic!("viewer {i}: room ended"),
            Err(_) => panic!("viewer {i}: no parent connection within 30 s"),
        }
    }
}

/// A broadcaster whose own uplink takes `root_children` children; the room's fanout is `fanout`.
/// The clip (video and audio, once) starts with [`Broadcast::start`].
async fn broadcaster(fanout: u16, root_children: u16, pw: &str) -> (Node, Broadcast, RoomEvents) {
    let b = builder()
        .max_children(root_children)
        .spawn()
        .await
        .expect("node starts");
    let cfg = RoomConfig::new("standup")
        .password(pw)
        .fanout(fanout)
        .source(clip("f.ivf", None).await)
        .source(clip("f.ogg", None).await)
        .autostart(false)
        .tree(tree_cfg());
    let (room, ev) = b.broadcast(cfg).await.expect("broadcast starts");
    (b, room, ev)
}

/// Waits (30 s at most between events) until both of the broadcaster's sources have ended
/// without an error.
async fn wait_sources_ended(bev: &mut RoomEvents) {
    let mut ended = 0;
    while ended < 2 {
        match timeout(Duration::from_secs(30), bev.recv()).await {
            Ok(Some(RoomEvent::Media(MediaEvent::SourceEnded { error: None, .. }))) => ended += 1,
            Ok(Some(_)) => {}
            other => panic!("broadcaster events: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twelve_viewers_fanout_three_get_every_frame() {
    timeout(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        // Fanout 3 below a broadcaster that feeds 2: 2 + 6 + 4, depth 3.
        let (b, room, mut bev) = broadcaster(3, 2, "hunter2").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let mut ws = Vec::new();
        for i in 0..12 {
            let mut w = watcher(dir.path(), i, &boot, &ticket, "hunter2").await;
            wait_connected(&mut w.events, i).await;
            ws.push(w);
        }
        let mut depths = Vec::new();
        for w in &ws {
            let s = w.room.status().await.unwrap();
            depths.push(s.depth.expect("attached"));
            assert!(s.children.len() <= 3);
        }
        let max_depth = *depths.iter().max().unwrap();
        eprintln!("depths: {depths:?}");
        assert!(max_depth >= 3, "12 viewers at fanout 3 reach depth 3");
        // Let the leaves' data channels open, then stream.
        tokio::time::sleep(Duration::from_millis(500)).await;
        room.start();
        for i in 0..20 {
            room.send_data(format!("line {i}").as_bytes()).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_sources_ended(&mut bev).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let src_v = read_all_frames(fixture("f.ivf")).unwrap();
        let src_a = read_all_frames(fixture("f.ogg")).unwrap();
        let lines: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
        for (i, w) in ws.into_iter().enumerate() {
            w.room.leave().await;
            let got_v = read_all_frames(&w.video).unwrap();
            assert_eq!(got_v.len(), src_v.len(), "viewer {i}: video frames");
            for (k, (a, b)) in src_v.iter().zip(&got_v).enumerate() {
                assert_eq!(a.data, b.data, "viewer {i}: video frame {k}");
            }
            let got_a = read_all_frames(&w.audio).unwrap();
            assert_eq!(got_a.len(), src_a.len(), "viewer {i}: audio frames");
            for (k, (a, b)) in src_a.iter().zip(&got_a).enumerate() {
                assert_eq!(a.data, b.data, "viewer {i}: audio frame {k}");
            }
            let got: Vec<String> = std::fs::read_to_string(&w.data)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            assert_eq!(got, lines, "viewer {i}: data lines");
            ffmpeg_ok(&w.video);
            ffmpeg_ok(&w.audio);
            w.node.shutdown().await;
        }
        room.leave().await;
        b.shutdown().await;
    })
    .await
    .expect("test finishes within 240 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_error() {
    timeout(Duration::from_secs(60), async {
        let (b, room, _ev) = broadcaster(2, 2, "right").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let v = node(boot).await;
        let err = v
            .watch(ticket, WatchConfig::new().password("wrong"))
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::WrongPassword { .. }), "{err}");
        // By name, the wrong password finds no room.
        let err = v
            .watch(
                WatchTarget::Name("standup".into()),
                WatchConfig::new().password("wrong"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NodeError::RoomNotFound { .. }), "{err}");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_relay_its_subtree_resumes_and_files_stay_valid() {
    timeout(Duration::from_secs(180), async {
        let dir = tempfile::tempdir().unwrap();
        let b = builder().max_children(2).spawn().await.unwrap();
        // 4 passes of the 3 s clip: the crash happens in the middle of the stream.
        let cfg = RoomConfig::new("relaykill")
            .password("pw")
            .fanout(2)
            .source(clip("f.ivf", Some(3)).await)
            .autostart(false)
            .tree(tree_cfg());
        let (room, _ev) = b.broadcast(cfg).await.unwrap();
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let mut ws = Vec::new();
        for i in 0..6 {
            let mut w = watcher(dir.path(), i, &boot, &ticket, "pw").await;
            wait_connected(&mut w.events, i).await;
            ws.push(w);
        }
        room.start();
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Crash a depth-1 relay (it has children); its subtree must come back.
        let mut victim = None;
        for (i, w) in ws.iter().enumerate() {
            let s = w.room.status().await.unwrap();
            if s.depth == Some(1) && !s.children.is_empty() {
                victim = Some((i, s.children.clone()));
                break;
            }
        }
        let (vi, orphans) = victim.expect("a depth-1 relay with children");
        let dead = ws.remove(vi);
        dead.node.crash().await;
        drop(dead);
        let crashed_at = Instant::now();
        let mut orphan_ws: Vec<&mut Watcher> = ws
            .iter_mut()
            .filter(|w| orphans.contains(&w.node.peer_id()))
            .collect();
        assert!(!orphan_ws.is_empty());
        // Each orphan gets a new parent and frames flow again.
        for w in orphan_ws.iter_mut() {
            let base = frames(&w.video);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let s = w.room.status().await.unwrap();
                let now = frames(&w.video);
                if s.depth.is_some() && now > base + 15 {
                    eprintln!(
                        "orphan resumed {:?} after the crash at depth {:?}",
                        crashed_at.elapsed(),
                        s.depth
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "subtree did not resume within 20 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let src = read_all_frames(fixture("f.ivf")).unwrap();
        for w in ws {
            w.room.leave().await;
            w.node.shutdown().await;
            // Valid and decodable; every frame written is a frame of the source.
            ffmpeg_ok(&w.video);
            let got = read_all_frames(&w.video).unwrap();
            assert!(!got.is_empty());
            for f in &got {
                assert!(
                    src.iter().any(|s| s.data == f.data),
                    "a frame not from the source"
                );
            }
        }
        room.leave().await;
        b.shutdown().await;
    })
    .await
    .expect("bounded");
}

/// The slow signalling path: offers and answers only through the DHT, announced on the room
/// topic (what a node does when it cannot reach its parent with a direct request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalling_through_the_dht_and_gossip_only() {
    timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let (b, room, _bev) = broadcaster(2, 2, "pw").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let mut ws = Vec::new();
        for i in 0..3 {
            let node = builder()
                .bootstrap(boot.clone())
                .inline_signalling(false)
                .spawn()
                .await
                .unwrap();
            let video = dir.path().join(format!("d{i}.ivf"));
            let (r, mut events) = node
                .watch(
                    ticket.clone(),
                    WatchConfig::new()
                        .password("pw")
                        .sinks(Sinks {
                            video: Some(SinkTarget::File(video.clone())),
                            ..Default::default()
                        })
                        .tree(tree_cfg()),
                )
                .await
                .unwrap();
            wait_connected(&mut events, i).await;
            ws.push(Watcher {
                node,
                room: r,
                events,
                video,
                audio: PathBuf::new(),
                data: PathBuf::new(),
            });
        }
        room.start();
        let src = read_all_frames(fixture("f.ivf")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        for w in &ws {
            while frames(&w.video) < src.len() {
                assert!(
                    Instant::now() < deadline,
                    "media through DHT-signalled links"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for w in ws {
            w.room.leave().await;
            w.node.shutdown().await;
            ffmpeg_ok(&w.video);
        }
    })
    .await
    .expect("bounded");
}

/// A data-only room (no media track): binary messages reach every viewer, through a relay, in
/// order and byte for byte, delivered into the program through a channel sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_only_room_delivers_binary_messages_in_order() {
    timeout(Duration::from_secs(120), async {
        let b = builder().max_children(1).spawn().await.unwrap();
        let cfg = RoomConfig::new("chat")
            .password("pw")
            .fanout(1)
            .tree(tree_cfg());
        let (room, _ev) = b.broadcast(cfg).await.unwrap();
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let mut viewers = Vec::new();
        for i in 0..2 {
            let n = node(boot.clone()).await;
            let (tx, rx) = mpsc::channel(16);
            let (r, mut events) = n
                .watch(
                    ticket.clone(),
                    WatchConfig::new()
                        .password("pw")
                        .sinks(Sinks {
                            data: Some(SinkTarget::Channel(tx)),
                            ..Default::default()
                        })
                        .tree(tree_cfg()),
                )
                .await
                .unwrap();
            wait_connected(&mut events, i).await;
            let w = Watcher {
                node: n,
                room: r,
                events,
                video: PathBuf::new(),
                audio: PathBuf::new(),
                data: PathBuf::new(),
            };
            viewers.push((w, rx));
        }
        assert_eq!(viewers[1].0.room.status().await.unwrap().depth, Some(2));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let msgs: Vec<Vec<u8>> = (0..50u8)
            .map(|i| vec![i, b'\n', 0xff, 0x00, b'\r', i.wrapping_mul(7)])
            .collect();
        for m in &msgs {
            room.send_data(m).unwrap();
        }
        for (i, (_, rx)) in viewers.iter_mut().enumerate() {
            for (k, m) in msgs.iter().enumerate() {
                let got = timeout(Duration::from_secs(20), rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("viewer {i}: message {k} missing"))
                    .expect("channel open");
                assert_eq!(&got[..], &m[..], "viewer {i}: message {k}");
            }
        }
        for (w, _) in viewers {
            w.room.leave().await;
            w.node.shutdown().await;
        }
    })
    .await
    .expect("bounded");
}

/// The broadcaster leaves once its sources have ended: its signed end notice goes down the tree
/// (the relay forwards it to its child), each viewer reports the end of the broadcast within a
/// few seconds and then closes its room, its files finalized and complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_the_broadcast_reaches_every_viewer() {
    timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        // Fanout 1: a chain, the second viewer learns of the end through the first.
        let (b, room, mut bev) = broadcaster(1, 1, "pw").await;
        let ticket = room.ticket().clone();
        let boot = b.addrs().await.unwrap();
        let mut ws = Vec::new();
        for i in 0..2 {
            let mut w = watcher(dir.path(), i, &boot, &ticket, "pw").await;
            wait_connected(&mut w.events, i).await;
            ws.push(w);
        }
        assert_eq!(ws[1].room.status().await.unwrap().depth, Some(2));
        room.start();
        wait_sources_ended(&mut bev).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let left_at = Instant::now();
        let leaving = tokio::spawn(room.leave());
        // Each viewer's events read on their own, so that the time is when it was told; each
        // reader hands its viewer back.
        let mut readers = Vec::new();
        for (i, mut w) in ws.into_iter().enumerate() {
            readers.push(tokio::spawn(async move {
                let mut told = None;
                loop {
                    match timeout(Duration::from_secs(15), w.events.recv()).await {
                        Ok(Some(RoomEvent::BroadcastEnded)) => told = Some(Instant::now()),
                        Ok(Some(RoomEvent::Ended)) => break,
                        Ok(Some(_)) => {}
                        other => panic!("viewer {i}: {other:?} (told of the end: {told:?})"),
                    }
                }
                let told = told.unwrap_or_else(|| panic!("viewer {i}: ended without being told"));
                (told, w)
            }));
        }
        let mut ws = Vec::new();
        for (i, r) in readers.into_iter().enumerate() {
            let (told, w) = r.await.unwrap();
            let told = told - left_at;
            eprintln!("viewer {i}: the end of the broadcast after {told:?}");
            assert!(told < Duration::from_secs(5), "viewer {i}: {told:?}");
            ws.push(w);
        }
        leaving.await.unwrap();
        let src_v = read_all_frames(fixture("f.ivf")).unwrap();
        for (i, w) in ws.into_iter().enumerate() {
            // The room is over: files are final without a leave from the application.
            let got_v = read_all_frames(&w.video).unwrap();
            assert_eq!(got_v.len(), src_v.len(), "viewer {i}: video frames");
            ffmpeg_ok(&w.video);
            ffmpeg_ok(&w.audio);
            assert!(matches!(w.room.status().await, Err(NodeError::Closed)));
            w.node.shutdown().await;
        }
        b.shutdown().await;
    })
    .await
    .expect("bounded");
}
