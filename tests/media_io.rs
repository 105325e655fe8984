//! Round trips of the media readers and writers over the committed fixtures.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{ffmpeg_ok, fixture};
use waterfall::media::source::{Container, Sample, read_all_frames};
use waterfall::media::{
    Codec, FileSource, FrameSink, IvfSink, MediaSource, OggOpusSink, SinkTarget, SourceOptions,
};

/// Writes `frames` into `sink`, left open, and reads `out` back: the same frames, byte for byte.
fn write_and_reread(sink: &mut impl FrameSink, frames: &[Sample], out: &Path) {
    for f in frames {
        sink.write_frame(&f.data, f.pts).unwrap();
    }
    let again = read_all_frames(out).unwrap();
    assert_eq!(again.len(), frames.len());
    for (a, b) in frames.iter().zip(&again) {
        assert_eq!(a.data, b.data);
    }
}

#[test]
fn ivf_round_trip() {
    let frames = read_all_frames(fixture("f.ivf")).unwrap();
    assert_eq!(frames.len(), 90, "3 s at 30 fps");
    assert_eq!(frames[0].codec, Codec::Vp8);
    assert!(frames[0].keyframe);
    assert!(frames.iter().filter(|f| f.keyframe).count() >= 3, "-g 30");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.ivf");
    let mut sink = IvfSink::create(&SinkTarget::File(out.clone()), Codec::Vp8).unwrap();
    // Not closed: the file must already be valid and carry the frame count.
    write_and_reread(&mut sink, &frames, &out);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 90);
    assert_eq!(u16::from_le_bytes(bytes[12..14].try_into().unwrap()), 320);
    // ffmpeg decodes the written IVF.
    ffmpeg_ok(&out);
    sink.close().unwrap();
}

#[test]
fn ogg_round_trip() {
    let frames = read_all_frames(fixture("f.ogg")).unwrap();
    assert!(
        frames.len() >= 149,
        "3 s of 20 ms packets, got {}",
        frames.len()
    );
    assert!(
        frames
            .iter()
            .all(|f| f.duration == Duration::from_millis(20))
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.ogg");
    let mut sink = OggOpusSink::create(&SinkTarget::File(out.clone()), 1).unwrap();
    write_and_reread(&mut sink, &frames, &out);
    // ffmpeg decodes the unclosed Ogg.
    ffmpeg_ok(&out);
    sink.close().unwrap();
    assert_eq!(read_all_frames(&out).unwrap().len(), frames.len());
    // ffmpeg decodes the closed Ogg.
    ffmpeg_ok(&out);
}

#[test]
fn h264_access_units() {
    let frames = read_all_frames(fixture("f.h264")).unwrap();
    assert_eq!(frames.len(), 30, "1 s at 30 fps");
    assert!(frames[0].keyframe);
    let total: usize = frames.iter().map(|f| f.data.len()).sum();
    // Every byte is kept (modulo 3- vs 4-byte start codes).
    let raw = std::fs::read(fixture("f.h264")).unwrap().len();
    assert!(total >= raw && total <= raw + 4 * 200, "{total} vs {raw}");
}

#[tokio::test]
async fn paced_source_from_pipe() {
    tokio::time::timeout(Duration::from_secs(20), async {
        // From an AsyncRead (as stdin would be), paced in real time once it has caught up:
        // frames already queued in a pipe may play up to 1 s early (the writer's clock ran
        // ahead of ours), so 1.5 s of frames take at least 0.5 s.
        let file = tokio::fs::File::open(fixture("f.ogg")).await.unwrap();
        let mut src =
            FileSource::from_async_read(file, Container::OggOpus, SourceOptions::default())
                .await
                .unwrap();
        assert_eq!(src.codec(), Codec::Opus);
        let t0 = tokio::time::Instant::now();
        let mut n = 0;
        while let Some(s) = src.next_sample().await.unwrap() {
            n += 1;
            if s.pts >= Duration::from_millis(1500) {
                break;
            }
        }
        let el = t0.elapsed();
        assert_eq!(n, 76);
        assert!(el >= Duration::from_millis(450), "paced: {el:?}");
        // A looping file source keeps going with increasing pts.
        let mut src = FileSource::open(
            fixture("f.ivf"),
            SourceOptions {
                realtime: false,
                loops: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut count = 0;
        let mut last = None;
        while let Some(s) = src.next_sample().await.unwrap() {
            if let Some(l) = last {
                assert!(s.pts > l);
            }
            last = Some(s.pts);
            count += 1;
        }
        assert_eq!(count, 180);
    })
    .await
    .expect("test timed out");
}
