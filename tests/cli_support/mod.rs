//! Shared helpers of the CLI tests: `waterfall` processes that are killed (by pid) when the test
//! ends however it ends, their output read line by line with deadlines, and waiting for a file
//! to grow. The fixtures and the decode check are in `support`, which these tests declare too.
// Each CLI test binary uses a part of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::support::frames;

pub const BIN: &str = env!("CARGO_BIN_EXE_waterfall");

/// A `waterfall` command with a clean log environment (the developer's RUST_LOG must not change
/// what the user would see) and every stream piped.
pub fn waterfall() -> Command {
    let mut c = Command::new(BIN);
    // The CLI listens on every interface by default; tests stay on loopback.
    c.env(
        "WATERFALL_LISTEN",
        "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1",
    )
    .env("WATERFALL_UDP_BIND", "127.0.0.1")
    .env_remove("RUST_LOG")
    .env_remove("WATERFALL_PASSWORD")
    .env_remove("WATERFALL_DATA_DIR")
    .env_remove("XDG_DATA_HOME")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// A running child: its stdout lines on a channel, its stderr lines on a channel and kept.
pub struct Proc {
    pub child: Child,
    pub out: mpsc::Receiver<String>,
    pub err: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn waterfall");
        let out = pump(child.stdout.take().expect("piped stdout"), None);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = pump(
            child.stderr.take().expect("piped stderr"),
            Some(stderr.clone()),
        );
        Proc {
            child,
            out,
            err,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal by pid (`kill -INT` is the Ctrl-C of a terminal).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(
    r: impl Read + Send + 'static,
    keep: Option<Arc<Mutex<Vec<String>>>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if let Some(k) = &keep {
                k.lock().unwrap().push(l.clone());
            }
            // The receiver may be gone; the kept copy still counts.
            let _ = tx.send(l);
        }
    });
    rx
}

/// The first line satisfying `pred` within `within`, else a panic naming `what`.
pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    what: &str,
    within: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if pred(&l) => return l,
            Ok(_) => {}
            Err(_) => panic!("no {what} within {within:?}"),
        }
    }
}

/// Polls until `path` holds at least `n` frames, at most `within`; returns the count seen.
pub fn wait_frames(path: &Path, n: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let got = frames(path);
        if got >= n || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Lines a user should never see by default: other crates' log lines and warnings.
pub fn assert_no_foreign_noise(who: &str, lines: &[String]) {
    for l in lines {
        assert!(
            !(l.contains("libp2p") || l.contains("Penalty") || l.contains("WARN")),
            "{who} printed log noise: {l:?}\nall of stderr:\n{}",
            lines.join("\n")
        );
    }
}
