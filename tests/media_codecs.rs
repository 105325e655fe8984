//! H.264, VP9 and AV1 through a relay chain over loopback, end-to-end encrypted: every frame
//! arrives byte-identical at every depth, the files decode, and a wrong key writes nothing.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::media::{Log, Parent, collect, link, wait_event};
use support::{ffmpeg_ok, fixture};
use tokio::time::timeout;
use waterfall::media::source::read_all_frames;
use waterfall::media::{
    Broadcaster, Codec, E2eeError, FileSource, MediaConfig, MediaEvent, MediaKey, MediaKind,
    MediaSource, SinkTarget, Sinks, SourceOptions, Viewer,
};

const KEY: [u8; 32] = [42; 32];

struct Node {
    viewer: Viewer,
    log: Log,
    video: PathBuf,
}

fn viewer(dir: &Path, name: &str, ext: &str, key: [u8; 32]) -> Node {
    let video = dir.join(format!("{name}.{ext}"));
    let (viewer, rx) = Viewer::new(
        MediaKey::new(key),
        Sinks {
            video: Some(SinkTarget::File(video.clone())),
            ..Default::default()
        },
        MediaConfig::default(),
    );
    Node {
        viewer,
        log: collect(rx),
        video,
    }
}

async fn broadcaster(file: &str, codec: Codec) -> (Broadcaster, Log) {
    let src = FileSource::open(fixture(file), SourceOptions::default())
        .await
        .unwrap();
    assert_eq!(src.codec(), codec);
    let (b, rx) = Broadcaster::new(
        vec![Box::new(src) as Box<dyn MediaSource>],
        MediaKey::new(KEY),
        MediaConfig::default(),
    )
    .expect("the codec is relayable");
    (b, collect(rx))
}

/// Broadcaster -> relay -> leaf, plus a wrong-key viewer under the broadcaster with a right-key
/// viewer under it: the two right-key viewers under relays and the direct child get every
/// frame byte-identical; the wrong-key one writes nothing but still relays.
async fn chain(file: &str, codec: Codec, ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (b, blog) = broadcaster(file, codec).await;
    let relay = viewer(dir.path(), "relay", ext, KEY);
    let leaf = viewer(dir.path(), "leaf", ext, KEY);
    let wrong = viewer(dir.path(), "wrong", ext, [7; 32]);
    let below = viewer(dir.path(), "below", ext, KEY);
    link(Parent::B(&b), &relay.viewer, &relay.log).await;
    link(Parent::V(&relay.viewer), &leaf.viewer, &leaf.log).await;
    link(Parent::B(&b), &wrong.viewer, &wrong.log).await;
    link(Parent::V(&wrong.viewer), &below.viewer, &below.log).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.start();
    wait_event(&blog, "source end", |e| {
        matches!(
            e,
            MediaEvent::SourceEnded {
                kind: MediaKind::Video,
                error: None
            }
        )
    })
    .await;
    // Let the last frames cross two hops (and a reorder wait, were anything missing).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let src = read_all_frames(fixture(file)).unwrap();
    for n in [relay, leaf, below] {
        let stats = n.viewer.stats();
        n.viewer.close().await;
        let got = read_all_frames(&n.video)
            .unwrap_or_else(|e| panic!("{}: {e} ({stats:?})", n.video.display()));
        assert_eq!(
            got.len(),
            src.len(),
            "{}: frame count ({stats:?})",
            n.video.display()
        );
        for (i, (a, b)) in src.iter().zip(&got).enumerate() {
            assert_eq!(a.data, b.data, "{}: frame {i} differs", n.video.display());
        }
        assert_eq!(stats.decrypt_failures, 0, "{}", n.video.display());
        ffmpeg_ok(&n.video);
        eprintln!(
            "{codec}: {} got {} frames byte-identical, {} RTP packets, {} bytes",
            n.video.display(),
            got.len(),
            stats.packets_in,
            stats.bytes_in
        );
    }
    wait_event(&wrong.log, "decrypt failure", |e| {
        matches!(e, MediaEvent::DecryptFailed(E2eeError::Authentication))
    })
    .await;
    let s = wrong.viewer.stats();
    assert!(s.decrypt_failures > 0, "{s:?}");
    assert_eq!(s.video_frames, 0, "{s:?}");
    assert!(s.packets_forwarded > 0, "ciphertext still relayed");
    assert!(!wrong.video.exists(), "a wrong key writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_relay_chain() {
    timeout(
        Duration::from_secs(60),
        chain("f.h264", Codec::H264, "h264"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp9_relay_chain() {
    timeout(
        Duration::from_secs(60),
        chain("f_vp9.ivf", Codec::Vp9, "ivf"),
    )
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn av1_relay_chain() {
    timeout(
        Duration::from_secs(60),
        chain("f_av1.ivf", Codec::Av1, "ivf"),
    )
    .await
    .expect("test timed out");
}

/// A viewer that joins a running stream starts writing at a keyframe of the codec (the
/// keyframe gate), every frame it writes is a source frame, and the file decodes.
async fn late_joiner(file: &str, codec: Codec, ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = FileSource::open(
        fixture(file),
        SourceOptions {
            loops: Some(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (b, rx) = Broadcaster::new(
        vec![Box::new(src) as Box<dyn MediaSource>],
        MediaKey::new(KEY),
        MediaConfig::default(),
    )
    .unwrap();
    let blog = collect(rx);
    b.start();
    // Join mid-GOP: every fixture has a keyframe each second.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let late = viewer(dir.path(), "late", ext, KEY);
    link(Parent::B(&b), &late.viewer, &late.log).await;
    wait_event(&blog, "source end", |e| {
        matches!(e, MediaEvent::SourceEnded { error: None, .. })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stats = late.viewer.stats();
    late.viewer.close().await;
    let src = read_all_frames(fixture(file)).unwrap();
    let got = read_all_frames(&late.video).unwrap();
    assert!(got.len() >= 10, "{codec}: {} frames ({stats:?})", got.len());
    assert!(got[0].keyframe, "{codec}: the file starts at a keyframe");
    for (i, f) in got.iter().enumerate() {
        assert!(
            src.iter().any(|s| s.data == f.data),
            "{codec}: written frame {i} is not a source frame"
        );
    }
    assert_eq!(stats.decrypt_failures, 0, "{codec}: {stats:?}");
    ffmpeg_ok(&late.video);
    eprintln!(
        "{codec}: late joiner wrote {} frames, dropped {} before its first keyframe",
        got.len(),
        stats.frames_dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_start_at_a_keyframe() {
    timeout(Duration::from_secs(90), async {
        late_joiner("f.h264", Codec::H264, "h264").await;
        late_joiner("f_vp9.ivf", Codec::Vp9, "ivf").await;
        late_joiner("f_av1.ivf", Codec::Av1, "ivf").await;
    })
    .await
    .expect("test timed out");
}
