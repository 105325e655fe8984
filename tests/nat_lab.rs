//! The NAT lab itself: routers translate as declared (cone keeps one mapping and filters by
//! the contacted port, symmetric maps per destination), nothing leaves the lab (traffic off its
//! segments ends in the sink), and every namespace is gone after the lab is dropped.
//!
//! The UDP probes run inside namespaces, so they are separate processes: this test binary
//! re-runs itself with `NATLAB_ROLE` set and only [`udp_role`] selected (the usual way to get a
//! helper process without shipping another binary).

mod natlab;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natlab::{Lab, NatKind};

const REFLECT_PORTS: [u16; 2] = [4000, 4001];

/// Not a test of its own: the body of the helper processes (does nothing without
/// `NATLAB_ROLE`).
#[test]
fn udp_role() {
    match std::env::var("NATLAB_ROLE").as_deref() {
        Ok("reflect") => reflect(),
        Ok(probe) if probe.starts_with("probe:") => self::probe(&probe["probe:".len()..]),
        _ => {}
    }
}

/// Answer each datagram on port 4000 with the sender's address, from port 4000 and from 4001;
/// on 4001 from 4001 only. Exits after 20 s at most.
fn reflect() {
    let socks: Vec<UdpSocket> = REFLECT_PORTS
        .iter()
        .map(|p| UdpSocket::bind(("0.0.0.0", *p)).expect("bind reflector"))
        .collect();
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    println!("\nready");
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        for (i, s) in socks.iter().enumerate() {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                let msg = format!("{from} via {}", REFLECT_PORTS[i]);
                let _ = s.send_to(msg.as_bytes(), from);
                if i == 0 {
                    let _ = socks[1].send_to(format!("{from} via other").as_bytes(), from);
                }
            }
        }
    }
}

/// From one socket: contact port 4000 of `server` (and see whether the unsolicited answer from
/// port 4001 gets through), then port 4001; print `mapped A B other=BOOL`.
fn probe(server: &str) {
    let s = UdpSocket::bind("0.0.0.0:5555").expect("bind probe");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut ask = |port: u16| -> Vec<String> {
        let to: SocketAddr = format!("{server}:{port}").parse().unwrap();
        s.send_to(b"x", to).unwrap();
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_millis(800);
        while Instant::now() < end {
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    };
    let first = ask(4000);
    let second = ask(4001);
    let mapped = |got: &[String], via: &str| {
        got.iter()
            .find(|l| l.ends_with(via))
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .unwrap_or_default()
    };
    println!(
        "\nmapped {} {} other={}",
        mapped(&first, "via 4000"),
        mapped(&second, "via 4001"),
        first.iter().any(|l| l.ends_with("via other"))
    );
}

fn helper(lab: &Lab, host: &natlab::Host, role: &str) -> Command {
    let mut c = lab.command(host, std::env::current_exe().unwrap());
    c.args(["--exact", "udp_role", "--nocapture", "--test-threads=1"])
        .env("NATLAB_ROLE", role);
    c
}

#[test]
fn routers_translate_as_declared_and_nothing_leaves_the_lab() {
    let Some(mut lab) = Lab::new() else { return };
    let server = lab.public_host();
    let cone = lab.nat_host(NatKind::Cone);
    let sym = lab.nat_host(NatKind::Symmetric);

    let mut r = helper(&lab, &server, "reflect");
    r.stdout(Stdio::piped()).stderr(Stdio::null());
    let ri = lab.spawn("reflector", r);
    let out = lab.child(ri).stdout.take().unwrap();
    let ready = natlab::lines(out, "reflector", false);
    natlab::wait_line(&ready, "reflector ready", Duration::from_secs(10), |l| {
        l.ends_with("ready")
    });

    let other_public = lab.public_host();
    let probe = |host: &natlab::Host| -> (String, String, bool) {
        let out = helper(&lab, host, &format!("probe:{}", server.ip))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // libtest may print "test udp_role ... " on the same line first.
        let line = text
            .lines()
            .find_map(|l| l.find("mapped ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("probe output: {text}"));
        let f: Vec<&str> = line.split(' ').collect();
        (f[1].to_owned(), f[2].to_owned(), f[3] == "other=true")
    };

    // Cone: one mapping for both destinations, with the router's address; the unsolicited
    // answer from the other port is dropped (port-restricted).
    let (a, b, other) = probe(&cone);
    let nat = cone.nat_ip.unwrap().to_string();
    assert!(a.starts_with(&format!("{nat}:")), "cone mapping {a}");
    assert_eq!(a, b, "a cone NAT keeps one mapping");
    assert!(
        !other,
        "a port-restricted NAT drops replies from other ports"
    );

    // Symmetric: a new mapping per destination.
    let (a, b, other) = probe(&sym);
    let nat = sym.nat_ip.unwrap().to_string();
    assert!(a.starts_with(&format!("{nat}:")), "symmetric mapping {a}");
    assert!(b.starts_with(&format!("{nat}:")), "symmetric mapping {b}");
    assert_ne!(a, b, "a symmetric NAT maps each destination anew");
    assert!(!other);

    // A public host reaches the other public host directly.
    let (a, _, other) = probe(&other_public);
    assert!(
        a.starts_with("203.0.113.11:5555"),
        "public host seen as {a}"
    );
    assert!(other, "no NAT, no filtering");

    // No way out: everything off the lab's segments goes to the sink, which routes nowhere.
    let router = natlab::Host {
        ns: cone.router_ns.clone().unwrap(),
        ..cone.clone()
    };
    for host in [&server, &router] {
        let out = lab.output(host, "ip", &["route", "get", "192.0.2.1"]);
        let route = String::from_utf8_lossy(&out.stdout);
        assert!(
            route.contains(&format!("via {}", natlab::SINK)),
            "{} routes off the lab: {route}",
            host.ns
        );
    }
    let sink = natlab::Host {
        ns: lab.sink_ns().to_owned(),
        ip: natlab::SINK,
        nat_ip: None,
        router_ns: None,
    };
    let out = lab.output(&sink, "ip", &["route", "get", "192.0.2.1"]);
    assert!(!out.status.success(), "the sink has a route out");
    let fwd = lab.output(&sink, "sysctl", &["-n", "net.ipv4.ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "0");
}

#[test]
fn dropping_the_lab_removes_its_namespaces_and_processes() {
    let Some(mut lab) = Lab::new() else { return };
    let host = lab.nat_host(NatKind::Cone);
    let mut sleeper = lab.command(&host, "sleep");
    sleeper.arg("300");
    let i = lab.spawn("sleep", sleeper);
    let pid = lab.child(i).id();
    let prefix = host.ns.trim_end_matches("h0").to_owned();
    drop(lab);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left: {list}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still running"
    );
}
