//! The page in a real browser: Debian's headless Chromium, driven through the DevTools protocol
//! (a small client over a websocket: `Page.navigate`, `Runtime.evaluate`,
//! `Page.captureScreenshot`), plays a room through a tree of three CLI nodes, publishes its fake
//! camera by WHIP to CLI viewers two hops down, and draws the tree (checked on a screenshot).
//!
//! Chromium runs only inside a network namespace this test creates: loopback plus a veth pair
//! whose address (10.213.7.1/24, private, existing only in the namespace) gives Chromium's ICE a
//! host candidate (it gathers none with loopback alone), with `--host-resolver-rules="MAP *
//! ~NOTFOUND"` so no name resolves. The waterfall nodes run in the same namespace, their
//! WebRTC bound to that address. The test re-executes itself inside the namespace (`ip netns
//! exec`) in a child role and reads the child's report lines; the namespace is deleted when the
//! test ends, however it ends. Without root, `ip` or Chromium (`apt-get install chromium`;
//! `.ci/run` installs it) the test says why and passes without running.
//!
//! The screenshots are kept in `target/tmp/browser/` (printed) for a person to look at.

mod http_support;
mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::netns::{get, ip, report_lines, say, self_in};

const CHILD_ENV: &str = "WATERFALL_BROWSER_CHILD";
const LOG_ENV: &str = "WATERFALL_BROWSER_LOG";
const MARK: &str = "@@browser ";
/// The namespace's own address: Chromium's host candidate and the nodes' WebRTC.
const ADDR: &str = "10.213.7.1";

/// Deletes the namespace when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn skip_reason() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Some("needs root for network namespaces".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2 (`ip`)".into());
    }
    if chromium().is_none() {
        return Some("needs Chromium (`apt-get install -y chromium`; .ci/run installs it)".into());
    }
    if Command::new("ffmpeg").arg("-version").output().is_err() {
        return Some("needs ffmpeg to check the recordings".into());
    }
    None
}

#[test]
fn page_plays_a_room_publishes_and_draws_the_tree() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let rt = support::netns::child_runtime(LOG_ENV);
        rt.block_on(child());
        return;
    }
    if let Some(why) = skip_reason() {
        eprintln!("browser test skipped: {why}");
        return;
    }
    let ns = format!("wfbr{}", std::process::id());
    let _ = ip(&["netns", "del", &ns]);
    ip(&["netns", "add", &ns]).expect("namespace");
    let _guard = Netns(ns.clone());
    for args in [
        vec!["-n", &ns, "link", "set", "lo", "up"],
        vec![
            "-n", &ns, "link", "add", "wfa0", "type", "veth", "peer", "name", "wfb0",
        ],
        vec!["-n", &ns, "addr", "add", "10.213.7.1/24", "dev", "wfa0"],
        vec!["-n", &ns, "link", "set", "wfa0", "up"],
        vec!["-n", &ns, "link", "set", "wfb0", "up"],
        vec!["-n", &ns, "route", "add", "default", "dev", "wfa0"],
    ] {
        ip(&args).expect("namespace setup");
    }
    let mut cmd = self_in(
        &ns,
        "page_plays_a_room_publishes_and_draws_the_tree",
        LOG_ENV,
        "child",
    )
    .expect("child command");
    cmd.env(CHILD_ENV, "1");
    let mut child = cmd.spawn().expect("child starts");
    let out = child.stdout.take().expect("stdout");
    // The child has its own deadlines; this one only bounds a hang.
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(report_lines(out, MARK));
    });
    let report = match rx.recv_timeout(Duration::from_secs(420)) {
        Ok(r) => r,
        Err(_) => {
            let _ = child.kill();
            panic!("the browser child did not finish within 420 s");
        }
    };
    let status = child.wait().expect("child exits");
    for (k, v) in &report {
        eprintln!("{k}: {v}");
    }
    assert!(
        status.success(),
        "the browser child failed ({status}); its report: {report:?}"
    );
    assert_eq!(get(&report, "done"), vec!["ok"], "{report:?}");
}

// ----------------------------------------------------------------- inside the namespace

