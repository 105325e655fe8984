//! Figures of the HTTP door (a benchmark, not a timed test: it asserts only that media flowed,
//! and prints what it measured). Run it with
//! `cargo test --release --test http_bench -- --ignored --nocapture`.
//!
//! - Glass-to-glass latency by depth: a webrtc-rs WHIP publisher plays the fixture clip (looped)
//!   into node P; viewer nodes V1..V4 hang below it in a chain (one child each), each with its
//!   own HTTP door; a WHEP player at Vk receives the room. The gateway relays frame payloads
//!   unchanged (decrypted for the player, never transcoded), so a frame is recognised by the hash
//!   of its bytes: latency = when the player has the whole frame minus when the publisher wrote
//!   it. Frames repeat with the loop every 3 s; the latest send before the arrival counts.
//! - First frame: from the WHEP `POST` to the player's first whole frame.
//! - CPU per player: this process's CPU time over 10 s with 4 players on V1 against 10 s with
//!   none, per player. Everything runs in this one process, so the figure includes the
//!   players' own receiving (an upper bound for the gateway's share).

mod http_support;
mod support;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_support::{player_offer, post_sdp};
use rtc::rtp::packetizer::Depacketizer;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use support::room::builder;
use tokio::sync::mpsc;
use waterfall::http::{Feed, HttpConfig, HttpServer, Role};
use waterfall::media::peer::{PeerEvent, SdpKind, SignalBlob};
use waterfall::media::{MediaKind, Sinks};
use waterfall::{RoomEvent, WatchConfig, WatchTarget};
use webrtc::media_stream::track_remote::TrackRemoteEvent;

type SendTimes = Arc<Mutex<HashMap<u64, Instant>>>;

fn hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// This process's CPU time (user + system) from /proc, in clock ticks of 10 ms.
fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    n(11) + n(12)
}

