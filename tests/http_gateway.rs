//! The node's HTTP door on loopback: WHIP/WHEP conformance (status codes, `Location`,
//! `DELETE`, content type, bad SDP, unknown room, token), a WHEP player (webrtc-rs) that
//! receives a room through a viewer node and shares its membership with a second player, and a
//! WHIP publisher (webrtc-rs, the fixture clip) whose broadcast reaches CLI viewers two hops
//! down the tree, whose recordings decode.

mod http_support;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use http_support::{Publisher, play, player_offer, post_sdp, request};
use support::room::{builder, clip};
use support::{ffmpeg_ok, fixture, frames, wait_for};
use tokio::time::timeout;
use waterfall::http::{GatewayEvent, HttpConfig, HttpError, HttpServer};
use waterfall::media::peer::IceServer;
use waterfall::{KdfParams, RoomConfig};

async fn gateway(node: &waterfall::Node, cfg: HttpConfig) -> HttpServer {
    HttpServer::start(node.clone(), cfg)
        .await
        .expect("HTTP server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_whep_conformance() {
    timeout(Duration::from_secs(120), async {
        let node = builder().spawn().await.expect("node starts");
        // Beyond loopback without a token: refused before anything is bound.
        let open = HttpServer::start(
            node.clone(),
            HttpConfig {
                addr: Some(SocketAddr::from(([0, 0, 0, 0], 0))),
                ..Default::default()
            },
        )
        .await;
        assert!(matches!(open, Err(HttpError::TokenRequired(_))), "{open:?}");

        let http = gateway(
            &node,
            HttpConfig {
                token: Some("s3cret".into()),
                ice_servers: vec![IceServer::stun("stun:127.0.0.1:3478")],
                ..Default::default()
            },
        )
        .await;
        let a = http.local_addr();
        assert!(a.ip().is_loopback());
        let auth = ("Authorization", "Bearer s3cret");

        // The page needs no token; it is the compiled-in page.
        let page = request(a, "GET", "/", &[], b"").await;
        assert_eq!(page.status, 200);
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html")
        );
        assert!(page.text().contains("<svg"));

        // Token: missing or wrong -> 401 with a Bearer challenge; right -> 200.
        for h in [vec![], vec![("Authorization", "Bearer nope")]] {
            let r = request(a, "GET", "/api/status", &h, b"").await;
            assert_eq!(r.status, 401, "{h:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
        let r = post_sdp(a, "/whep/anything", &[], "v=0\r\n").await;
        assert_eq!(r.status, 401, "WHEP without the token");
        let st = request(a, "GET", "/api/status", &[auth], b"").await;
        assert_eq!(st.status, 200);
        let j: serde_json::Value = serde_json::from_slice(&st.body).unwrap();
        assert_eq!(j["peer_id"], node.peer_id().to_string());
        assert_eq!(j["rooms"].as_array().unwrap().len(), 0);
        let m = request(a, "GET", "/metrics", &[auth], b"").await;
        assert_eq!(m.status, 200);
        assert!(m.text().contains("waterfall_rooms 0"), "{}", m.text());
        assert!(m.text().contains("waterfall_peers"));

        // Wrong content type -> 415.
        let (_p, _ev, offer) = player_offer().await;
        let r = request(
            a,
            "POST",
            "/whep/standup",
            &[auth, ("Content-Type", "text/plain")],
            offer.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 415);
        // An SDP that does not parse -> 400, before any room is looked up.
        let r = post_sdp(a, "/whep/standup", &[auth], "hello, I am not an SDP").await;
        assert_eq!(r.status, 400);
        let r = post_sdp(a, "/whip/standup", &[auth], "v=0\r\nnonsense").await;
        assert_eq!(r.status, 400);
        // A WHIP offer that sends nothing (a player's) -> 400.
        let r = post_sdp(a, "/whip/standup", &[auth], &offer).await;
        assert_eq!(r.status, 400, "{}", r.text());
        // A room nobody broadcasts -> 404.
        let r = post_sdp(a, "/whep/nobody-here", &[auth], &offer).await;
        assert_eq!(r.status, 404, "{}", r.text());
        // Trickle is not supported -> 405; unknown sessions -> 404.
        let r = request(a, "PATCH", "/whep/standup/abc", &[auth], b"").await;
        assert_eq!(r.status, 405);
        let r = request(a, "DELETE", "/whep/standup/abc", &[auth], b"").await;
        assert_eq!(r.status, 404);
        // ICE servers as Link headers.
        let r = request(a, "OPTIONS", "/whip/standup", &[auth], b"").await;
        assert_eq!(r.status, 204);
        assert_eq!(
            r.headers("link"),
            vec!["<stun:127.0.0.1:3478>; rel=\"ice-server\""]
        );
        http.shutdown().await;
        node.shutdown().await;
    })
    .await
    .expect("conformance within 120 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whep_players_share_one_membership_and_receive_the_room() {
    timeout(Duration::from_secs(180), async {
        let dir = tempfile::tempdir().unwrap();
        let b = builder().spawn().await.expect("broadcaster starts");
        let cfg = RoomConfig::new("standup")
            .password("pw")
            .source(clip("f.ivf", Some(5)).await)
            .source(clip("f.ogg", Some(5)).await);
        let (room, _bev) = b.broadcast(cfg).await.expect("broadcast");
        let boot = b.addrs().await.unwrap();
        let v = builder()
            .bootstrap(boot)
            .spawn()
            .await
            .expect("viewer node");
        let http = gateway(&v, HttpConfig::default()).await;
        let a = http.local_addr();

        // The password travels in a header, never in the URL.
        let pw = ("Waterfall-Room-Password", "pw");
        let (p1, ev1, offer1) = player_offer().await;
        let r1 = post_sdp(a, "/whep/standup", &[pw], &offer1).await;
        assert_eq!(r1.status, 201, "{}", r1.text());
        assert_eq!(r1.header("content-type"), Some("application/sdp"));
        let loc1 = r1.header("location").expect("Location").to_owned();
        assert!(loc1.starts_with("/whep/standup/"), "{loc1}");
        let (p2, ev2, offer2) = player_offer().await;
        let r2 = post_sdp(a, "/whep/standup", &[pw], &offer2).await;
        assert_eq!(r2.status, 201, "{}", r2.text());
        let loc2 = r2.header("location").unwrap().to_owned();
        assert_ne!(loc1, loc2);

        let (v1, a1) = (dir.path().join("p1.ivf"), dir.path().join("p1.ogg"));
        let (v2, a2) = (dir.path().join("p2.ivf"), dir.path().join("p2.ogg"));
        let t1 = tokio::spawn({
            let (v1, a1, sdp) = (v1.clone(), a1.clone(), r1.text());
            async move { play(p1, ev1, &sdp, &v1, &a1, 8).await }
        });
        let t2 = tokio::spawn({
            let (v2, a2, sdp) = (v2.clone(), a2.clone(), r2.text());
            async move { play(p2, ev2, &sdp, &v2, &a2, 8).await }
        });
        // One membership, two players.
        let shared = wait_for(Duration::from_secs(8), || async {
            let st = request(a, "GET", "/api/status", &[], b"").await;
            let j: serde_json::Value = serde_json::from_slice(&st.body).unwrap();
            let rooms = j["rooms"].as_array().unwrap().clone();
            rooms.len() == 1 && rooms[0]["players"] == 2 && rooms[0]["depth"] == 1
        })
        .await;
        assert!(shared, "both players on one membership at depth 1");
        let (g1, g2) = (t1.await.unwrap(), t2.await.unwrap());
        for (g, v, a) in [(g1, &v1, &a1), (g2, &v2, &a2)] {
            assert!(g.video_packets > 50 && g.audio_packets > 100, "{g:?}");
            assert!(frames(v) >= 90, "{}: {} frames", v.display(), frames(v));
            ffmpeg_ok(v);
            ffmpeg_ok(a);
        }
        for loc in [&loc1, &loc2] {
            assert_eq!(request(a, "DELETE", loc, &[], b"").await.status, 200);
            assert_eq!(request(a, "DELETE", loc, &[], b"").await.status, 404);
        }
        let m = request(a, "GET", "/metrics", &[], b"").await.text();
        assert!(m.contains("waterfall_whep_players 0"), "{m}");
        assert!(
            m.contains("waterfall_room_video_frames_total{room=\"standup\",role=\"viewer\"}"),
            "{m}"
        );
        drop(room);
        http.shutdown().await;
        v.shutdown().await;
        b.shutdown().await;
    })
    .await
    .expect("WHEP within 180 s");
}

/// `waterfall watch TICKET` recording to `prefix`.ivf/.ogg, on loopback, for `secs` seconds.
fn cli_viewer(dir: &Path, name: &str, ticket: &str, secs: u64) -> std::process::Child {
    let pw = dir.join("pw.txt");
    std::fs::write(&pw, "hunter2\n").unwrap();
    Command::new(env!("CARGO_BIN_EXE_waterfall"))
        .args(["watch", ticket, "--password-file"])
        .arg(&pw)
        .args([
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--udp-bind",
            "127.0.0.1",
        ])
        .args(["--no-http", "--duration", &secs.to_string(), "--data-dir"])
        .arg(dir.join(format!("{name}-data")))
        .arg("--video")
        .arg(dir.join(format!("{name}.ivf")))
        .arg("--audio")
        .arg(dir.join(format!("{name}.ogg")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("waterfall watch starts")
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whip_publisher_reaches_cli_viewers_two_hops_down() {
    timeout(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        // The CLI derives room keys with the strong KDF: the node must too. One child at the
        // root puts the second viewer two hops down.
        let p = builder()
            .kdf(KdfParams::STRONG)
            .max_children(1)
            .spawn()
            .await
            .expect("node starts");
        let http = gateway(
            &p,
            HttpConfig {
                password: Some("hunter2".into()),
                ..Default::default()
            },
        )
        .await;
        let a = http.local_addr();
        let mut events = http.events();
        let publisher = Publisher::new(&fixture("f.ivf"), &fixture("f.ogg"), 6).await;
        let r = post_sdp(a, "/whip/live", &[], &publisher.offer).await;
        assert_eq!(r.status, 201, "{}", r.text());
        let loc = r.header("location").expect("Location").to_owned();
        assert!(loc.starts_with("/whip/live/"));
        // A second publisher for the same room is refused.
        let second = Publisher::new(&fixture("f.ivf"), &fixture("f.ogg"), 0).await;
        let r2 = post_sdp(a, "/whip/live", &[], &second.offer).await;
        assert_eq!(r2.status, 409, "{}", r2.text());
        let pub_task = tokio::spawn({
            let answer = r.text();
            async move { publisher.play(&answer, Duration::from_secs(25)).await }
        });
        let ticket = loop {
            match timeout(Duration::from_secs(30), events.recv()).await {
                Ok(Ok(GatewayEvent::Publishing { room, ticket })) if room == "live" => {
                    break ticket.to_string();
                }
                Ok(Ok(GatewayEvent::PublishEnded { why, .. })) => panic!("publish ended: {why}"),
                Ok(_) => {}
                Err(_) => panic!("no broadcast from the WHIP publisher within 30 s"),
            }
        };
        let _v1 = Kill(cli_viewer(dir.path(), "v1", &ticket, 16));
        let joined = wait_for(Duration::from_secs(30), || async {
            let st = request(a, "GET", "/api/status", &[], b"").await;
            let j: serde_json::Value = serde_json::from_slice(&st.body).unwrap();
            j["rooms"][0]["children"]
                .as_array()
                .is_some_and(|c| c.len() == 1)
        })
        .await;
        assert!(joined, "the first CLI viewer is the root's child");
        let v2 = cli_viewer(dir.path(), "v2", &ticket, 12);
        let mut v2 = Kill(v2);
        // A player on the publishing node itself reads the publisher's frames.
        let (pp, pev, poffer) = player_offer().await;
        let r3 = post_sdp(a, "/whep/live", &[], &poffer).await;
        assert_eq!(r3.status, 201, "{}", r3.text());
        let local = play(
            pp,
            pev,
            &r3.text(),
            &dir.path().join("local.ivf"),
            &dir.path().join("local.ogg"),
            6,
        )
        .await;
        assert!(local.video_packets > 30, "local WHEP player: {local:?}");
        let status = tokio::task::spawn_blocking(move || v2.0.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "viewer 2 exits 0: {status:?}");
        for v in ["v1", "v2"] {
            let (ivf, ogg) = (
                dir.path().join(format!("{v}.ivf")),
                dir.path().join(format!("{v}.ogg")),
            );
            assert!(frames(&ivf) >= 90, "{v}: {} video frames", frames(&ivf));
            assert!(frames(&ogg) >= 150, "{v}: {} audio frames", frames(&ogg));
            ffmpeg_ok(&ivf);
            ffmpeg_ok(&ogg);
        }
        // DELETE ends the broadcast.
        assert_eq!(request(a, "DELETE", &loc, &[], b"").await.status, 200);
        let ended = timeout(Duration::from_secs(15), async {
            loop {
                if let Ok(GatewayEvent::PublishEnded { room, .. }) = events.recv().await
                    && room == "live"
                {
                    return;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the WHIP session ends on DELETE");
        pub_task.abort();
        http.shutdown().await;
        p.shutdown().await;
    })
    .await
    .expect("WHIP within 240 s");
}
