//! End to end over loopback: real encoded media through relay trees of real WebRTC connections.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::media::{Log, Parent, collect, link, wait_event};
use support::{ffmpeg_ok, fixture};
use tokio::time::{Instant, timeout};
use waterfall::media::source::read_all_frames;
use waterfall::media::{
    Broadcaster, FileSource, MediaConfig, MediaEvent, MediaKey, MediaKind, MediaSource, SinkTarget,
    Sinks, SourceOptions, Viewer,
};

const KEY: [u8; 32] = [42; 32];

struct Node {
    viewer: Viewer,
    log: Log,
    video: PathBuf,
    audio: PathBuf,
    data: PathBuf,
}

fn viewer(dir: &Path, name: &str, key: [u8; 32]) -> Node {
    let video = dir.join(format!("{name}.ivf"));
    let audio = dir.join(format!("{name}.ogg"));
    let data = dir.join(format!("{name}.txt"));
    let (viewer, rx) = Viewer::new(
        MediaKey::new(key),
        Sinks {
            video: Some(SinkTarget::File(video.clone())),
            audio: Some(SinkTarget::File(audio.clone())),
            data: Some(SinkTarget::File(data.clone())),
        },
        MediaConfig::default(),
    );
    Node {
        viewer,
        log: collect(rx),
        video,
        audio,
        data,
    }
}

/// Attaches `child` below `parent` and waits for its media connection.
async fn attach(parent: Parent<'_>, child: &Node) {
    link(parent, &child.viewer, &child.log).await;
}

async fn broadcaster(loops: Option<u32>) -> (Broadcaster, Log) {
    let opts = SourceOptions {
        loops,
        ..Default::default()
    };
    let v = FileSource::open(fixture("f.ivf"), opts.clone())
        .await
        .unwrap();
    let a = FileSource::open(fixture("f.ogg"), opts).await.unwrap();
    let (b, rx) = Broadcaster::new(
        vec![Box::new(v) as Box<dyn MediaSource>, Box::new(a)],
        MediaKey::new(KEY),
        MediaConfig::default(),
    )
    .unwrap();
    (b, collect(rx))
}

