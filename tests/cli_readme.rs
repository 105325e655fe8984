//! The README's "Using it" section, followed literally: the commands below are checked to be
//! lines of the README, then run as a person would run them on one machine — a temporary HOME
//! (so both processes use the default data directory), the broadcaster in one "terminal", the
//! ticket copied from its output into the viewer's command a few seconds later, Ctrl-C (SIGINT)
//! to end the viewer — and the files it leaves are checked frame by frame.
//!
//! Also here: what a user sees on stderr by default (no other crate's warnings, and a status line
//! that log lines never cut in two).

mod cli_support;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cli_support::{Proc, assert_no_foreign_noise, wait_frames, wait_line};
use support::{ffmpeg_ok, fixture};

/// The README lines this test runs, verbatim (the part before any `#` comment).
const KEYGEN: &str = "waterfall keygen";
const PASSWORD: &str = "echo 'secret' > pw.txt";
const BROADCAST: &str =
    "waterfall broadcast --room standup --password-file pw.txt --video talk.ivf --audio talk.ogg";
const WATCH: &str = "waterfall watch wf1... --password-file pw.txt --video out.ivf --audio out.ogg";

/// The "Using it" code block of the README.
fn using_it() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("## Using it")
        .nth(1)
        .expect("README has a \"## Using it\" section");
    let block = section
        .split("```")
        .nth(1)
        .expect("\"Using it\" starts with a code block");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_owned())
        .collect()
}

/// A network namespace with only loopback up, where the README's commands run: they keep mDNS
/// on (the README's lines do not turn it off), and libp2p's mDNS speaks on every non-loopback
/// interface, so from a test it must find none. Deleted when dropped.
struct LoopbackOnly(String);

impl LoopbackOnly {
    fn new(tag: &str) -> Result<LoopbackOnly, String> {
        let ns = LoopbackOnly(format!("wf-readme-{tag}-{}", std::process::id()));
        support::netns::ip(&["netns", "add", &ns.0])?;
        support::netns::ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for LoopbackOnly {
    fn drop(&mut self) {
        let _ = support::netns::ip(&["netns", "del", &self.0]);
    }
}

/// `waterfall ARGS` as a user in `home` runs it (default data directory under `home`), inside
/// `ns` (`ip netns exec` execs the binary: the pid is the node's).
fn user_command(home: &Path, ns: &LoopbackOnly, line: &str, ticket: Option<&str>) -> Command {
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("waterfall"), "{line}");
    let mut c = cli_support::waterfall();
    let mut wrapped = Command::new("ip");
    wrapped.args(["netns", "exec", &ns.0, cli_support::BIN]);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    // The README's commands with their real defaults (every interface: here, loopback only).
    wrapped
        .env_remove("WATERFALL_LISTEN")
        .env_remove("WATERFALL_UDP_BIND")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c = wrapped;
    for w in words {
        match (w, ticket) {
            ("wf1...", Some(t)) => c.arg(t),
            _ => c.arg(w),
        };
    }
    c.current_dir(home).env("HOME", home);
    c
}

/// The same frames, byte for byte.
fn same_frames(got: &Path, want: &Path) {
    let g = waterfall::media::source::read_all_frames(got).expect("output parses");
    let w = waterfall::media::source::read_all_frames(want).expect("source parses");
    assert_eq!(g.len(), w.len(), "{} frames", got.display());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(a.data, b.data, "{} frame {i} differs", got.display());
    }
}

