//! The gossip way: one rust-libp2p gossipsub swarm per node (TCP + noise + yamux, strict
//! signing), the source publishing every probe on one topic.
//!
//! `waterfall::net::Net` hard-wires its own small-room mesh, so this module builds plain swarms
//! to run gossipsub with its default parameters and with small-mesh ones. Two hooks measure what
//! the behaviour hides:
//! * a byte counter around every TCP stream (below noise), so upload and download per node are
//!   the real bytes on the sockets, control traffic (IHAVE/IWANT/IDONTWANT, grafts, heartbeats)
//!   included;
//! * the message-id function, which gossipsub calls once per received copy *before* it drops
//!   duplicates: counting its calls per node gives the copies received, duplicates included.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, StreamExt};
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, MessageId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, Transport, identity::Keypair};
use tokio::sync::{mpsc, watch};

use super::{
    DRAIN, ProcFigures, Recv, RunResult, SETTLE, ViewerOutcome, analyse, cpu_seconds, lo_bytes,
    now_us, parse_probe, peak_rss_mb, spawn_pacer,
};

/// Which gossipsub parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mesh {
    /// `gossipsub::Config::default()`: D = 6 (5..12), D_lazy = 6, flood publishing on.
    Default,
    /// D = 3 (2..4), D_lazy = 3, outbound min 1, flood publishing off.
    Small,
}

/// Peers each new node dials (random earlier nodes; the source is node 0).
const DIALS: usize = 6;

/// Byte counters of one node's TCP streams.
#[derive(Default)]
struct Bytes {
    rx: AtomicU64,
    tx: AtomicU64,
}

struct Counted<S> {
    inner: S,
    bytes: Arc<Bytes>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.bytes.rx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.bytes.tx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// The measurement window, shared with every node's message-id function.
struct Window {
    start: AtomicU64,
    end: AtomicU64,
}

struct GossipNode {
    addr: Multiaddr,
    bytes: Arc<Bytes>,
    copies: Arc<AtomicU64>,
    recv: Recv,
    join_us: u64,
    publish_errors: Arc<AtomicU64>,
}

fn config(
    mesh: Mesh,
    copies: Arc<AtomicU64>,
    window: Arc<Window>,
) -> anyhow::Result<gossipsub::Config> {
    let mut b = gossipsub::ConfigBuilder::default();
    b.max_transmit_size(64 * 1024)
        .message_id_fn(move |m: &gossipsub::Message| {
            let (seq, _) = parse_probe(&m.data).unwrap_or((u64::MAX, 0));
            if seq >= window.start.load(Ordering::Relaxed)
                && seq < window.end.load(Ordering::Relaxed)
            {
                copies.fetch_add(1, Ordering::Relaxed);
            }
            MessageId::from(seq.to_be_bytes().to_vec())
        });
    if mesh == Mesh::Small {
        b.mesh_n(3)
            .mesh_n_low(2)
            .mesh_n_high(4)
            .mesh_outbound_min(1)
            .gossip_lazy(3)
            .flood_publish(false);
    }
    b.build()
        .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))
}

async fn spawn_node(
    mesh: Mesh,
    dial: Vec<Multiaddr>,
    window: Arc<Window>,
    publish: Option<mpsc::Receiver<Vec<u8>>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<GossipNode> {
    let join_us = now_us();
    let key = Keypair::generate_ed25519();
    let bytes = Arc::new(Bytes::default());
    let b2 = bytes.clone();
    let transport =
        libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true))
            .map(move |s, _| Counted {
                inner: s,
                bytes: b2.clone(),
            })
            .upgrade(Version::V1Lazy)
            .authenticate(libp2p::noise::Config::new(&key)?)
            .multiplex(libp2p::yamux::Config::default())
            .boxed();
    let copies = Arc::new(AtomicU64::new(0));
    let behaviour: gossipsub::Behaviour = gossipsub::Behaviour::new(
        MessageAuthenticity::Signed(key.clone()),
        config(mesh, copies.clone(), window)?,
    )
    .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
    let mut swarm = Swarm::new(
        transport,
        behaviour,
        key.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(120)),
    );
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return address;
            }
        }
    })
    .await?;
    let topic = IdentTopic::new("bench");
    swarm.behaviour_mut().subscribe(&topic)?;
    for a in dial {
        swarm.dial(a)?;
    }
    let recv = Recv::default();
    let r = recv.clone();
    let publish_errors = Arc::new(AtomicU64::new(0));
    let pe = publish_errors.clone();
    tokio::spawn(async move {
        let mut publish = publish;
        // Bounded by the stop signal.
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => {
                    if let SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) = ev
                        && let Some((seq, sent)) = parse_probe(&message.data)
                    {
                        r.push(seq, sent);
                    }
                }
                m = async { match publish.as_mut() { Some(p) => p.recv().await, None => std::future::pending().await } } => {
                    match m {
                        Some(m) => {
                            if swarm.behaviour_mut().publish(topic.clone(), m).is_err() {
                                pe.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => publish = None,
                    }
                }
                _ = stop.changed() => return,
            }
        }
    });
    Ok(GossipNode {
        addr,
        bytes,
        copies,
        recv,
        join_us,
        publish_errors,
    })
}

