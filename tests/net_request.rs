//! Request-response `/waterfall/req/1.0.0` over real swarms on loopback.

mod net_support;
mod support;

use std::time::Duration;

use net_support::Node;
use support::wait_for;
use waterfall::net::{NetError, NetEvent};

/// Serve requests of `node`: answer with the request reversed, ignore requests starting with
/// `silent`.
fn serve(node: Node) -> waterfall::net::Net {
    let Node {
        net, mut events, ..
    } = node;
    let handle = net.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let NetEvent::Request { data, reply, .. } = ev {
                if data.starts_with(b"silent") {
                    continue; // the handle is dropped unanswered
                }
                let mut resp = data;
                resp.reverse();
                let _ = handle.respond(reply, resp).await;
            }
        }
    });
    net
}

#[tokio::test]
async fn request_response_round_trip_and_oversized_requests() {
    tokio::time::timeout(Duration::from_secs(60), async {
        // `a` allows itself large requests; `b` keeps the default limit (256 KiB).
        let a = Node::spawn_with(|c| c.max_request_bytes = 1 << 20).await;
        let b = Node::spawn().await;
        let c = Node::spawn().await;
        let (a_id, b_id) = (a.peer_id(), b.peer_id());
        let b_addr = b.addr().await;
        let b_net = serve(b);
        a.net.dial(b_addr.clone()).await.unwrap();
        c.net.dial(b_addr).await.unwrap();

        let t = Duration::from_secs(10);
        assert_eq!(
            a.net.request(b_id, b"ping".to_vec(), t).await.unwrap(),
            b"gnip"
        );
        // A large response (a tree snapshot) within the response limit.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut want = big.clone();
        want.reverse();
        assert_eq!(a.net.request(b_id, big, t).await.unwrap(), want);

        // Dropped unanswered: the slot is freed at once and the requester learns it at once
        // (not at its timeout); nothing breaks.
        let t0 = std::time::Instant::now();
        let r = a
            .net
            .request(b_id, b"silent".to_vec(), Duration::from_secs(5))
            .await;
        assert!(matches!(r, Err(NetError::Request(_))), "got {r:?}");
        assert!(t0.elapsed() < Duration::from_secs(4));

        // Oversized requests fail at the sender and earn strikes at the receiver.
        for _ in 0..3 {
            let r = a.net.request(b_id, vec![1; 300 * 1024], t).await;
            assert!(r.is_err(), "oversized request must fail, got {r:?}");
        }
        assert!(
            wait_for(Duration::from_secs(10), || async {
                !b_net.connected_peers().await.unwrap().contains(&a_id)
            })
            .await,
            "peer sending oversized requests still connected"
        );
        // Locally, requests over the own limit are refused before sending.
        assert!(matches!(
            c.net.request(b_id, vec![1; 300 * 1024], t).await,
            Err(NetError::TooLarge { .. })
        ));
        // b keeps serving c.
        assert_eq!(
            c.net.request(b_id, b"abc".to_vec(), t).await.unwrap(),
            b"cba"
        );
        // b leaves: requests fail cleanly instead of hanging.
        b_net.shutdown().await;
        assert!(c.net.request(b_id, b"abc".to_vec(), t).await.is_err());
        assert!(c.net.status().await.is_ok());
    })
    .await
    .expect("test timed out");
}
