//! The CLI as a user runs it: separate `waterfall` processes on loopback (mDNS off: no namespace
//! here), a real crash (`kill -9`) of a relay process, and the errors a user sees.

mod cli_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{BIN, Proc, wait_line};
use support::{ffmpeg_ok, fixture, frames};

fn broadcaster(dir: &Path, max_children: &str) -> (Proc, String) {
    let pw = dir.join("pw.txt");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let mut c = cli_support::waterfall();
    c.args(["broadcast", "--room", "cli-room", "--password-file"])
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
        .arg(dir.join("bcast"));
    let p = Proc::spawn(&mut c);
    let ticket = wait_line(&p.out, "ticket", Duration::from_secs(60), |l| {
        l.starts_with("wf1")
    });
    (p, ticket)
}

/// A viewer writing its video to `<name>.ivf` (returned), its events on stdout (`--json`).
fn viewer(dir: &Path, name: &str, ticket: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let video = dir.join(format!("{name}.ivf"));
    let mut c = cli_support::waterfall();
    c.arg("watch")
        .arg(ticket)
        .arg("--password-file")
        .arg(dir.join("pw.txt"))
        .arg("--video")
        .arg(&video)
        .args(["--json", "--no-mdns", "--data-dir"])
        .arg(dir.join(name))
        .args(extra);
    (Proc::spawn(&mut c), video)
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
    let (mut a, a_video) = viewer(d, "a", &ticket, &[]);
    wait_line(&a.out, "A joined", Duration::from_secs(60), |l| {
        l.contains("\"joined\"")
    });
    wait_line(
        &a.out,
        "A's first video frame",
        Duration::from_secs(30),
        |l| l.contains("first_frame") && l.contains("video"),
    );
    let (bv, b_video) = viewer(d, "b", &ticket, &[]);
    let joined = wait_line(&bv.out, "B joined", Duration::from_secs(60), |l| {
        l.contains("\"joined\"")
    });
    assert!(joined.contains("\"depth\":2"), "B joins below A: {joined}");
    wait_line(&bv.out, "B's first frame", Duration::from_secs(30), |l| {
        l.contains("first_frame") && l.contains("video")
    });
    let before = frames(&b_video);
    // A real crash: no goodbye, the OS closes A's sockets.
    a.signal("KILL");
    a.wait(Duration::from_secs(10))
        .expect("A exits at once on SIGKILL");
    let t = Instant::now();
    let back = wait_line(&bv.out, "B rejoined", Duration::from_secs(60), |l| {
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
    let out = cli_support::waterfall()
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
    let out = cli_support::waterfall()
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

/// Runs `waterfall ARGS` to completion (bounded) and returns (success, stderr).
fn run_fails(args: &[&str], dir: &Path) -> String {
    let mut p = cli_support::Proc::spawn(cli_support::waterfall().args(args).current_dir(dir));
    let st = p.wait(Duration::from_secs(30)).expect("exits within 30 s");
    let err = p.stderr().join("\n");
    assert!(
        !st.success(),
        "`waterfall {}` succeeded: {err}",
        args.join(" ")
    );
    err
}

#[test]
fn missing_and_mismatched_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("f.ogg"), d.join("talk.ogg")).unwrap();
    std::fs::copy(fixture("f.ivf"), d.join("talk.ivf")).unwrap();
    // An Ogg file under an IVF name.
    std::fs::copy(fixture("f.ogg"), d.join("renamed.ivf")).unwrap();
    let bc = |media: &[&str]| {
        let mut a = vec!["broadcast", "--room", "r", "--no-password", "--no-mdns"];
        a.extend_from_slice(media);
        a.extend_from_slice(&["--data-dir", "dd"]);
        run_fails(&a, d)
    };
    let err = bc(&["--video", "nosuch.ivf"]);
    assert!(err.contains("no such file: nosuch.ivf"), "{err}");
    assert!(!err.contains("parser thread"), "{err}");
    let err = bc(&["--video", "talk.ivf", "--audio", "nosuch.ogg"]);
    assert!(err.contains("no such file: nosuch.ogg"), "{err}");
    let err = bc(&["--video", "talk.ogg"]);
    assert!(
        err.contains("talk.ogg holds audio") && err.contains("--audio"),
        "{err}"
    );
    let err = bc(&["--audio", "talk.ivf"]);
    assert!(
        err.contains("talk.ivf holds video") && err.contains("--video"),
        "{err}"
    );
    let err = bc(&["--video", "renamed.ivf"]);
    assert!(
        err.contains("renamed.ivf is named like IVF video but holds Ogg Opus audio"),
        "{err}"
    );
    // Errors are one line each, no backtrace even when RUST_BACKTRACE is set.
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn stdin_formats_are_recognised_and_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let piped = |media: &[&str], input: &[u8]| {
        let mut a = vec!["broadcast", "--room", "r", "--no-password", "--no-mdns"];
        a.extend_from_slice(media);
        a.extend_from_slice(&["--data-dir", "dd"]);
        let mut c = cli_support::waterfall();
        c.args(&a).current_dir(d).stdin(Stdio::piped());
        let mut p = cli_support::Proc::spawn(&mut c);
        use std::io::Write;
        let mut stdin = p.child.stdin.take().unwrap();
        let _ = stdin.write_all(input);
        drop(stdin);
        let st = p.wait(Duration::from_secs(30)).expect("exits within 30 s");
        (st.success(), p.stderr().join("\n"))
    };
    let ivf = std::fs::read(fixture("f.ivf")).unwrap();
    let (ok, err) = piped(&["--audio", "-"], &ivf);
    assert!(
        !ok && err.contains("stdin holds video") && err.contains("--video"),
        "{err}"
    );
    let ogg = std::fs::read(fixture("f.ogg")).unwrap();
    let (ok, err) = piped(&["--video", "-"], &ogg);
    assert!(
        !ok && err.contains("stdin holds audio") && err.contains("--audio"),
        "{err}"
    );
    let (ok, err) = piped(&["--video", "-"], b"hello, world\n");
    assert!(
        !ok && err.contains("stdin starts with bytes 68656c6c"),
        "{err}"
    );
    let (ok, err) = piped(&["--video", "-", "--audio", "-"], b"");
    assert!(!ok && err.contains("only one of"), "{err}");
}

#[test]
fn ogg_opus_on_stdin_reaches_a_viewer() {
    // `--audio -` reads Ogg Opus, as --help says. The test is the pipe's writer: the headers go
    // first (the broadcaster reads them before it prints the ticket), the audio once a viewer is
    // connected, so the viewer must receive every packet of the file.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ogg = std::fs::read(fixture("f.ogg")).unwrap();
    // Byte offset of the third Ogg page: OpusHead and OpusTags are the first two.
    let third_page = ogg
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == b"OggS")
        .map(|(i, _)| i)
        .nth(2)
        .expect("three pages");
    let mut c = cli_support::waterfall();
    c.args([
        "broadcast",
        "--room",
        "pipe",
        "--no-password",
        "--audio",
        "-",
    ])
    .args(["--no-mdns", "--json", "--data-dir"])
    .arg(d.join("b"))
    .stdin(Stdio::piped());
    let mut b = cli_support::Proc::spawn(&mut c);
    let mut pipe = b.child.stdin.take().unwrap();
    use std::io::Write;
    pipe.write_all(&ogg[..third_page]).unwrap();
    let ticket = wait_line(&b.out, "ticket", Duration::from_secs(60), |l| {
        l.starts_with("wf1")
    });
    let audio = d.join("out.ogg");
    let mut w = cli_support::waterfall();
    w.args([
        "watch",
        &ticket,
        "--no-password",
        "--json",
        "--no-mdns",
        "--audio",
    ])
    .arg(&audio)
    .arg("--data-dir")
    .arg(d.join("w"));
    let v = cli_support::Proc::spawn(&mut w);
    wait_line(&v.out, "viewer connected", Duration::from_secs(60), |l| {
        l.contains("parent_connected")
    });
    // Let the broadcaster's side of the connection settle as well.
    std::thread::sleep(Duration::from_millis(500));
    pipe.write_all(&ogg[third_page..]).unwrap();
    drop(pipe);
    let want = frames(&fixture("f.ogg"));
    let got = cli_support::wait_frames(&audio, want, Duration::from_secs(30));
    assert_eq!(got, want, "audio packets received from a piped Ogg file");
    let ended = wait_line(&b.out, "source_ended", Duration::from_secs(30), |l| {
        l.contains("source_ended")
    });
    assert!(ended.contains("\"error\":null"), "{ended}");
    ffmpeg_ok(&audio);
}