#[test]
fn readme_using_it_broadcast_and_watch_in_two_terminals() {
    let lines = using_it();
    for cmd in [KEYGEN, PASSWORD, BROADCAST, WATCH] {
        assert!(
            lines.iter().any(|l| l == cmd),
            "README's \"Using it\" no longer has the line {cmd:?}: update this test with it"
        );
    }
    let ns = match LoopbackOnly::new("using-it") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipped: the README's commands run mDNS, only in a namespace: {e}");
            return;
        }
    };
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // The media files the README's commands name.
    std::fs::copy(fixture("f.ivf"), h.join("talk.ivf")).unwrap();
    std::fs::copy(fixture("f.ogg"), h.join("talk.ogg")).unwrap();

    let mut keygen = Proc::spawn(&mut user_command(h, &ns, KEYGEN, None));
    let peer = wait_line(
        &keygen.out,
        "keygen's peer id",
        Duration::from_secs(30),
        |l| l.starts_with("12D3KooW"),
    );
    assert!(
        keygen
            .wait(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    assert!(h.join(".local/share/waterfall/identity.key").exists());
    std::fs::write(h.join("pw.txt"), "secret\n").unwrap();

    // Terminal 1.
    let mut b = Proc::spawn(&mut user_command(h, &ns, BROADCAST, None));
    let ticket = wait_line(&b.out, "the ticket", Duration::from_secs(60), |l| {
        l.starts_with("wf1")
    });
    wait_line(
        &b.err,
        "the broadcaster's peer id",
        Duration::from_secs(5),
        |l| l == format!("peer id: {peer}"),
    );
    wait_line(&b.err, "the wait notice", Duration::from_secs(5), |l| {
        l.contains("waiting for the first viewer")
    });
    // A person takes a few seconds to copy the ticket to terminal 2: longer than the 3-second
    // clip, which must not have started without them.
    std::thread::sleep(Duration::from_secs(4));

    // Terminal 2, same machine, same (default) data directory.
    let mut w = Proc::spawn(&mut user_command(h, &ns, WATCH, Some(&ticket)));
    let notice = wait_line(
        &w.err,
        "the temporary identity notice",
        Duration::from_secs(30),
        |l| l.contains("temporary identity"),
    );
    assert!(notice.contains(".local/share/waterfall"), "{notice}");
    assert!(
        notice.contains(&format!("pid {}", b.pid())),
        "names the holder: {notice}"
    );
    let out_v = h.join("out.ivf");
    let out_a = h.join("out.ogg");
    let want = support::frames(&h.join("talk.ivf"));
    let got = wait_frames(&out_v, want, Duration::from_secs(60));
    assert_eq!(got, want, "video frames at the viewer");
    wait_frames(
        &out_a,
        support::frames(&h.join("talk.ogg")),
        Duration::from_secs(10),
    );

    // Ctrl-C in terminal 2 (unless the viewer already ended with the broadcast).
    if w.running() {
        w.signal("INT");
    }
    let st = w
        .wait(Duration::from_secs(20))
        .expect("the viewer exits after Ctrl-C");
    assert!(
        st.success(),
        "viewer exit: {st:?}\n{}",
        w.stderr().join("\n")
    );
    // The broadcaster ends by itself once its files are played; Ctrl-C if it has not yet.
    if b.wait(Duration::from_secs(15)).is_none() {
        b.signal("INT");
    }
    let st = b
        .wait(Duration::from_secs(20))
        .expect("the broadcaster exits");
    assert!(
        st.success(),
        "broadcaster exit: {st:?}\n{}",
        b.stderr().join("\n")
    );

    same_frames(&out_v, &h.join("talk.ivf"));
    same_frames(&out_a, &h.join("talk.ogg"));
    ffmpeg_ok(&out_v);
    ffmpeg_ok(&out_a);
    assert_no_foreign_noise("broadcast", &b.stderr());
    assert_no_foreign_noise("watch", &w.stderr());
}

#[test]
fn start_now_plays_files_without_a_viewer() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let mut c = cli_support::waterfall();
    c.args([
        "broadcast",
        "--room",
        "alone",
        "--no-password",
        "--start-now",
    ])
    .args(["--no-mdns", "--data-dir", "dd", "--video"])
    .arg(fixture("f.ivf"))
    .current_dir(h);
    let mut b = Proc::spawn(&mut c);
    wait_line(
        &b.err,
        "the end of the clip",
        Duration::from_secs(60),
        |l| l.contains("all sources ended"),
    );
    let st = b.wait(Duration::from_secs(20)).expect("exits");
    assert!(st.success());
    assert!(
        !b.stderr().iter().any(|l| l.contains("waiting for")),
        "{:?}",
        b.stderr()
    );
}