/// A process killed (by its pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a process's output, as they come.
fn lines(r: impl Read + Send + 'static) -> std_mpsc::Receiver<String> {
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut r = std::io::BufReader::new(r);
        while std::io::BufRead::read_until(&mut r, b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&buf).into_owned();
            buf.clear();
            for l in text.split(['\r', '\n']).filter(|l| !l.trim().is_empty()) {
                if tx.send(l.to_owned()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn wait_line(
    rx: &std_mpsc::Receiver<String>,
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

/// A waterfall CLI process on this namespace's loopback (libp2p) and address (WebRTC).
fn waterfall(
    dir: &Path,
    name: &str,
    args: &[&str],
) -> (Proc, std_mpsc::Receiver<String>, std_mpsc::Receiver<String>) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_waterfall"));
    c.args(args)
        .args([
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--udp-bind",
            ADDR,
        ])
        .arg("--data-dir")
        .arg(dir.join(format!("{name}-data")))
        .arg("--password-file")
        .arg(dir.join("pw.txt"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = c.spawn().expect("waterfall starts");
    let out = lines(p.stdout.take().expect("stdout"));
    let err = lines(p.stderr.take().expect("stderr"));
    (Proc(p), out, err)
}

fn page_url(err: &std_mpsc::Receiver<String>) -> String {
    let l = wait_line(err, "the page's address", Duration::from_secs(30), |l| {
        l.starts_with("page: http://")
    });
    l["page: ".len()..]
        .split_whitespace()
        .next()
        .expect("url")
        .to_owned()
}

/// Headless Chromium with a fresh profile; DevTools on a free port of this namespace.
struct Browser {
    _proc: Proc,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let p = Command::new(chromium().expect("chromium"))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                // No name resolves; the loopback address of the node's page is not a name,
                // but the rules would catch it too.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        let file = profile.path().join("DevToolsActivePort");
        let mut port = None;
        for _ in 0..300 {
            if let Some(p) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                port = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Browser {
            _proc: Proc(p),
            port: port.expect("Chromium's DevTools port within 30 s"),
            _profile: profile,
        }
    }

    /// A DevTools session on the browser's page.
    async fn page(&self) -> Cdp {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let list = http_support::request(addr, "GET", "/json/list", &[], b"").await;
        let targets: Value = serde_json::from_slice(&list.body).expect("target list");
        let ws = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(ws)
            .await
            .expect("DevTools websocket");
        Cdp { ws, next: 0 }
    }
}

/// The DevTools protocol: one request at a time, events skipped.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(msg))
            .await
            .expect("DevTools send");
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(m) = self.ws.next().await {
                let m = m.expect("DevTools receive");
                let Ok(text) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                if v["id"] == id {
                    return v;
                }
            }
            panic!("DevTools closed")
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within 30 s"));
        if !answer["error"].is_null() {
            panic!("{method}: {}", answer["error"]);
        }
        answer["result"].clone()
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        let ok = self
            .poll(
                Duration::from_secs(20),
                "document.readyState === 'complete' && !!document.getElementById('tree')",
                |v| v == &Value::Bool(true),
            )
            .await;
        let seen = self
            .eval("location.href + ' | ' + document.readyState + ' | ' + document.title")
            .await;
        assert!(ok, "{url} did not load: {seen}");
    }

    /// Evaluates `expr` every 250 ms until `ok` holds (true) or `within` passes (false).
    async fn poll(&mut self, within: Duration, expr: &str, ok: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if ok(&self.eval(expr).await) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// A PNG of the page (the whole viewport, or `clip` in CSS pixels).
    async fn screenshot(&mut self, clip: Option<Value>) -> Vec<u8> {
        let mut params = json!({"format": "png", "captureBeyondViewport": true});
        if let Some(c) = clip {
            params["clip"] = c;
        }
        let r = self.call("Page.captureScreenshot", params).await;
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64")
    }
}

/// Pixels of a PNG close to `rgb` (decoded by ffmpeg into raw RGB).
fn count_color(png: &Path, rgb: [u8; 3]) -> usize {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(png)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success(), "ffmpeg decodes the screenshot");
    out.stdout
        .chunks_exact(3)
        .filter(|p| p.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 24))
        .count()
}

/// `ffmpeg` decodes a camera recording without a complaint. A browser stamps its frames with
/// capture times, which jitter around the frame rate: ffmpeg's null output rounds them to
/// its guessed frame rate and then complains of two frames on one tick, which says nothing
/// about the file. The frames keep the file's own time base (`-enc_time_base -1`) here.
fn decodes(path: &Path) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-enc_time_base", "-1", "-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ffmpeg rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&d).expect("artifact dir");
    d
}

