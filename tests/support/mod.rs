//! Helpers shared by the integration tests (`mod support;` in each test file): the committed
//! fixtures, polling with a deadline, the decode check, the tracing subscriber. Beside them:
//! [`media`] for the tests of the media layer alone, [`room`] for real nodes on loopback,
//! [`netns`] for the tests that build network namespaces of their own. `net_support` (the swarm
//! alone) and `cli_support` (the binary as processes) stay with the tests they serve.

// Each test binary compiles this whole module and uses a part of it: what one binary leaves
// unused is used by another, so dead-code warnings here would be noise.
#![allow(dead_code)]

pub mod media;
pub mod netns;
pub mod room;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A file of `tests/fixtures` (3 s of VP8 `f.ivf`, Opus `f.ogg`; `f.h264`, `f_vp9.ivf`,
/// `f_av1.ivf`).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (silent without it); once per
/// process, later calls do nothing.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `pred` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_for<F, Fut>(timeout: Duration, mut pred: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if pred().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Frames a media file holds (0 while it does not parse, e.g. before its first frame).
pub fn frames(path: &Path) -> usize {
    waterfall::media::source::read_all_frames(path)
        .map(|f| f.len())
        .unwrap_or(0)
}

/// `ffmpeg -v error -i FILE -f null -` decodes the file without a complaint (skipped, with a
/// note, where ffmpeg is not installed).
pub fn ffmpeg_ok(path: &Path) {
    match Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
    {
        Ok(out) => assert!(
            out.status.success() && out.stderr.is_empty(),
            "ffmpeg rejects {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!(
            "ffmpeg not available ({e}): decode check of {} skipped",
            path.display()
        ),
    }
}

/// Resident set size of this process in KiB (Linux; 0 where `/proc` says nothing).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}