/// A WHEP player at `addr` for `secs`: latencies of whole video frames and its first frame.
async fn measure(
    addr: std::net::SocketAddr,
    sends: SendTimes,
    secs: u64,
) -> (Vec<Duration>, Option<Duration>) {
    let (peer, mut events, offer) = player_offer().await;
    let posted = Instant::now();
    let r = post_sdp(addr, "/whep/bench", &[], &offer).await;
    assert_eq!(r.status, 201, "{}", r.text());
    peer.apply_answer(&SignalBlob {
        kind: SdpKind::Answer,
        sdp: r.text(),
    })
    .await
    .expect("answer");
    let (tx, mut rx) = mpsc::channel::<Instant>(4096);
    let mut readers = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut lat = Vec::new();
    let mut first = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            Some(sent) = rx.recv() => {
                let now = Instant::now();
                first.get_or_insert(now - posted);
                lat.push(now - sent);
            }
            ev = events.recv() => match ev {
                Some(PeerEvent::Track(t)) if t.kind().await == RtpCodecKind::Video => {
                    let (tx, sends) = (tx.clone(), Arc::clone(&sends));
                    readers.push(tokio::spawn(async move {
                        let mut d = rtc::rtp::codec::vp8::Vp8Packet::default();
                        let mut frame = BytesMut::new();
                        while let Some(ev) = t.poll().await {
                            let TrackRemoteEvent::OnRtpPacket(p) = ev else { continue };
                            if d.is_partition_head(&p.payload) {
                                frame.clear();
                            }
                            if let Ok(part) = d.depacketize(&p.payload) {
                                frame.extend_from_slice(&part);
                            }
                            if p.header.marker {
                                let done = Instant::now();
                                let sent = sends.lock().unwrap().get(&hash(&frame)).copied();
                                if let Some(s) = sent.filter(|s| *s <= done) {
                                    let _ = tx.try_send(s);
                                }
                                frame.clear();
                            }
                        }
                    }));
                }
                Some(PeerEvent::Track(t)) => {
                    // Audio is not measured, but read: an unread track fills webrtc-rs's queue.
                    readers.push(tokio::spawn(async move { while t.poll().await.is_some() {} }));
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    peer.close().await;
    for r in readers {
        r.abort();
    }
    (lat, first)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn glass_to_glass_first_frame_and_cpu_per_player() {
    let p = builder().max_children(1).spawn().await.expect("root node");
    let http_p = HttpServer::start(p.clone(), HttpConfig::default())
        .await
        .expect("http");
    let mut events = http_p.events();
    // The publisher: the clip looped, each frame's send time kept by its hash.
    let publisher =
        http_support::Publisher::new(&support::fixture("f.ivf"), &support::fixture("f.ogg"), 200)
            .await;
    let sends: SendTimes = Arc::default();
    let r = post_sdp(http_p.local_addr(), "/whip/bench", &[], &publisher.offer).await;
    assert_eq!(r.status, 201, "{}", r.text());
    // The publisher's frames are hashed as it writes them (the same bytes reach the players).
    let stamp = Arc::clone(&sends);
    let pub_task = tokio::spawn(async move {
        publisher
            .play_with(
                &r.text(),
                Duration::from_secs(600),
                move |kind, data: &Bytes| {
                    if kind == MediaKind::Video {
                        stamp.lock().unwrap().insert(hash(data), Instant::now());
                    }
                },
            )
            .await
    });
    loop {
        if let Ok(waterfall::http::GatewayEvent::Publishing { .. }) = events.recv().await {
            break;
        }
    }
    // The chain V1..V4, each a viewer with its own door sharing its membership.
    let boot = p.addrs().await.unwrap();
    let mut doors = Vec::new();
    let mut keep = Vec::new();
    for i in 0..4 {
        let v = builder()
            .bootstrap(boot.clone())
            .max_children(1)
            .spawn()
            .await
            .expect("viewer");
        let http = HttpServer::start(v.clone(), HttpConfig::default())
            .await
            .expect("http");
        let (feed, mut kf) = Feed::new(Vec::new());
        let sinks = Sinks {
            video: Some(feed.sink_target()),
            audio: Some(feed.sink_target()),
            data: None,
        };
        let (watch, mut ev) = v
            .watch(
                WatchTarget::Name("bench".into()),
                WatchConfig::new().sinks(sinks),
            )
            .await
            .expect("watch");
        let report = http
            .board()
            .report("bench", Role::Viewer, None)
            .expect("report");
        report.feed(feed);
        // One deadline for the join, however many other events come meanwhile.
        let joined = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(e) = ev.recv().await {
                if let RoomEvent::Joined { depth, .. } = e {
                    return Some(depth);
                }
            }
            None
        })
        .await;
        match joined {
            Ok(Some(depth)) => eprintln!("viewer {} joined at depth {depth}", i + 1),
            other => {
                // Reported, and the chain measured as far as it got.
                println!("viewer {} did not join within 30 s ({other:?})", i + 1);
                break;
            }
        }
        let watch = Arc::new(watch);
        let w = Arc::clone(&watch);
        keep.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = kf.recv() => w.request_keyframe(),
                    e = ev.recv() => if e.is_none() { break },
                }
            }
        }));
        doors.push((v, http, watch, report));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "| depth of the player's node | frames | latency median (ms) | p90 (ms) | first frame (ms) |"
    );
    println!("|---|---|---|---|---|");
    for (k, (_, http, _, _)) in doors.iter().enumerate() {
        let mut firsts = Vec::new();
        let mut all = Vec::new();
        for _ in 0..2 {
            let (lat, first) = measure(http.local_addr(), Arc::clone(&sends), 8).await;
            all.extend(lat);
            firsts.extend(first);
        }
        assert!(
            all.len() > 100,
            "depth {}: only {} frames",
            k + 1,
            all.len()
        );
        let n = all.len();
        println!(
            "| {} | {n} | {:.0} | {:.0} | {} |",
            k + 1,
            pct(&mut all, 0.5),
            pct(&mut all, 0.9),
            firsts
                .iter()
                .map(|f| format!("{:.0}", f.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // CPU: 10 s idle against 10 s with four players on V1.
    let v1 = doors[0].1.local_addr();
    let t0 = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = cpu_ticks() - t0;
    let t1 = cpu_ticks();
    let players: Vec<_> = (0..4)
        .map(|_| tokio::spawn(measure(v1, Arc::clone(&sends), 10)))
        .collect();
    for p in players {
        p.await.unwrap();
    }
    let busy = cpu_ticks() - t1;
    println!(
        "CPU of this process over 10 s: {} ms without players, {} ms with 4 players on V1: {:.1}% of a core per player (gateway + player)",
        idle * 10,
        busy * 10,
        (busy.saturating_sub(idle)) as f64 * 10.0 / 4.0 / 10_000.0 * 100.0
    );
    pub_task.abort();
}
