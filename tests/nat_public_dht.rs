//! `--public` without the public internet: two waterfall nodes that share only a "public DHT"
//! node find the room by name and password through provider records.
//!
//! The DHT node is not a waterfall node: a bare libp2p Kademlia server on `/ipfs/kad/1.0.0`
//! (plus identify and an AutoNAT v2 server, as Amino nodes run), with no waterfall protocol at
//! all, so the broadcaster and the viewer have no waterfall DHT in common; its routing table
//! stays empty, so no lookup hands one of them the other as a peer. It stores and prints
//! every provider record it receives, which lets the test check what Amino servers require:
//! sha2-256 multihash keys and records that carry the provider's addresses.
//!
//! Everything runs in lab namespaces (see `natlab`) whose only way out is the sink: `--public`
//! with an explicit `--bootstrap` never dials the real bootstrap peers, and even if it did,
//! nothing could leave. This test binary runs the DHT node by re-running itself with
//! `NATLAB_ROLE=kad` and only [`public_dht_role`] selected.

mod natlab;

use std::time::Duration;

use natlab::{Lab, fixture, frames, listen_all, wait_line};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Not a test of its own: the body of the DHT node process (does nothing without
/// `NATLAB_ROLE=kad`).
#[test]
fn public_dht_role() {
    if std::env::var("NATLAB_ROLE").as_deref() == Ok("kad") {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(kad_node());
    }
}

#[derive(libp2p::swarm::NetworkBehaviour)]
struct DhtNode {
    identify: libp2p::identify::Behaviour,
    kad: libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore>,
    autonat: libp2p::autonat::v2::server::Behaviour,
}

/// A Kademlia server on `/ipfs/kad/1.0.0`, port 4001, for 3 minutes at most. Prints
/// `peer <id>` once listening and `provider <key hex> <peer> <addrs,...>` per stored record.
async fn kad_node() {
    use futures::StreamExt;
    use libp2p::{StreamProtocol, identify, kad, noise, swarm::SwarmEvent, tcp, yamux};
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_quic()
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let mut cfg = kad::Config::new(StreamProtocol::new("/ipfs/kad/1.0.0"));
            // Inserts come to us, so we can print them (and then store them).
            cfg.set_record_filtering(kad::StoreInserts::FilterBoth);
            // An empty routing table: lookups never hand one waterfall node the other as a
            // "closest peer", so provider records are the only way they can meet.
            cfg.set_kbucket_inserts(kad::BucketInserts::Manual);
            let mut kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), cfg);
            kad.set_mode(Some(kad::Mode::Server));
            DhtNode {
                identify: identify::Behaviour::new(identify::Config::new(
                    "ipfs/0.1.0".into(),
                    key.public(),
                )),
                kad,
                autonat: Default::default(),
            }
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm
        .listen_on("/ip4/0.0.0.0/tcp/4001".parse().unwrap())
        .unwrap();
    swarm
        .listen_on("/ip4/0.0.0.0/udp/4001/quic-v1".parse().unwrap())
        .unwrap();
    println!("\npeer {}", swarm.local_peer_id());
    let end = tokio::time::sleep(Duration::from_secs(180));
    tokio::pin!(end);
    loop {
        tokio::select! {
            _ = &mut end => break,
            ev = swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(DhtNodeEvent::Kad(kad::Event::InboundRequest {
                    request: kad::InboundRequest::AddProvider { record: Some(r) },
                })) = ev
                {
                    let addrs: Vec<String> = r.addresses.iter().map(|a| a.to_string()).collect();
                    println!(
                        "\nprovider {} {} {}",
                        hex::encode(r.key.as_ref()),
                        r.provider,
                        addrs.join(",")
                    );
                    let _ = kad::store::RecordStore::add_provider(
                        swarm.behaviour_mut().kad.store_mut(),
                        r,
                    );
                }
            }
        }
    }
}