#[test]
fn damaged_tickets_are_reported_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = waterfall::wire::Ticket {
        v: waterfall::wire::VERSION,
        room: "standup".into(),
        broadcaster: waterfall::proto::NodeId([9; 32]),
        addrs: vec![
            "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWEaSy7e8GW3smqkZ5hetPhb58CXiw6WD4BLHMiTvN96rm".into(),
        ],
        check: vec![3; 8],
    }
    .to_string();
    let cut = &good[..good.len() * 2 / 3];
    let typo = format!("{}{}", &good[..40], &good[42..]);
    for bad in [cut, typo.as_str()] {
        let err = run_fails(
            &[
                "watch",
                bad,
                "--no-password",
                "--no-mdns",
                "--data-dir",
                "dd",
            ],
            d,
        );
        assert!(
            err.contains("this ticket is damaged or incomplete"),
            "{bad}: {err}"
        );
        for internal in ["Syntax", "Semantic", "malformed", "invalid type", "CBOR"] {
            assert!(!err.contains(internal), "{err}");
        }
    }
}

#[test]
fn help_names_the_password_variable() {
    for cmd in ["broadcast", "watch"] {
        let out = Command::new(BIN).args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("WATERFALL_PASSWORD"), "{cmd} --help:\n{help}");
        assert!(help.contains("--password-file"), "{help}");
    }
    let out = Command::new(BIN)
        .args(["broadcast", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--start-now"), "{help}");
}
