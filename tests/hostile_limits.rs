//! A connection flood from one IP address: a host opens over a thousand TCP connections to a
//! node and never completes the handshake, reopening each one the node closes. The node must
//! go on serving: a viewer from another address looks its room up with the ticket.
//!
//! Before issue 16 the flood took all 1,024 pending-connection slots (no per-IP limit) and the
//! viewer's connection was refused. The attacker uses 127.0.0.2 (loopback, like every address
//! in these tests): the whole 127.0.0.0/8 reaches the node on `lo`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use support::room::{builder, clip};
use tokio::net::{TcpSocket, TcpStream};
use waterfall::RoomConfig;

/// Connections the attacker keeps open at once.
const FLOOD: usize = 1_100;

/// Keep `FLOOD` raw TCP connections from 127.0.0.2 open to `target` until `stop`; returns how
/// many connections were opened in all.
async fn flood(target: SocketAddr, stop: Arc<AtomicBool>, open_now: Arc<AtomicUsize>) -> usize {
    let mut open: Vec<TcpStream> = Vec::new();
    let mut opened = 0;
    // Bounded: the test stops it, and it gives up by itself after a minute.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        while open.len() < FLOOD {
            let sock = TcpSocket::new_v4().expect("socket");
            sock.bind("127.0.0.2:0".parse().unwrap())
                .expect("bind 127.0.0.2");
            match tokio::time::timeout(Duration::from_secs(1), sock.connect(target)).await {
                Ok(Ok(s)) => {
                    open.push(s);
                    opened += 1;
                }
                _ => break,
            }
        }
        // Drop what the node closed; reopen on the next round.
        let mut buf = [0u8; 256];
        open.retain(|s| match s.try_read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        open_now.store(open.len(), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_address_leaves_the_node_serving() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let host = builder().spawn().await.expect("host starts");
        let (room, _events) = host
            .broadcast(
                RoomConfig::new("flooded")
                    .password("pw")
                    .source(clip("f.ivf", Some(1000)).await),
            )
            .await
            .expect("broadcast starts");
        let ticket = room.ticket().clone();
        let keys = room.keys().clone();
        let tcp = host
            .net()
            .listen_addrs()
            .await
            .unwrap()
            .into_iter()
            .find_map(|a| {
                let mut ip = None;
                let mut port = None;
                for p in a.iter() {
                    match p {
                        Protocol::Ip4(i) => ip = Some(i),
                        Protocol::Tcp(t) => port = Some(t),
                        _ => {}
                    }
                }
                Some(SocketAddr::from((ip?, port?)))
            })
            .expect("a tcp listener");

        let stop = Arc::new(AtomicBool::new(false));
        let open_now = Arc::new(AtomicUsize::new(0));
        let attack = tokio::spawn(flood(tcp, stop.clone(), open_now.clone()));
        // Let the flood take every slot it can.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let viewer = builder().spawn().await.expect("viewer starts");
        let t0 = std::time::Instant::now();
        let found = tokio::time::timeout(
            Duration::from_secs(20),
            viewer.lookup_room(&keys, Some(&ticket)),
        )
        .await;
        let elapsed = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let opened = attack.await.expect("flood task");
        eprintln!(
            "flood: {opened} connections opened from 127.0.0.2, {} open at the end; lookup \
             took {elapsed:?}",
            open_now.load(Ordering::Relaxed)
        );
        let rec = found
            .expect("the viewer's lookup hung under the flood")
            .expect("the viewer could not look the room up under the flood");
        assert_eq!(rec.broadcaster, host.identity().node_id());
        drop(room);
        viewer.shutdown().await;
        host.shutdown().await;
    })
    .await
    .expect("test timed out");
}
