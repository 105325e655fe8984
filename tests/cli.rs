//! The CLI as a user runs it: separate `waterfall` processes on loopback (mDNS off: no namespace
//! here), a real crash (`kill -9`) of a relay process, and the errors a user sees.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_waterfall");

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A child process killed (by its pid) when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's stdout, delivered on a channel by a reader thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(
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

fn frames(path: &Path) -> usize {
    waterfall::media::source::read_all_frames(path)
        .map(|f| f.len())
        .unwrap_or(0)
}

fn ffmpeg_ok(path: &Path) {
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
        Err(_) => eprintln!(
            "ffmpeg not installed: decode check of {} skipped",
            path.display()
        ),
    }
}

fn broadcaster(dir: &Path, max_children: &str) -> (Proc, String) {
    let pw = dir.join("pw.txt");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let mut c = Command::new(BIN)
        .args(["broadcast", "--room", "cli-room", "--password-file"])
        .arg(&pw)
        .arg("--video")
        .arg(fixture("f.ivf"))
        .arg("--audio")
        .arg(fixture("f.ogg"))
        .args([
            "--loop",
            "--no-mdns",
            "--max-children",
            max_children,
            "--data-dir",
        ])
        .arg(dir.join("bcast"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn broadcaster");
    let rx = lines(&mut c);
    let ticket = wait_line(&rx, "ticket", Duration::from_secs(60), |l| {
        l.starts_with("wf1")
    });
    (Proc(c), ticket)
}

fn viewer(
    dir: &Path,
    name: &str,
    ticket: &str,
    extra: &[&str],
) -> (Proc, mpsc::Receiver<String>, PathBuf) {
    let video = dir.join(format!("{name}.ivf"));
    let mut c = Command::new(BIN)
        .arg("watch")
        .arg(ticket)
        .arg("--password-file")
        .arg(dir.join("pw.txt"))
        .arg("--video")
        .arg(&video)
        .args(["--json", "--no-mdns", "--data-dir"])
        .arg(dir.join(name))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn viewer");
    let rx = lines(&mut c);
    (Proc(c), rx, video)
}

#[test]
fn keygen_persists_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let out = Command::new(BIN)
            .args(["keygen", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let a = run();
    assert!(a.starts_with("12D3KooW"), "{a}");
    assert_eq!(a, run());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(dir.path().join("identity.key")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
}

#[test]
fn broadcast_watch_and_a_relay_killed_with_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The broadcaster feeds one child: viewer A relays to viewer B.
    let (_b, ticket) = broadcaster(d, "1");
    let (mut a, a_rx, a_video) = viewer(d, "a", &ticket, &[]);
    wait_line(&a_rx, "A joined", Duration::from_secs(60), |l| {
        l.contains("\"joined\"")
    });
    wait_line(
        &a_rx,
        "A's first video frame",
        Duration::from_secs(30),
        |l| l.contains("first_frame") && l.contains("video"),
    );
    let (_bv, b_rx, b_video) = viewer(d, "b", &ticket, &[]);
    let joined = wait_line(&b_rx, "B joined", Duration::from_secs(60), |l| {
        l.contains("\"joined\"")
    });
    assert!(joined.contains("\"depth\":2"), "B joins below A: {joined}");
    wait_line(&b_rx, "B's first frame", Duration::from_secs(30), |l| {
        l.contains("first_frame") && l.contains("video")
    });
    let before = frames(&b_video);
    // A real crash: no goodbye, the OS closes A's sockets.
    let pid = a.0.id();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = a.0.wait();
    let t = Instant::now();
    let back = wait_line(&b_rx, "B rejoined", Duration::from_secs(60), |l| {
        l.contains("\"rejoined\"") || l.contains("\"parent_changed\"")
    });
    eprintln!("B back after {:?}: {back}", t.elapsed());
    // Media flows again through the new parent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while frames(&b_video) < before + 30 {
        assert!(Instant::now() < deadline, "B's video did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A's file, cut by SIGKILL, is still valid up to its last frame.
    let a_read = waterfall::media::source::read_all_frames(&a_video);
    assert!(
        a_read.as_ref().is_ok_and(|f| !f.is_empty()),
        "A's file ({:?} bytes): {:?}",
        std::fs::metadata(&a_video).map(|m| m.len()),
        a_read.map(|f| f.len())
    );
    ffmpeg_ok(&a_video);
    ffmpeg_ok(&b_video);
}

#[test]
fn wrong_password_and_bad_ticket_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_b, ticket) = broadcaster(d, "2");
    std::fs::write(d.join("wrong.txt"), "guess\n").unwrap();
    let out = Command::new(BIN)
        .arg("watch")
        .arg(&ticket)
        .arg("--password-file")
        .arg(d.join("wrong.txt"))
        .args(["--video", "/dev/null", "--no-mdns", "--data-dir"])
        .arg(d.join("w"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong password"), "{err}");
    let out = Command::new(BIN)
        .args([
            "watch",
            "wf1notaticket",
            "--no-password",
            "--no-mdns",
            "--data-dir",
        ])
        .arg(d.join("w"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ticket"));
}