/// Runs `waterfall node` on a pseudo-terminal (util-linux `script`) for a few seconds.
fn node_on_a_terminal(home: &Path, rust_log: Option<&str>) -> Option<String> {
    let bin = cli_support::BIN;
    let cmd = format!(
        "timeout -s INT 7 {bin} node --no-mdns --data-dir {}/dd",
        home.display()
    );
    let mut c = Command::new("script");
    c.args(["-qfec", &cmd, "/dev/null"])
        .current_dir(home)
        .env("WATERFALL_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("WATERFALL_UDP_BIND", "127.0.0.1")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(l) = rust_log {
        c.env("RUST_LOG", l);
    }
    let mut p = match c.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("no `script` to give the node a terminal ({e}): check skipped");
            return None;
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while p.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = p.kill();
            let _ = p.wait();
            panic!("`script` running the node did not exit");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = p.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn node_status_line_is_never_cut_by_log_lines() {
    let home = tempfile::tempdir().unwrap();
    // Default filter: nothing but our own lines.
    let Some(quiet) = node_on_a_terminal(home.path(), None) else {
        return;
    };
    assert!(quiet.contains("dht records"), "status drawn: {quiet:?}");
    let lines: Vec<String> = quiet.lines().map(str::to_owned).collect();
    assert_no_foreign_noise("node", &lines);
    // With every debug line of libp2p interleaved, each status stays whole on its line: what
    // follows the last carriage return of a line that holds a status is the status alone.
    let Some(noisy) = node_on_a_terminal(home.path(), Some("debug")) else {
        return;
    };
    let mut statuses = 0;
    let mut logs = 0;
    for line in noisy.split('\n') {
        let shown = line
            .trim_end_matches('\r')
            .rsplit('\r')
            .next()
            .unwrap_or("");
        if shown.contains("DEBUG") {
            logs += 1;
        }
        if shown.contains("dht records") {
            statuses += 1;
            let s = shown.trim_start_matches("\x1b[K").trim_end();
            // `peers N  dht records N  rooms N  reachability WORD[  relaying]` and nothing else.
            let (counts, reach) = s.split_once("  reachability ").unwrap_or((s, ""));
            let words: Vec<&str> = counts.split_whitespace().collect();
            let reach = reach.trim_end_matches("  relaying");
            let whole = matches!(
                words.as_slice(),
                ["peers", p, "dht", "records", d, "rooms", r]
                    if [p, d, r].iter().all(|n| n.chars().all(|c| c.is_ascii_digit()))
            ) && ["unknown", "public", "behind NAT", "relayed"].contains(&reach);
            assert!(whole, "a status line with something else on it: {shown:?}");
        }
    }
    assert!(
        statuses >= 2 && logs > 0,
        "{statuses} statuses, {logs} log lines"
    );
}

/// The end of a broadcast reaches `watch`, which says so and exits 0 by itself (no Ctrl-C): the
/// broadcaster plays its clip once and leaves, its signed end notice comes down the tree.
#[test]
fn watch_exits_by_itself_when_the_broadcast_ends() {
    let ns = match LoopbackOnly::new("ending") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipped: needs a network namespace: {e}");
            return;
        }
    };
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::copy(fixture("f.ivf"), h.join("talk.ivf")).unwrap();
    std::fs::write(h.join("pw.txt"), "secret\n").unwrap();
    let mut b = Proc::spawn(&mut user_command(
        h,
        &ns,
        "waterfall broadcast --room ending --password-file pw.txt --video talk.ivf \
         --no-mdns --data-dir b",
        None,
    ));
    let ticket = wait_line(&b.out, "the ticket", Duration::from_secs(60), |l| {
        l.starts_with("wf1")
    });
    let mut w = Proc::spawn(&mut user_command(
        h,
        &ns,
        "waterfall watch wf1... --password-file pw.txt --video out.ivf --no-mdns --data-dir w",
        Some(&ticket),
    ));
    let st = w
        .wait(Duration::from_secs(90))
        .expect("the viewer exits by itself once the broadcast ends");
    let err = w.stderr();
    assert!(st.success(), "viewer exit: {st:?}\n{}", err.join("\n"));
    assert!(
        err.iter().any(|l| l.contains("the broadcast ended")),
        "the viewer says why it stops:\n{}",
        err.join("\n")
    );
    assert_eq!(
        support::frames(&h.join("out.ivf")),
        support::frames(&h.join("talk.ivf")),
        "every frame before the end"
    );
    let st = b
        .wait(Duration::from_secs(20))
        .expect("the broadcaster exits");
    assert!(st.success(), "broadcaster exit: {st:?}");
}

/// The README's first command, the main job: the demo as `cargo run` starts it (the words after
/// `--`), in a fresh directory, must end by itself with every viewer's files identical to the
/// source. The line is read from the README so the test follows the text.
#[test]
fn readme_first_command_runs_the_demo() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = readme
        .split("## Two commands")
        .nth(1)
        .and_then(|s| s.split("```").nth(1))
        .expect("README has a \"## Two commands\" code block");
    let line = block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim())
        .find(|l| l.starts_with("cargo run"))
        .expect("a `cargo run` line");
    let args: Vec<&str> = line
        .split_once(" -- ")
        .map(|(_, a)| a.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(args.first(), Some(&"demo"), "{line}");
    let dir = tempfile::tempdir().unwrap();
    let mut c = cli_support::waterfall();
    c.args(&args)
        .current_dir(dir.path())
        .env("HOME", dir.path());
    let mut p = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while p.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = p.kill();
            let _ = p.wait();
            panic!("the demo did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = p.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {err}");
    assert!(
        err.contains("every viewer holds every frame of the source, byte for byte"),
        "{err}"
    );
    let files = std::fs::read_dir(dir.path().join("waterfall-demo"))
        .unwrap()
        .count();
    assert!(files >= 12, "{files} files in waterfall-demo/");
}
