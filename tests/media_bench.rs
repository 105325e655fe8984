//! Figures, not assertions: `cargo test --release --test media_bench -- --ignored --nocapture`.
//!
//! CPU of a relay forwarding to 4 children, measured as process CPU time (utime+stime from
//! /proc/self/stat) while streaming the 3 s fixture through (a) B -> 4 viewers and
//! (b) B -> R -> 4 viewers; (b) - (a) is the relay's cost (its inbound stream plus 4
//! outbound copies). Everything runs in one process, so this is rough.

mod support;

use std::time::Duration;

use support::fixture;
use tokio::time::{Instant, timeout};
use waterfall::media::{
    Broadcaster, FileSource, MediaConfig, MediaEvent, MediaKey, MediaKind, MediaSource, Sinks,
    SourceOptions, Viewer,
};

const KEY: [u8; 32] = [9; 32];

fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ')' start at index 0 = state; utime = 11, stime = 12
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

async fn run(with_relay: bool) -> (f64, Vec<Duration>) {
    let v = FileSource::open(fixture("f.ivf"), SourceOptions::default())
        .await
        .unwrap();
    let a = FileSource::open(fixture("f.ogg"), SourceOptions::default())
        .await
        .unwrap();
    let (b, mut brx) = Broadcaster::new(
        vec![Box::new(v) as Box<dyn MediaSource>, Box::new(a)],
        MediaKey::new(KEY),
        MediaConfig::default(),
    )
    .unwrap();
    let mk = || Viewer::new(MediaKey::new(KEY), Sinks::default(), MediaConfig::default());
    let (relay, _rrx) = mk();
    if with_relay {
        let o = relay.connect_parent().await.unwrap();
        let (_, ans) = b.attach_child(&o).await.unwrap();
        relay.parent_answer(&ans).await.unwrap();
    }
    let mut kids = Vec::new();
    for _ in 0..4 {
        let (k, rx) = mk();
        let o = k.connect_parent().await.unwrap();
        let (_, ans) = if with_relay {
            relay.attach_child(&o).await.unwrap()
        } else {
            b.attach_child(&o).await.unwrap()
        };
        k.parent_answer(&ans).await.unwrap();
        kids.push((k, rx));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = cpu_ticks();
    let t0 = Instant::now();
    b.start();
    let mut ended = 0;
    while ended < 2 {
        if let Some(MediaEvent::SourceEnded { .. }) = brx.recv().await {
            ended += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let secs = (cpu_ticks() - c0) as f64 / 100.0;
    let mut firsts = Vec::new();
    for (_, rx) in kids.iter_mut() {
        while let Ok(ev) = rx.try_recv() {
            if let MediaEvent::FirstFrame {
                kind: MediaKind::Video,
                ..
            } = ev
            {
                firsts.push(t0.elapsed());
            }
        }
    }
    (secs / t0.elapsed().as_secs_f64(), firsts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn relay_cpu_four_children() {
    timeout(Duration::from_secs(120), async {
        let mut direct = Vec::new();
        let mut relayed = Vec::new();
        for _ in 0..3 {
            direct.push(run(false).await.0);
            relayed.push(run(true).await.0);
        }
        direct.sort_by(f64::total_cmp);
        relayed.sort_by(f64::total_cmp);
        eprintln!(
            "process CPU (cores): B->4 direct {direct:?}, B->R->4 {relayed:?}; \
             relay share (median diff) ~ {:.3} cores",
            relayed[1] - direct[1]
        );
    })
    .await
    .expect("bench timed out");
}