/// Gossipsub with `n` receivers and one source.
pub async fn run(n: usize, secs: u64, mesh: Mesh) -> anyhow::Result<RunResult> {
    let t0 = Instant::now();
    let window = Arc::new(Window {
        start: AtomicU64::new(u64::MAX),
        end: AtomicU64::new(u64::MAX),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (pub_tx, pub_rx) = mpsc::channel::<Vec<u8>>(64);
    let source = spawn_node(
        mesh,
        Vec::new(),
        window.clone(),
        Some(pub_rx),
        stop_rx.clone(),
    )
    .await?;
    let dropped = Arc::new(AtomicU64::new(0));
    let d2 = dropped.clone();
    let (seq, pacer_stop) = spawn_pacer(move |m| {
        if pub_tx.try_send(m).is_err() {
            d2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut addrs = vec![source.addr.clone()];
    let mut nodes = Vec::new();
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..n {
        let mut pick = Vec::new();
        let mut idx: Vec<usize> = (0..addrs.len()).collect();
        while pick.len() < DIALS && !idx.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let j = (rng % idx.len() as u64) as usize;
            pick.push(addrs[idx.swap_remove(j)].clone());
        }
        let node = spawn_node(mesh, pick, window.clone(), None, stop_rx.clone()).await?;
        addrs.push(node.addr.clone());
        nodes.push(node);
    }
    let setup_s = t0.elapsed().as_secs_f64();
    // Meshes form over heartbeats (1 s): give them a few more than the other ways need.
    tokio::time::sleep(SETTLE + Duration::from_secs(3)).await;
    let w0 = seq.load(Ordering::SeqCst);
    window.start.store(w0, Ordering::SeqCst);
    let (cpu0, lo0) = (cpu_seconds(), lo_bytes());
    let src_tx0 = source.bytes.tx.load(Ordering::Relaxed);
    let tcp0: u64 = nodes
        .iter()
        .map(|x| x.bytes.rx.load(Ordering::Relaxed))
        .sum::<u64>()
        + source.bytes.rx.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let w1 = seq.load(Ordering::SeqCst);
    window.end.store(w1, Ordering::SeqCst);
    let (cpu1, lo1) = (cpu_seconds(), lo_bytes());
    let src_up = source.bytes.tx.load(Ordering::Relaxed) - src_tx0;
    let tcp1: u64 = nodes
        .iter()
        .map(|x| x.bytes.rx.load(Ordering::Relaxed))
        .sum::<u64>()
        + source.bytes.rx.load(Ordering::Relaxed);
    tokio::time::sleep(DRAIN).await;
    let _ = pacer_stop.send(true);
    let _ = stop_tx.send(true);
    let outcomes: Vec<ViewerOutcome> = nodes
        .iter()
        .map(|x| ViewerOutcome {
            recv: x.recv.clone(),
            depth: None,
            join_start_us: x.join_us,
            copies_in_window: Some(x.copies.load(Ordering::Relaxed)),
        })
        .collect();
    let lo = lo1 - lo0;
    let procs = ProcFigures {
        cpu_s_window: cpu1 - cpu0,
        cpu_s_total: cpu1,
        peak_rss_mb: peak_rss_mb(),
        // Outside a private namespace, the sum of the TCP counters is the honest total.
        lo_bytes_window: if std::env::var("COMPARE_NETNS").is_ok() {
            lo
        } else {
            tcp1 - tcp0
        },
    };
    let name = match mesh {
        Mesh::Default => "gossip-default",
        Mesh::Small => "gossip-small",
    };
    let mut r = analyse(
        name,
        n,
        secs,
        (w0, w1),
        &outcomes,
        (
            src_up,
            "bytes written to the source's TCP sockets (noise + yamux + gossipsub framing and control)",
        ),
        procs,
        setup_s,
    );
    r.notes.push(format!(
        "TCP bytes received by all nodes in the window: {}; publish errors: {}; pacer drops: {}",
        tcp1 - tcp0,
        source.publish_errors.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed)
    ));
    Ok(r)
}
