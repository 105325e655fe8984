//! Failures a user on the internet can hit are visible: a message on stderr and a `--json`
//! event, within a bound, without debug logging.
//!
//! - unreachable bootstrap peer and a bootstrap address with the wrong peer id (loopback);
//! - behind a NAT with no relay among the bootstrap peers (lab);
//! - ICE failure between two symmetric NATs without TURN (lab).
//!
//! TURN refusing the credentials is checked in `nat_media` (the broadcaster of the TURN case).

mod natlab;

use std::process::{Command, Stdio};
use std::time::Duration;

use natlab::{BIN, Lab, NatKind, fixture, lines, listen_all, wait_line};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn unreachable_and_wrong_bootstrap_peers_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A real node to dial with the wrong peer id.
    let mut node = Command::new(BIN)
        .args([
            "node",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(d.join("node"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let err = lines(node.stderr.take().unwrap(), "node", false);
    let mut node = Kill(node);
    let listening = wait_line(&err, "node listening", Duration::from_secs(30), |l| {
        l.starts_with("listening: /ip4/127.0.0.1/tcp/")
    });
    let node_addr = listening["listening: ".len()..].to_owned();
    let (tcp, _) = node_addr.rsplit_once("/p2p/").unwrap();
    let other = Command::new(BIN)
        .args(["keygen", "--data-dir"])
        .arg(d.join("other"))
        .output()
        .unwrap();
    let other_id = String::from_utf8_lossy(&other.stdout).trim().to_owned();
    let wrong_id = format!("{tcp}/p2p/{other_id}");
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let unreachable = format!("/ip4/127.0.0.1/tcp/{closed}/p2p/{other_id}");

    let started = std::time::Instant::now();
    let mut watch = Command::new(BIN)
        // The CLI listens on every interface by default; this test stays on loopback.
        .env("WATERFALL_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("WATERFALL_UDP_BIND", "127.0.0.1")
        .args([
            "watch",
            "--room",
            "nowhere",
            "--no-password",
            "--json",
            "--no-mdns",
        ])
        .args([
            "--video",
            "/dev/null",
            "--bootstrap",
            &unreachable,
            "--bootstrap",
        ])
        .arg(&wrong_id)
        .arg("--data-dir")
        .arg(d.join("watch"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(watch.stdout.take().unwrap(), "watch out", true);
    let werr = lines(watch.stderr.take().unwrap(), "watch err", true);
    let _watch = Kill(watch);
    let within = Duration::from_secs(15);
    let first = wait_line(&out, "bootstrap_failed events", within, |l| {
        l.contains("\"bootstrap_failed\"")
    });
    let second = wait_line(&out, "the second bootstrap_failed", within, |l| {
        l.contains("\"bootstrap_failed\"")
    });
    let both = format!("{first}\n{second}");
    assert!(both.contains(&unreachable), "{both}");
    assert!(both.contains(&wrong_id), "{both}");
    assert!(
        both.to_lowercase().contains("peer id"),
        "the wrong peer id is named as such: {both}"
    );
    wait_line(&werr, "the message", within, |l| {
        l.contains("bootstrap peer") && l.contains("unreachable")
    });
    eprintln!("reported within {:?}", started.elapsed());
    let _ = node.0.kill();
}

#[test]
fn behind_a_nat_without_a_relay_is_reported() {
    let Some(mut lab) = Lab::new() else { return };
    let public = lab.public_host();
    let home = lab.nat_host(NatKind::Cone);
    let dir = lab.path("public");
    let id = lab.peer_id(&dir);
    let mut a = args(&["node", "--no-relay"]);
    a.extend(listen_all(4001));
    let p = lab.waterfall(&public, "public", &a, &[]);
    wait_line(
        &p.err,
        "public node listening",
        Duration::from_secs(30),
        |l| l.starts_with("listening:"),
    );
    // Both transports: AutoNAT learns our QUIC address over the QUIC connection, and only a
    // QUIC dial-back fails fast (a TCP one waits for the SYN to time out).
    let boot = format!("/ip4/{}/tcp/4001/p2p/{id}", public.ip);
    let boot_quic = format!("/ip4/{}/udp/4001/quic-v1/p2p/{id}", public.ip);
    let pw = lab.path("pw.txt");
    std::fs::write(&pw, "x\n").unwrap();
    let mut b = args(&[
        "broadcast",
        "--room",
        "r",
        "--json",
        "--loop",
        "--bootstrap",
        &boot,
    ]);
    b.extend(args(&["--bootstrap", &boot_quic]));
    b.extend(args(&["--password-file", &pw.to_string_lossy()]));
    b.extend(args(&["--video", &fixture("f.ivf").to_string_lossy()]));
    b.extend(listen_all(0));
    let bc = lab.waterfall(&home, "bcast", &b, &[]);
    wait_line(
        &bc.out,
        "bootstrap connected",
        Duration::from_secs(30),
        |l| l.contains("\"bootstrap_connected\""),
    );
    // AutoNAT's dial-back over QUIC fails within seconds; the node then knows it is behind a
    // NAT, and that no relay serves it.
    wait_line(&bc.out, "behind_nat", Duration::from_secs(60), |l| {
        l.contains("\"reachability\"") && l.contains("behind_nat")
    });
    wait_line(&bc.out, "no_relay", Duration::from_secs(10), |l| {
        l.contains("\"no_relay\"")
    });
    wait_line(
        &bc.err,
        "the no-relay message",
        Duration::from_secs(5),
        |l| l.contains("no relay"),
    );
}

#[test]
fn ice_failure_between_two_symmetric_nats_is_reported() {
    let Some(mut lab) = Lab::new() else { return };
    let public = lab.public_host();
    let dir = lab.path("relay");
    let id = lab.peer_id(&dir);
    let mut a = args(&["node", "--relay"]);
    a.extend(listen_all(4001));
    let r = lab.waterfall(&public, "relay", &a, &[]);
    wait_line(&r.err, "relay listening", Duration::from_secs(30), |l| {
        l.starts_with("listening:")
    });
    let boot = format!("/ip4/{}/tcp/4001/p2p/{id}", public.ip);
    let x = lab.nat_host(NatKind::Symmetric);
    let y = lab.nat_host(NatKind::Symmetric);
    let pw = lab.path("pw.txt");
    std::fs::write(&pw, "x\n").unwrap();
    let pw = pw.to_string_lossy().into_owned();
    let mut b = args(&[
        "broadcast",
        "--room",
        "r",
        "--json",
        "--loop",
        "--bootstrap",
        &boot,
    ]);
    b.extend(args(&["--password-file", &pw]));
    b.extend(args(&["--video", &fixture("f.ivf").to_string_lossy()]));
    b.extend(listen_all(0));
    let bc = lab.waterfall(&x, "bcast", &b, &[]);
    let ticket = wait_line(&bc.out, "ticket", Duration::from_secs(60), |l| {
        l.starts_with("wf1")
    });
    let mut w = args(&["watch", &ticket, "--json", "--bootstrap", &boot]);
    w.extend(args(&["--password-file", &pw, "--video", "/dev/null"]));
    w.extend(listen_all(0));
    let v = lab.waterfall(&y, "viewer", &w, &[]);
    wait_line(&v.out, "viewer joined", Duration::from_secs(90), |l| {
        l.contains("\"joined\"")
    });
    let failed = wait_line(&v.out, "ice_failed", Duration::from_secs(90), |l| {
        l.contains("\"ice_failed\"") || l.contains("first_frame")
    });
    assert!(
        failed.contains("\"ice_failed\""),
        "media cannot cross two symmetric NATs without TURN: {failed}"
    );
    wait_line(
        &v.err,
        "the ICE failure message",
        Duration::from_secs(5),
        |l| l.contains("WebRTC connection failed"),
    );
}
