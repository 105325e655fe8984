//! A broadcaster behind a NAT whose addresses change after its broadcast started: the room
//! record and the ticket follow at once, not at the next periodic refresh.
//!
//! The broadcaster starts alone behind a cone NAT (its ticket can carry only its private
//! address), then dials a public relay that is *not* one of its bootstrap peers: it must find
//! the relay among its connected peers (identify lists the hop protocol), reserve a slot, and,
//! now reachable through it, republish the room record and announce the new ticket
//! ([`waterfall::RoomEvent::TicketChanged`]). A second node behind another NAT, which knows
//! only the relay and the room's name and password, must then find a record that leads
//! through the relay, well before the record's periodic refresh ([`waterfall::node::ROOM_REFRESH`]).
//!
//! Both lab nodes are library nodes in child processes (this binary re-run with
//! `NATLAB_ROLE`, as in `nat_lab.rs`); the relay is `waterfall node --relay`.

mod natlab;

use std::time::{Duration, Instant};

use natlab::{Lab, NatKind, listen_all, wait_line};
use waterfall::{FileSource, KdfParams, Node, RoomConfig, RoomEvent, SourceOptions};

const ROOM: &str = "moving-room";
const PASSWORD: &str = "moving-secret";

fn listen() -> Vec<libp2p::Multiaddr> {
    vec![
        "/ip4/0.0.0.0/tcp/0".parse().unwrap(),
        "/ip4/0.0.0.0/udp/0/quic-v1".parse().unwrap(),
    ]
}

/// Not a test of its own: the body of the lab's library nodes (does nothing without
/// `NATLAB_ROLE`).
#[test]
fn addrs_role() {
    let Ok(role) = std::env::var("NATLAB_ROLE") else {
        return;
    };
    let relay: libp2p::Multiaddr = std::env::var("NATLAB_RELAY").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match role.as_str() {
        "broadcaster" => rt.block_on(broadcaster(relay)),
        "finder" => rt.block_on(finder(relay)),
        other => panic!("unknown role {other}"),
    }
}

/// Broadcast with no peer at all, print the ticket, then dial the relay and print every new
/// ticket, for 90 s at most.
async fn broadcaster(relay: libp2p::Multiaddr) {
    let node = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .listen(listen())
        .spawn()
        .await
        .unwrap();
    let src = FileSource::open(
        natlab::fixture("f.ivf"),
        SourceOptions {
            loops: Some(1000),
            ..SourceOptions::default()
        },
    )
    .await
    .unwrap();
    let (bc, mut events) = node
        .broadcast(
            RoomConfig::new(ROOM)
                .password(PASSWORD)
                .source(Box::new(src))
                .autostart(false),
        )
        .await
        .unwrap();
    println!("\nticket {}", bc.ticket());
    node.dial(relay).await.unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(90);
    while let Ok(Some(ev)) = tokio::time::timeout_at(end, events.recv()).await {
        if let RoomEvent::TicketChanged(t) = ev {
            println!("\nchanged {t}");
        }
    }
    drop(bc);
}

/// Look the room up by name through the relay (a DHT server) until a record leads through a
/// relay; print each record's addresses, for 60 s at most.
async fn finder(relay: libp2p::Multiaddr) {
    let node = Node::builder()
        .kdf(KdfParams::TEST_ONLY)
        .listen(listen())
        .bootstrap(vec![relay])
        .spawn()
        .await
        .unwrap();
    let keys = node.room_keys(ROOM, Some(PASSWORD)).await.unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        match node.lookup_room(&keys, None).await {
            Ok(rec) => {
                println!("\nrecord {}", rec.addrs.join(","));
                if rec.addrs.iter().any(|a| a.contains("/p2p-circuit")) {
                    return;
                }
            }
            Err(e) => println!("\nlookup {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn role(
    lab: &mut Lab,
    host: &natlab::Host,
    role: &str,
    relay: &str,
) -> std::sync::mpsc::Receiver<String> {
    let mut c = lab.command(host, std::env::current_exe().unwrap());
    c.args(["--exact", "addrs_role", "--nocapture", "--test-threads=1"])
        .env("NATLAB_ROLE", role)
        .env("NATLAB_RELAY", relay)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let i = lab.spawn(role, c);
    natlab::lines(lab.child(i).stdout.take().unwrap(), role, true)
}

#[test]
fn a_broadcaster_that_gains_a_relay_republishes_its_record_and_ticket() {
    let Some(mut lab) = Lab::new() else { return };
    let public = lab.public_host();
    let dir = lab.path("relay");
    let id = lab.peer_id(&dir);
    let mut a = vec!["node".to_owned(), "--relay".to_owned()];
    a.extend(listen_all(4001));
    let r = lab.waterfall(&public, "relay", &a, &[]);
    wait_line(&r.err, "relay listening", Duration::from_secs(30), |l| {
        l.starts_with("listening:")
    });
    let relay = format!("/ip4/{}/tcp/4001/p2p/{id}", public.ip);

    let home = lab.nat_host(NatKind::Cone);
    let bout = role(&mut lab, &home, "broadcaster", &relay);
    let first = wait_line(&bout, "the first ticket", Duration::from_secs(60), |l| {
        l.starts_with("ticket ")
    });
    let t0: waterfall::wire::Ticket = first["ticket ".len()..].parse().unwrap();
    assert!(
        t0.addrs.iter().all(|a| !a.contains("/p2p-circuit")),
        "no relay yet: {:?}",
        t0.addrs
    );
    let started = Instant::now();
    let changed = wait_line(
        &bout,
        "a new ticket through the relay",
        Duration::from_secs(30),
        |l| {
            l.strip_prefix("changed ")
                .and_then(|t| t.parse::<waterfall::wire::Ticket>().ok())
                .is_some_and(|t| t.addrs.iter().any(|a| a.contains("/p2p-circuit")))
        },
    );
    let t1: waterfall::wire::Ticket = changed["changed ".len()..].parse().unwrap();
    assert!(
        t1.addrs[0].contains(&format!("/p2p/{id}/p2p-circuit")),
        "the new ticket leads through the relay first: {:?}",
        t1.addrs
    );
    eprintln!("new ticket after {:?}", started.elapsed());

    // Someone who knows only the relay and the room finds the new record, long before the
    // periodic refresh would have carried the relayed address.
    let other = lab.nat_host(NatKind::Cone);
    let fout = role(&mut lab, &other, "finder", &relay);
    wait_line(
        &fout,
        "a record leading through the relay",
        waterfall::node::ROOM_REFRESH / 2,
        |l| l.starts_with("record ") && l.contains("/p2p-circuit"),
    );
    eprintln!("record found {:?} after the change", started.elapsed());
}