/// Streams the whole 3 s fixture with data lines, then checks every node's files.
async fn stream_and_check(b: &Broadcaster, blog: &Log, nodes: Vec<Node>) {
    // Let the children's data channels open at every parent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    b.start();
    for i in 0..20 {
        b.send_data(format!("line {i}").as_bytes()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for kind in [MediaKind::Video, MediaKind::Audio] {
        wait_event(
            blog,
            "source end",
            |e| matches!(e, MediaEvent::SourceEnded { kind: k, error: None } if *k == kind),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let src_v = read_all_frames(fixture("f.ivf")).unwrap();
    let src_a = read_all_frames(fixture("f.ogg")).unwrap();
    let expect_lines: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
    let mut firsts = Vec::new();
    for (depth, n) in nodes.into_iter().enumerate() {
        let first = wait_event(&n.log, "first video frame", |e| {
            matches!(
                e,
                MediaEvent::FirstFrame {
                    kind: MediaKind::Video,
                    ..
                }
            )
        })
        .await;
        firsts.push((depth, first.duration_since(t0)));
        let stats = n.viewer.stats();
        n.viewer.close().await;
        let got_v = read_all_frames(&n.video).unwrap();
        assert_eq!(
            got_v.len(),
            src_v.len(),
            "{}: video frame count ({stats:?})",
            n.video.display()
        );
        for (i, (a, b)) in src_v.iter().zip(&got_v).enumerate() {
            assert_eq!(
                a.data,
                b.data,
                "{}: video frame {i} differs",
                n.video.display()
            );
        }
        let got_a = read_all_frames(&n.audio).unwrap();
        assert_eq!(
            got_a.len(),
            src_a.len(),
            "{}: audio frame count",
            n.audio.display()
        );
        for (i, (a, b)) in src_a.iter().zip(&got_a).enumerate() {
            assert_eq!(
                a.data,
                b.data,
                "{}: audio frame {i} differs",
                n.audio.display()
            );
        }
        let lines: Vec<String> = std::fs::read_to_string(&n.data)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines, expect_lines, "{}: data lines", n.data.display());
        ffmpeg_ok(&n.video);
        ffmpeg_ok(&n.audio);
    }
    eprintln!("time to first video frame after start, by node: {firsts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_of_five_relays() {
    timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let (b, blog) = broadcaster(None).await;
        let nodes: Vec<Node> = (0..5)
            .map(|i| viewer(dir.path(), &format!("c{i}"), KEY))
            .collect();
        attach(Parent::B(&b), &nodes[0]).await;
        for i in 1..nodes.len() {
            attach(Parent::V(&nodes[i - 1].viewer), &nodes[i]).await;
        }
        stream_and_check(&b, &blog, nodes).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_of_six_fanout_two() {
    timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let (b, blog) = broadcaster(None).await;
        let n: Vec<Node> = (0..6)
            .map(|i| viewer(dir.path(), &format!("t{i}"), KEY))
            .collect();
        // B -> 0, 1; 0 -> 2, 3; 1 -> 4, 5 (depth 2)
        attach(Parent::B(&b), &n[0]).await;
        attach(Parent::B(&b), &n[1]).await;
        attach(Parent::V(&n[0].viewer), &n[2]).await;
        attach(Parent::V(&n[0].viewer), &n[3]).await;
        attach(Parent::V(&n[1].viewer), &n[4]).await;
        attach(Parent::V(&n[1].viewer), &n[5]).await;
        stream_and_check(&b, &blog, n).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_writes_nothing_but_relays_ciphertext() {
    timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (b, _blog) = broadcaster(None).await;
        let wrong = viewer(dir.path(), "wrong", [7; 32]);
        let below = viewer(dir.path(), "below", KEY);
        attach(Parent::B(&b), &wrong).await;
        attach(Parent::V(&wrong.viewer), &below).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.start();
        b.send_data(b"secret line").unwrap();
        wait_event(&wrong.log, "decrypt failure", |e| {
            matches!(
                e,
                MediaEvent::DecryptFailed(waterfall::media::E2eeError::Authentication)
            )
        })
        .await;
        // The right key one hop further down decodes what the wrong-key relay forwarded.
        wait_event(&below.log, "first frame below", |e| {
            matches!(
                e,
                MediaEvent::FirstFrame {
                    kind: MediaKind::Video,
                    ..
                }
            )
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = wrong.viewer.stats();
        assert!(s.decrypt_failures > 0);
        assert_eq!(s.video_frames + s.audio_frames, 0);
        assert!(s.packets_forwarded > 0, "ciphertext still relayed");
        assert!(!wrong.video.exists() && !wrong.audio.exists() && !wrong.data.exists());
        below.viewer.close().await;
        ffmpeg_ok(&below.video);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_after_relay_dies() {
    timeout(Duration::from_secs(90), async {
        let dir = tempfile::tempdir().unwrap();
        let (b, _blog) = broadcaster(Some(1)).await;
        let mid = viewer(dir.path(), "mid", KEY);
        let spare = viewer(dir.path(), "spare", KEY);
        let orphan = viewer(dir.path(), "orphan", KEY);
        attach(Parent::B(&b), &mid).await;
        attach(Parent::B(&b), &spare).await;
        attach(Parent::V(&mid.viewer), &orphan).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.start();
        wait_event(&orphan.log, "first frame", |e| {
            matches!(
                e,
                MediaEvent::FirstFrame {
                    kind: MediaKind::Video,
                    ..
                }
            )
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let before = orphan.viewer.stats().video_frames;
        drop(mid); // the relay dies
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t_switch = Instant::now();
        let offer = orphan.viewer.switch_parent().await.unwrap();
        let (_, answer) = spare.viewer.attach_child(&offer).await.unwrap();
        orphan.viewer.parent_answer(&answer).await.unwrap();
        // Media resumes (at the next keyframe, <= 1 s with the fixture's GOP of 30).
        let deadline = Instant::now() + Duration::from_secs(10);
        while orphan.viewer.stats().video_frames < before + 30 {
            assert!(Instant::now() < deadline, "media did not resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "repair: media resumed {:?} after switch_parent",
            t_switch.elapsed()
        );
        let stats = orphan.viewer.stats();
        orphan.viewer.close().await;
        ffmpeg_ok(&orphan.video);
        ffmpeg_ok(&orphan.audio);
        // Every written frame is a source frame (byte-identical), in source order modulo loop.
        let src: Vec<_> = read_all_frames(fixture("f.ivf")).unwrap();
        let got = read_all_frames(&orphan.video).unwrap();
        assert!(got.len() as u64 >= before + 30, "{stats:?}");
        for f in &got {
            assert!(
                src.iter().any(|s| s.data == f.data),
                "written frame not in source"
            );
        }
    })
    .await
    .expect("test timed out");
}