async fn child() {
    let result = tokio::time::timeout(Duration::from_secs(360), async {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        std::fs::write(d.join("pw.txt"), "hunter2\n").unwrap();
        let fixture = |n: &str| support::fixture(n).display().to_string();

        // --- 1. the page plays a room through a tree of three nodes: B -> V1 -> V2 (page).
        let (_b, bout, _berr) = waterfall(
            d,
            "b",
            &[
                "broadcast", "--room", "wf", "--video", &fixture("f.ivf"), "--audio",
                &fixture("f.ogg"), "--loop", "--start-now", "--max-children", "1", "--no-http",
            ],
        );
        let ticket = wait_line(&bout, "the ticket", Duration::from_secs(60), |l| l.starts_with("wf1"));
        let (_v1, _v1out, v1err) = waterfall(
            d,
            "v1",
            &["watch", &ticket, "--no-http", "--max-children", "1", "--video", &d.join("v1.ivf").display().to_string()],
        );
        wait_line(&v1err, "viewer 1 at depth 1", Duration::from_secs(60), |l| l.contains("depth 1"));
        let (_v2, v2out, v2err) = waterfall(d, "v2", &["watch", &ticket, "--open", "--max-children", "1"]);
        let url = wait_line(&v2out, "the page's address (--open)", Duration::from_secs(60), |l| l.starts_with("http://"));
        say(MARK, "watch_url", &url);
        wait_line(&v2err, "viewer 2 at depth 2", Duration::from_secs(60), |l| l.contains("depth 2"));

        let browser = Browser::start().await;
        let mut page = browser.page().await;
        page.call("Page.enable", json!({})).await;
        page.navigate(&url).await;
        let frames_expr = "document.getElementById('video').getVideoPlaybackQuality().totalVideoFrames";
        let played = page
            .poll(Duration::from_secs(60), frames_expr, |v| v.as_u64().is_some_and(|n| n >= 90))
            .await;
        let shown = page.eval(frames_expr).await;
        say(MARK, "page_frames", &shown);
        assert!(played, "the page's <video> showed {shown} frames, not >= 90, within 60 s");
        let audio = page
            .eval("(() => { const s = document.getElementById('video').srcObject; return s ? s.getAudioTracks().filter(t => t.readyState === 'live' && !t.muted).length : 0; })()")
            .await;
        assert_eq!(audio, json!(1), "one live audio track");
        // The tree: root, parent, this node (highlighted), drawn from /api/status.
        let drawn = page
            .poll(Duration::from_secs(10), "document.querySelectorAll('#tree circle').length + ':' + document.querySelectorAll('#tree circle.me').length + ':' + document.getElementById('f-depth').textContent", |v| {
                // Three nodes whatever their order (the tree may promote one relay above the
                // other): root, parent, this node; or root, this node, its child.
                v == &json!("3:1:2") || v == &json!("3:1:1")
            })
            .await;
        let tree = page.eval("document.getElementById('tree').outerHTML").await;
        assert!(drawn, "the tree shows three nodes, this one highlighted: {tree}");
        say(MARK, "tree", page.eval("document.getElementById('tree-title').textContent").await);
        let shot = page.screenshot(None).await;
        let full = artifacts().join("page-watch.png");
        std::fs::write(&full, &shot).unwrap();
        say(MARK, "screenshot", full.display());
        let rect = page
            .eval("(() => { const r = document.getElementById('tree').getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height, scale: 1}; })()")
            .await;
        let tree_png = artifacts().join("page-tree.png");
        std::fs::write(&tree_png, page.screenshot(Some(rect)).await).unwrap();
        // This node's circle is filled with the highlight colour (#c2410c in the light scheme).
        let me = count_color(&tree_png, [0xc2, 0x41, 0x0c]);
        say(MARK, "tree_highlight_pixels", me);
        assert!(me >= 100, "the tree picture shows this node highlighted ({me} pixels)");
        page.eval("document.getElementById('stop').click(); true").await;

        // --- 2. the page publishes by WHIP into P; CLI viewers two hops down record it.
        let (_p, pout, perr) = waterfall(d, "p", &["broadcast", "--room", "cam", "--whip", "--max-children", "1"]);
        let purl = page_url(&perr);
        page.navigate(&format!("{purl}?room=cam")).await;
        page.eval("document.getElementById('publish').click(); true").await;
        let cam_ticket = wait_line(&pout, "the WHIP broadcast's ticket", Duration::from_secs(60), |l| l.starts_with("wf1"));
        let (c1, c2) = (d.join("c1"), d.join("c2"));
        let (_w1, _w1out, w1err) = waterfall(
            d,
            "w1",
            &["watch", &cam_ticket, "--no-http", "--max-children", "1", "--duration", "20", "--record", &c1.display().to_string()],
        );
        wait_line(&w1err, "the first camera viewer at depth 1", Duration::from_secs(60), |l| l.contains("depth 1"));
        let (mut w2, _w2out, w2err) = waterfall(
            d,
            "w2",
            &["watch", &cam_ticket, "--no-http", "--duration", "12", "--record", &c2.display().to_string()],
        );
        wait_line(&w2err, "the second camera viewer at depth 2", Duration::from_secs(60), |l| l.contains("depth 2"));
        let status = tokio::task::spawn_blocking(move || w2.0.wait()).await.unwrap().unwrap();
        assert!(status.success(), "camera viewer 2 exits 0");
        let publishing = page.eval("document.getElementById('state').textContent").await;
        say(MARK, "publish_state", &publishing);
        let shot = artifacts().join("page-publish.png");
        std::fs::write(&shot, page.screenshot(None).await).unwrap();
        say(MARK, "screenshot", shot.display());
        for c in [&c1, &c2] {
            let ivf = c.with_extension("ivf");
            // Kept beside the screenshots, for a person to play.
            let name = ivf.file_name().expect("file name").to_owned();
            let _ = std::fs::copy(&ivf, artifacts().join(&name));
            let n = support::frames(&ivf);
            say(MARK, "camera_frames", format!("{} {n}", ivf.display()));
            assert!(n >= 90, "{}: {n} frames of the page's camera", ivf.display());
            decodes(&ivf);
            support::ffmpeg_ok(&c.with_extension("ogg"));
        }
    })
    .await;
    assert!(result.is_ok(), "the browser child timed out");
    say(MARK, "done", "ok");
}