#[test]
fn two_nodes_sharing_only_a_public_dht_node_find_the_room_by_name() {
    let Some(mut lab) = Lab::new() else { return };
    let dht = lab.public_host();
    let Some(turn) = lab.turn_server(&dht) else {
        return;
    };
    let a = lab.public_host();
    let b = lab.public_host();

    let mut k = lab.command(&dht, std::env::current_exe().unwrap());
    k.args([
        "--exact",
        "public_dht_role",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("NATLAB_ROLE", "kad")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let ki = lab.spawn("dht", k);
    let kout = natlab::lines(lab.child(ki).stdout.take().unwrap(), "dht", true);
    let id = wait_line(&kout, "the DHT node's id", Duration::from_secs(30), |l| {
        l.starts_with("peer ")
    })["peer ".len()..]
        .to_owned();
    let ip = dht.ip;
    // An explicit STUN server too: `--public` alone would add public ones.
    let mut net = args(&[
        "--public",
        "--stun",
        &turn.stun_url,
        "--bootstrap",
        &format!("/ip4/{ip}/tcp/4001/p2p/{id}"),
        "--bootstrap",
        &format!("/ip4/{ip}/udp/4001/quic-v1/p2p/{id}"),
    ]);
    net.extend(listen_all(0));
    let pw = lab.path("pw.txt");
    std::fs::write(&pw, "public-secret\n").unwrap();
    let pw = pw.to_string_lossy().into_owned();

    let mut bargs = args(&["broadcast", "--room", "amino-room", "--password-file", &pw]);
    bargs.extend(args(&["--loop", "--json", "--video"]));
    bargs.push(fixture("f.ivf").to_string_lossy().into_owned());
    bargs.extend(net.iter().cloned());
    let bc = lab.waterfall(&a, "bcast", &bargs, &[]);
    wait_line(&bc.out, "the ticket", Duration::from_secs(90), |l| {
        l.starts_with("wf1")
    });
    // The DHT node holds the room's provider record under a sha2-256 multihash, with an
    // address the viewer can dial (AutoNAT confirmed the broadcaster's before it announced).
    let provider = wait_line(
        &kout,
        "a provider record with addresses",
        Duration::from_secs(60),
        |l| l.starts_with("provider ") && l.split(' ').nth(3).is_some_and(|a| !a.is_empty()),
    );
    let f: Vec<&str> = provider.split(' ').collect();
    assert!(
        f[1].starts_with("1220") && f[1].len() == 68,
        "key is a sha2-256 multihash: {}",
        f[1]
    );
    assert!(
        f[3].contains(&format!("/ip4/{}/", a.ip)),
        "addresses {}",
        f[3]
    );

    // The viewer knows only the room's name and password, and the DHT node.
    let viewer_id = lab.peer_id(&lab.path("viewer"));
    let video = lab.path("viewer.ivf");
    let mut vargs = args(&["watch", "--room", "amino-room", "--password-file", &pw]);
    vargs.extend(args(&["--json", "--video", &video.to_string_lossy()]));
    vargs.extend(net);
    let v = lab.waterfall(&b, "viewer", &vargs, &[]);
    wait_line(&v.out, "viewer joined", Duration::from_secs(90), |l| {
        l.contains("\"joined\"")
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while frames(&video) < 60 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} frames arrived",
            frames(&video)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    natlab::ffmpeg_decodes(&video);

    // Only what a lookup asks for is provided: the viewer announces the well-known key of
    // waterfall nodes and nothing of the room (lookups by name ask for the broadcaster's key).
    let nodes_key = "122002da25b88ef89e864632ebfe7282c88e11379e1a59f71ab9055dda0c5efae02f";
    let from_viewer =
        |l: &str| l.starts_with("provider ") && l.split(' ').nth(2) == Some(viewer_id.as_str());
    let seen = std::cell::RefCell::new(Vec::new());
    let first = wait_line(
        &kout,
        "the viewer's announcement of the nodes key",
        Duration::from_secs(60),
        |l| {
            seen.borrow_mut().push(l.to_owned());
            from_viewer(l) && l.split(' ').nth(1) == Some(nodes_key)
        },
    );
    let mut seen = seen.into_inner();
    eprintln!("viewer provided {first}");
    // Its announcements come together (all due at once): a room key would be here by now.
    std::thread::sleep(Duration::from_secs(5));
    seen.extend(kout.try_iter());
    let others: Vec<&String> = seen
        .iter()
        .filter(|l| from_viewer(l) && l.split(' ').nth(1) != Some(nodes_key))
        .collect();
    assert!(
        others.is_empty(),
        "the viewer provided room keys: {others:?}"
    );
}
