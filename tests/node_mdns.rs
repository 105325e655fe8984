//! A viewer finds a room by mDNS alone: no bootstrap address, no ticket, only the room's name and
//! password, with broadcaster and viewer in separate processes and separate network namespaces.
//!
//! The test builds its own link: namespaces `wf-nm-<pid>b` (broadcaster) and `wf-nm-<pid>v`
//! (viewer), a veth pair between them with 10.232.0.1/24 and 10.232.0.2/24 (addresses that exist
//! only inside those namespaces), and a multicast route on the veth. It re-executes its own binary
//! inside each namespace (`ip netns exec`), `WF_NODE_MDNS_ROLE` selecting the role:
//!
//! - the broadcaster runs a node with mDNS on, listening (libp2p and WebRTC) on its namespace
//!   address only, broadcasts the fixture clip (looped) into room `lan-party`, prints
//!   `PEER <id>` and stays until its standard input closes;
//! - the viewer runs a node with mDNS on and no bootstrap address, watches `lan-party` by name
//!   (retrying while mDNS has not yet found anyone), prints `JOINED <parent> <depth>` and
//!   `FIRST_FRAME video`, streams for a while, leaves, and prints `VIDEO <frames> <matching>`:
//!   the frames written to its IVF sink and how many of them are byte-identical to a frame of
//!   the fixture.
//!
//! The parent asserts that the viewer's parent is the broadcaster at depth 1 and that real video
//! arrived intact, then removes the namespaces (a guard does it on failure too). Skipped, with a
//! printed reason, where `ip netns` is not permitted.

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use support::netns::{self, Kid, Namespaces, get, report_lines};
use support::room::{builder, clip};
use waterfall::media::MediaKind;
use waterfall::media::source::read_all_frames;
use waterfall::{
    MediaConfig, MediaEvent, Node, NodeError, RoomConfig, RoomEvent, SinkTarget, Sinks,
    WatchConfig, WatchTarget,
};

const TEST_NAME: &str = "viewer_finds_room_by_name_over_mdns";
/// Prefix of the children's report lines.
const MARK: &str = "WFNODEMDNS ";
/// Names the role of a child process.
const ROLE: &str = "WF_NODE_MDNS_ROLE";
/// Debugging aid: `WF_NODE_MDNS_LOG=/path/prefix` keeps each child's log.
const LOG: &str = "WF_NODE_MDNS_LOG";
const ROOM: &str = "lan-party";
const PASSWORD: &str = "only on this link";
const B_ADDR: &str = "10.232.0.1";
const V_ADDR: &str = "10.232.0.2";
/// The viewer's whole life, bounded.
const VIEWER_DEADLINE: Duration = Duration::from_secs(60);
/// The broadcaster's whole life, bounded (it normally ends when the parent closes its stdin).
const BROADCASTER_DEADLINE: Duration = Duration::from_secs(90);

/// This binary in namespace `ns` as `role`, its stdin piped when the parent ends it by closing
/// that.
fn spawn_child(ns: &str, role: &str, stdin: bool) -> Result<Kid, String> {
    let mut c = netns::self_in(ns, TEST_NAME, LOG, role)?;
    c.env(ROLE, role);
    if stdin {
        c.stdin(std::process::Stdio::piped());
    }
    Kid::spawn(&mut c)
}

fn say(key: &str, value: impl std::fmt::Display) {
    netns::say(MARK, key, value);
}

/// A node on the namespace's address only, with mDNS and no bootstrap.
async fn lan_node(addr: &str) -> Node {
    let ip: IpAddr = addr.parse().expect("literal address");
    builder()
        .mdns(true)
        .listen(vec![
            format!("/ip4/{addr}/tcp/0").parse().expect("multiaddr"),
        ])
        .media(MediaConfig::default().udp_bind(ip))
        .spawn()
        .await
        .expect("node starts")
}

fn broadcaster() {
    netns::child_runtime(LOG).block_on(async {
        let node = lan_node(B_ADDR).await;
        let (room, mut events) = node
            .broadcast(
                RoomConfig::new(ROOM)
                    .password(PASSWORD)
                    .source(clip("f.ivf", Some(30)).await)
                    .source(clip("f.ogg", Some(30)).await),
            )
            .await
            .expect("broadcast starts");
        say("PEER", node.peer_id());
        // Stay until the parent closes our stdin (read on a plain thread), bounded.
        let (eof_tx, mut eof) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = eof_tx.send(());
        });
        let deadline = tokio::time::Instant::now() + BROADCASTER_DEADLINE;
        loop {
            tokio::select! {
                _ = &mut eof => break,
                _ = tokio::time::sleep_until(deadline) => break,
                ev = events.recv() => match ev {
                    Some(RoomEvent::ChildAdded(p)) => say("CHILD", p),
                    Some(_) => {}
                    None => break,
                },
            }
        }
        room.leave().await;
        node.shutdown().await;
    });
}

fn viewer() {
    netns::child_runtime(LOG).block_on(async {
        let deadline = tokio::time::Instant::now() + VIEWER_DEADLINE;
        let node = lan_node(V_ADDR).await;
        say("PEER", node.peer_id());
        let dir = tempfile::tempdir().expect("temp dir");
        let video = dir.path().join("v.ivf");
        let cfg = || {
            WatchConfig::new().password(PASSWORD).sinks(Sinks {
                video: Some(SinkTarget::File(video.clone())),
                audio: None,
                data: None,
            })
        };
        // By name only: the lookup fails until mDNS has found the broadcaster and the DHT has a
        // path to the record; retry (bounded by the deadline).
        let (room, mut events) = loop {
            match node.watch(WatchTarget::Name(ROOM.into()), cfg()).await {
                Ok(r) => break r,
                Err(NodeError::RoomNotFound { .. })
                    if tokio::time::Instant::now() + Duration::from_secs(10) < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    say("ERROR", format!("watch: {e}"));
                    return;
                }
            }
        };
        say("WATCHING", ROOM);
        let mut first_frame_at = None;
        loop {
            // After the first video frame, stream 3 s more.
            let until = first_frame_at.map_or(deadline, |t: tokio::time::Instant| {
                (t + Duration::from_secs(3)).min(deadline)
            });
            match tokio::time::timeout_at(until, events.recv()).await {
                Ok(Some(RoomEvent::Joined { parent, depth })) => {
                    say("JOINED", format!("{parent} {depth}"))
                }
                Ok(Some(RoomEvent::Media(MediaEvent::ParentConnected))) => {
                    say("CONNECTED", "parent")
                }
                Ok(Some(RoomEvent::Media(MediaEvent::FirstFrame {
                    kind: MediaKind::Video,
                    ..
                }))) => {
                    say("FIRST_FRAME", "video");
                    first_frame_at = Some(tokio::time::Instant::now());
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        room.leave().await;
        node.shutdown().await;
        let source: HashSet<Vec<u8>> = read_all_frames(support::fixture("f.ivf"))
            .expect("fixture parses")
            .into_iter()
            .map(|f| f.data.to_vec())
            .collect();
        match read_all_frames(&video) {
            Ok(frames) => {
                let matching = frames
                    .iter()
                    .filter(|f| source.contains(&f.data[..]))
                    .count();
                say("VIDEO", format!("{} {matching}", frames.len()));
            }
            Err(e) => say("ERROR", format!("reading the received video: {e}")),
        }
    });
}

#[test]
fn viewer_finds_room_by_name_over_mdns() {
    match std::env::var(ROLE).as_deref() {
        Ok("broadcaster") => return broadcaster(),
        Ok("viewer") => return viewer(),
        Ok(other) => panic!("unknown role {other}"),
        Err(_) => {}
    }
    let pid = std::process::id();
    let (ns_b, ns_v) = (format!("wf-nm-{pid}b"), format!("wf-nm-{pid}v"));
    let guard = match Namespaces::veth_pair([&ns_b, &ns_v], "wfn0", [B_ADDR, V_ADDR]) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED node mDNS namespace test: cannot build the namespaces ({e})");
            return;
        }
    };
    let mut b = spawn_child(&ns_b, "broadcaster", true).expect("broadcaster child");
    let b_out = b.0.stdout.take().expect("piped stdout");
    let b_reader = std::thread::spawn(move || report_lines(b_out, MARK));
    let mut v = spawn_child(&ns_v, "viewer", false).expect("viewer child");
    let v_out = v.0.stdout.take().expect("piped stdout");
    // The viewer bounds itself (VIEWER_DEADLINE): reading to EOF waits for it to finish.
    let rv = report_lines(v_out, MARK);
    // Then let the broadcaster leave (EOF on its stdin) and collect its report.
    drop(b.0.stdin.take());
    let rb = b_reader.join().expect("broadcaster reader");
    drop((v, b));
    drop(guard);
    eprintln!("broadcaster: {rb:?}\nviewer: {rv:?}");

    let bp = get(&rb, "PEER");
    assert_eq!(bp.len(), 1, "broadcaster did not start: {rb:?}");
    let vp = get(&rv, "PEER");
    assert_eq!(vp.len(), 1, "viewer did not start: {rv:?}");
    assert!(get(&rv, "ERROR").is_empty(), "viewer failed: {rv:?}");
    assert_eq!(
        get(&rv, "JOINED"),
        vec![format!("{} 1", bp[0])],
        "the viewer attached below the broadcaster, found by mDNS"
    );
    assert_eq!(
        get(&rb, "CHILD"),
        vec![vp[0]],
        "the broadcaster took the viewer"
    );
    assert_eq!(get(&rv, "CONNECTED").len(), 1, "media connection: {rv:?}");
    assert_eq!(get(&rv, "FIRST_FRAME"), vec!["video"], "{rv:?}");
    let video = get(&rv, "VIDEO");
    assert_eq!(video.len(), 1, "{rv:?}");
    let (frames, matching) = video[0].split_once(' ').expect("two numbers");
    let (frames, matching): (usize, usize) = (frames.parse().unwrap(), matching.parse().unwrap());
    // 3 s of 30 fps video after the first frame.
    assert!(frames >= 30, "only {frames} video frames arrived");
    assert_eq!(
        matching, frames,
        "every received frame is a frame of the clip"
    );
}
