//! The `waterfall` command line: thin over the library.
//!
//! Human output goes to stderr, machine output (`--json`) to stdout. Ctrl-C shuts down
//! gracefully: rooms are left (children and parent told) and files are closed valid.
//!
//! Each process claims its data directory ([`waterfall::node::datadir`]): a second process on
//! the same directory (a viewer started beside a broadcaster with the defaults) runs with a
//! temporary identity and says so, instead of being the same peer as the first.
//!
//! A broadcaster playing files waits for its first viewer's media connection before it starts
//! them, so that the viewer who joins right after the ticket is printed sees the start; a live
//! stream on stdin starts at once (it cannot wait), and `--start-now` skips the wait.
//!
//! About 1,000 lines: the command-line options and one function per command; the terminal, the
//! inputs and the demo are in `waterfall/`.

#[path = "waterfall/demo.rs"]
mod demo;
#[path = "waterfall/http.rs"]
mod http;
#[path = "waterfall/input.rs"]
mod input;
#[path = "waterfall/term.rs"]
mod term;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use waterfall::crypto::{Identity, KdfParams};
use waterfall::media::peer::{IceNotice, IceNotices, IceServer};
use waterfall::media::{MediaConfig, MediaEvent, SinkTarget, Sinks};
use waterfall::net::{NetNotice, Reachability, RelayMode};
use waterfall::node::datadir::{Claim, DataDir};
use waterfall::{Node, NodeBuilder, RoomConfig, RoomEvent, WatchConfig, WatchTarget};

use input::{Role, open_source, parse_ticket};
use term::{out, say};

/// How long the broadcaster lets a new viewer's media path settle before it starts its files.
const START_GRACE: Duration = Duration::from_millis(500);

/// waterfall: decentralized live streaming through a relay tree of peers.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream a generated test clip from a broadcaster to several viewers through a relay tree,
    /// all in this process over loopback; leaves the viewers' files in --out.
    Demo(demo::DemoArgs),
    /// Run a long-lived node: serves the DHT and relays for rooms it is in.
    Node {
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        http: http::HttpArgs,
    },
    /// Broadcast media into a room; prints a ticket for viewers.
    Broadcast(BroadcastArgs),
    /// Watch a room: write what arrives to files or stdout.
    ///
    /// Exit status: 0 when stopped (Ctrl-C, --duration) or when the broadcast ends; 3 when the
    /// broadcaster vanished without ending it (crashed or cut off: no media and no answer from
    /// it for about ten seconds); 1 on an error.
    Watch(WatchArgs),
    /// Run the deterministic tree simulator.
    Sim(SimArgs),
    /// Print this node's peer id, creating its identity key on first run.
    Keygen {
        /// Data directory holding identity.key (mode 0600).
        #[arg(long, env = "WATERFALL_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// Options of the simulator.
#[derive(Args, Debug)]
struct SimArgs {
    /// Viewers.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Children per relay.
    #[arg(long, default_value_t = 4)]
    fanout: u16,
    /// Mean session length in seconds (exponential); 0 = no churn.
    #[arg(long, default_value_t = 600.0)]
    churn_mean: f64,
    /// Simulated seconds.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Seed: the same seed gives the same trace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One-way link latency in ms.
    #[arg(long, default_value_t = 50.0)]
    latency_ms: f64,
    /// Report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Network options shared by every command that runs a node.
#[derive(Args, Debug, Clone)]
struct NetArgs {
    /// Listen address (repeatable, or comma-separated in $WATERFALL_LISTEN). Default: TCP and
    /// QUIC on every interface, random ports (/ip4/127.0.0.1/tcp/0 stays on this machine).
    #[arg(long, env = "WATERFALL_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// Peer to dial at start (repeatable), e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3...
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Turn LAN discovery by mDNS off.
    #[arg(long)]
    no_mdns: bool,
    /// Join the public DHT and use public STUN servers (opt-in).
    #[arg(long)]
    public: bool,
    /// STUN server for WebRTC (repeatable), e.g. stun:stun.example.org:3478.
    #[arg(long)]
    stun: Vec<String>,
    /// TURN server for WebRTC (repeatable), e.g. turn:turn.example.org:3478; needs --turn-user
    /// and a credential. Media goes through it only when no direct path works.
    #[arg(long, requires = "turn_user")]
    turn: Vec<String>,
    /// TURN username.
    #[arg(long)]
    turn_user: Option<String>,
    /// Read the TURN credential from this file (first line); else $WATERFALL_TURN_CREDENTIAL.
    #[arg(long)]
    turn_credential_file: Option<PathBuf>,
    /// Serve circuit relay v2 for peers behind NATs without waiting for AutoNAT to confirm
    /// this node is reachable (by default it serves once it is): the node's listen addresses
    /// are taken as public.
    #[arg(long, conflicts_with = "no_relay")]
    relay: bool,
    /// Never serve as a relay for others.
    #[arg(long)]
    no_relay: bool,
    /// An address others can reach this node at (repeatable; e.g. a public IP or a forwarded
    /// port), advertised at once instead of waiting for AutoNAT to confirm one.
    #[arg(long)]
    external_addr: Vec<Multiaddr>,
    /// Address WebRTC binds its UDP sockets to: every interface by default, 127.0.0.1 to stay
    /// on this machine.
    #[arg(long, env = "WATERFALL_UDP_BIND", default_value = "0.0.0.0")]
    udp_bind: std::net::IpAddr,
    /// Children this node relays to at most.
    #[arg(long)]
    max_children: Option<u16>,
    /// Data directory (identity key; default ~/.local/share/waterfall). One process uses it at
    /// a time: a second one runs with a temporary identity.
    #[arg(long, env = "WATERFALL_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Room password options: from a file, the environment, or a prompt — never only argv.
#[derive(Args, Debug, Clone)]
struct PasswordArgs {
    /// Read the room password from this file (first line). Without it the password comes from
    /// $WATERFALL_PASSWORD, else from a prompt.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// A public room: no password (anyone who knows the name can watch).
    #[arg(long, conflicts_with = "password_file")]
    no_password: bool,
}

/// The streams of a room, each a file or `-` for the standard stream: what `broadcast` reads
/// and what `watch` writes (each command gives the options their help text).
#[derive(Args, Debug)]
struct Tracks {
    #[arg(long)]
    video: Option<String>,
    #[arg(long)]
    audio: Option<String>,
    #[arg(long)]
    data: Option<String>,
}

impl Tracks {
    /// How many streams use stdin or stdout (`-`): one process has one of each.
    fn std_users(&self) -> usize {
        [&self.video, &self.audio, &self.data]
            .iter()
            .filter(|s| s.as_deref() == Some("-"))
            .count()
    }
}

#[derive(Args, Debug)]
#[command(mut_arg("video", |a| a.help(
    "Video: an IVF (VP8/VP9/AV1) or H.264 Annex-B file, or - for stdin (IVF or Annex-B, \
     recognised from its first bytes)")))]
#[command(mut_arg("audio", |a| a.help("Audio: an Ogg Opus file, or - for Ogg Opus on stdin")))]
#[command(mut_arg("data", |a| a.help("Send stdin lines as data-channel messages (`--data -`)")))]
struct BroadcastArgs {
    /// Room name.
    #[arg(long)]
    room: String,
    #[command(flatten)]
    password: PasswordArgs,
    #[command(flatten)]
    tracks: Tracks,
    /// Loop file sources.
    #[arg(long = "loop")]
    looped: bool,
    /// Play files at once instead of waiting for the first viewer to connect.
    #[arg(long)]
    start_now: bool,
    /// Children per relay the room aims for.
    #[arg(long, default_value_t = 4)]
    fanout: u16,
    /// Events as JSON lines on stdout.
    #[arg(long)]
    json: bool,
    /// Take the media from a WHIP publisher (OBS, a browser on the page) instead of files:
    /// wait for it on the HTTP server (POST /whip/ROOM).
    #[arg(long)]
    whip: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    http: http::HttpArgs,
}

#[derive(Args, Debug)]
#[command(mut_arg("video", |a| a.help("Write video here (IVF), - for stdout")))]
#[command(mut_arg("audio", |a| a.help("Write audio here (Ogg Opus), - for stdout")))]
#[command(mut_arg("data", |a| a.help("Write data-channel messages here as lines, - for stdout")))]
struct WatchArgs {
    /// A ticket printed by `broadcast` (or use --room).
    ticket: Option<String>,
    /// Room name, to find the room in the DHT without a ticket.
    #[arg(long, conflicts_with = "ticket")]
    room: Option<String>,
    #[command(flatten)]
    password: PasswordArgs,
    #[command(flatten)]
    tracks: Tracks,
    /// Also keep a recording while watching: PREFIX.ivf (video) and PREFIX.ogg (audio).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// Events as JSON lines on stdout.
    #[arg(long)]
    json: bool,
    /// Print the address of the page that plays this room through this node (on stdout; no
    /// browser is started).
    #[arg(long, conflicts_with = "no_http")]
    open: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    http: http::HttpArgs,
}

/// `$XDG_DATA_HOME/waterfall`, else `~/.local/share/waterfall`.
fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("waterfall");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/waterfall");
    }
    PathBuf::from(".waterfall")
}

/// How long `broadcast` waits to learn its reachability before printing the ticket.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Public STUN servers, used only with --public.
const PUBLIC_STUN: &[&str] = &[
    "stun:stun.l.google.com:19302",
    "stun:stun.cloudflare.com:3478",
];

/// This process's identity: the data directory's if this process could claim it, else a
/// temporary one (with a notice). The returned guard holds the directory until it is dropped.
fn claim_identity(dir: Option<&PathBuf>) -> anyhow::Result<(Identity, Option<DataDir>)> {
    let dir = dir.cloned().unwrap_or_else(default_data_dir);
    let claim = DataDir::claim(&dir)
        .with_context(|| format!("opening data directory {}", dir.display()))?;
    match claim {
        Claim::Held(held) => {
            let id = held
                .identity()
                .with_context(|| format!("loading identity from {}", dir.display()))?;
            Ok((id, Some(held)))
        }
        Claim::InUse { path, holder } => {
            let id = Identity::generate();
            let who = holder
                .map(|p| format!("another waterfall process (pid {p})"))
                .unwrap_or_else(|| "another waterfall process".into());
            say!(
                "note: {} is in use by {who}, so this process runs with a temporary identity \
                 ({}) that ends with it; give it --data-dir DIR for a lasting one",
                path.display(),
                id.peer_id()
            );
            Ok((id, None))
        }
    }
}

/// ICE notices queued for printing.
const ICE_NOTICE_QUEUE: usize = 64;

impl NetArgs {
    /// STUN and TURN servers from the flags (the TURN credential from its file or the
    /// environment, never from argv).
    fn ice_servers(&self) -> anyhow::Result<Vec<IceServer>> {
        let mut ice: Vec<IceServer> = self.stun.iter().map(IceServer::stun).collect();
        if !self.turn.is_empty() {
            let user = self.turn_user.clone().context("--turn needs --turn-user")?;
            let credential = match &self.turn_credential_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading TURN credential file {}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned(),
                None => std::env::var("WATERFALL_TURN_CREDENTIAL").unwrap_or_default(),
            };
            if credential.is_empty() {
                bail!(
                    "--turn needs a credential: give --turn-credential-file or set \
                     WATERFALL_TURN_CREDENTIAL"
                );
            }
            for url in &self.turn {
                ice.push(IceServer::turn(url, &user, &credential));
            }
        }
        if self.public && ice.is_empty() {
            ice = PUBLIC_STUN.iter().map(|s| IceServer::stun(*s)).collect();
        }
        for s in &ice {
            s.validate()?;
        }
        Ok(ice)
    }

    /// Start the node these flags describe, with its notices printed (as JSON events too with
    /// `json`). Every command that runs a node starts it here.
    async fn start(&self, json: bool) -> anyhow::Result<Running> {
        let (builder, data_dir, ice) = self.builder()?;
        let node = builder.spawn().await?;
        let board = http::BoardSlot::default();
        let notices = spawn_notices(&node, ice, json, board.clone());
        Ok(Running {
            node,
            _data_dir: data_dir,
            _notices: notices,
            board,
        })
    }

    /// The node builder, the data directory it claimed (keep it until the node stops) and the
    /// receiver of the ICE notices its connections will report.
    fn builder(
        &self,
    ) -> anyhow::Result<(
        NodeBuilder,
        Option<DataDir>,
        tokio::sync::mpsc::Receiver<IceNotice>,
    )> {
        let (identity, held) = claim_identity(self.data_dir.as_ref())?;
        let (ice_tx, ice_rx) = tokio::sync::mpsc::channel(ICE_NOTICE_QUEUE);
        let media = MediaConfig::default()
            .ice_servers(self.ice_servers()?)
            .udp_bind(self.udp_bind)
            .notices(IceNotices(ice_tx));
        let relay = if self.no_relay {
            RelayMode::Off
        } else if self.relay {
            RelayMode::On
        } else {
            RelayMode::Auto
        };
        let mut b = Node::builder()
            .identity(identity)
            .bootstrap(self.bootstrap.clone())
            .mdns(!self.no_mdns)
            .public(self.public)
            .kdf(KdfParams::STRONG)
            .relay(relay)
            .external_addrs(self.external_addr.clone())
            .media(media);
        // A real node listens on every interface (the library's default is loopback, for
        // tests and embedders that choose their own).
        let listen = if self.listen.is_empty() {
            vec![
                "/ip4/0.0.0.0/tcp/0".parse()?,
                "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
            ]
        } else {
            self.listen.clone()
        };
        b = b.listen(listen);
        if let Some(n) = self.max_children {
            b = b.max_children(n);
        }
        Ok((b, held, ice_rx))
    }
}

/// A node that [`NetArgs::start`] started, with what lives as long as it does.
struct Running {
    node: Node,
    /// The claimed data directory: held until the process ends.
    _data_dir: Option<DataDir>,
    /// The task printing the node's notices (it ends with the node).
    _notices: tokio::task::JoinHandle<()>,
    /// The HTTP server's board, once it runs: ICE paths are counted there.
    board: http::BoardSlot,
}

/// A network notice as a `--json` event.
fn json_notice(n: &NetNotice) -> serde_json::Value {
    use serde_json::json;
    match n {
        NetNotice::BootstrapConnected { peer, addr } => json!({"event": "bootstrap_connected",
            "peer": peer.to_string(), "addr": addr.to_string()}),
        NetNotice::BootstrapFailed { addr, error } => {
            json!({"event": "bootstrap_failed", "addr": addr.to_string(), "error": error})
        }
        NetNotice::Reachability(r) => {
            json!({"event": "reachability", "status": reachability_name(*r)})
        }
        NetNotice::AddressConfirmed(a) => {
            json!({"event": "address_confirmed", "addr": a.to_string()})
        }
        NetNotice::AddressExpired(a) => json!({"event": "address_expired", "addr": a.to_string()}),
        NetNotice::RelayReserved { relay, addr } => json!({"event": "relay_reserved",
            "relay": relay.to_string(), "addr": addr.to_string()}),
        NetNotice::RelayFailed { relay, error } => {
            json!({"event": "relay_failed", "relay": relay.to_string(), "error": error})
        }
        NetNotice::NoRelay => json!({"event": "no_relay", "error": n.to_string()}),
        NetNotice::HolePunched { peer } => {
            json!({"event": "hole_punched", "peer": peer.to_string()})
        }
        NetNotice::HolePunchFailed { peer, error } => {
            json!({"event": "hole_punch_failed", "peer": peer.to_string(), "error": error})
        }
        NetNotice::PublicDhtFailed { what, error } => {
            json!({"event": "public_dht_failed", "what": what, "error": error})
        }
        other => json!({"event": "net_notice", "message": other.to_string()}),
    }
}

fn reachability_name(r: Reachability) -> &'static str {
    match r {
        Reachability::Public => "public",
        Reachability::BehindNat => "behind_nat",
        Reachability::Relayed => "relayed",
        _ => "unknown",
    }
}

/// An ICE notice as a message and a `--json` event.
fn ice_notice(n: &IceNotice) -> (String, serde_json::Value) {
    use serde_json::json;
    match n {
        IceNotice::TurnUnavailable { url } => (
            format!("TURN server {url} gave no relay candidate: wrong credentials, or unreachable"),
            json!({"event": "turn_unavailable", "url": url}),
        ),
        IceNotice::GatheringIncomplete { after } => (
            format!(
                "ICE gathering not complete after {} ms: a STUN/TURN server is slow or unreachable",
                after.as_millis()
            ),
            json!({"event": "ice_gathering_incomplete", "after_ms": after.as_millis() as u64}),
        ),
        IceNotice::Failed { local, remote } => (
            format!(
                "WebRTC connection failed: no working path (our candidates: {}; theirs: {}); \
                 behind a symmetric NAT or firewall? try --turn",
                local.join(", "),
                remote.join(", ")
            ),
            json!({"event": "ice_failed", "local": local, "remote": remote}),
        ),
        IceNotice::Connected { path } => (
            format!("WebRTC connected ({path})"),
            json!({"event": "ice_connected", "path": path.to_string()}),
        ),
        other => (
            format!("{other:?}"),
            json!({"event": "ice_notice", "message": format!("{other:?}")}),
        ),
    }
}

/// Print network and ICE notices as they happen: a line on stderr, and with `json` an event on
/// stdout. Ends with the node.
fn spawn_notices(
    node: &Node,
    mut ice: tokio::sync::mpsc::Receiver<IceNotice>,
    json: bool,
    board: http::BoardSlot,
) -> tokio::task::JoinHandle<()> {
    let mut net = node.net().notices();
    tokio::spawn(async move {
        let mut ice_open = true;
        loop {
            tokio::select! {
                n = net.recv() => match n {
                    Ok(n) => {
                        say!("{n}");
                        if json {
                            out!("{}", json_notice(&n));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                        say!("({k} network notices skipped)");
                    }
                    Err(_) => break,
                },
                n = ice.recv(), if ice_open => match n {
                    Some(n) => {
                        if let (IceNotice::Connected { path }, Some(b)) = (&n, board.get()) {
                            b.count_path(*path);
                        }
                        let (msg, j) = ice_notice(&n);
                        say!("{msg}");
                        if json {
                            out!("{j}");
                        }
                    }
                    None => ice_open = false,
                },
            }
        }
    })
}

impl PasswordArgs {
    /// The password from --password-file, $WATERFALL_PASSWORD, or a prompt; None = public room.
    fn read(&self) -> anyhow::Result<Option<String>> {
        if self.no_password {
            return Ok(None);
        }
        if let Some(f) = &self.password_file {
            let s = std::fs::read_to_string(f)
                .with_context(|| format!("reading password file {}", f.display()))?;
            let line = s.lines().next().unwrap_or("").to_owned();
            if line.is_empty() {
                bail!(
                    "password file {} is empty (use --no-password for a public room)",
                    f.display()
                );
            }
            return Ok(Some(line));
        }
        if let Ok(p) = std::env::var("WATERFALL_PASSWORD") {
            return Ok((!p.is_empty()).then_some(p));
        }
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            let p = rpassword::prompt_password("room password (empty for a public room): ")?;
            return Ok((!p.is_empty()).then_some(p));
        }
        bail!(
            "no room password: give --password-file, set WATERFALL_PASSWORD, run in a terminal \
             to be asked, or pass --no-password for a public room"
        )
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    term::init_tracing();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Said already, when it happened.
        Err(e) if e.is::<BroadcasterLost>() => std::process::ExitCode::from(EXIT_BROADCASTER_LOST),
        Err(e) => {
            // The message and its causes on one line; a backtrace (anyhow's `{:?}` when
            // RUST_BACKTRACE is set) helps nobody who mistyped a file name.
            say!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { data_dir } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let id = Identity::load_or_create(&dir)
                .with_context(|| format!("loading identity from {}", dir.display()))?;
            say!("identity: {}", dir.join("identity.key").display());
            out!("{}", id.peer_id());
            Ok(())
        }
        Command::Sim(args) => {
            let cfg = waterfall::proto::sim::SimConfig {
                nodes: args.nodes,
                fanout: args.fanout,
                churn_mean_secs: (args.churn_mean > 0.0).then_some(args.churn_mean),
                duration_secs: args.duration,
                seed: args.seed,
                link_latency_ms: args.latency_ms,
                ..Default::default()
            };
            say!(
                "simulating {} nodes, fanout {}, {} s ...",
                args.nodes,
                args.fanout,
                args.duration
            );
            let started = std::time::Instant::now();
            let report = waterfall::proto::sim::run(&cfg);
            if args.json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!("{report}");
            }
            say!("wall time {:.1} s", started.elapsed().as_secs_f64());
            if report.violations.total() > 0 {
                bail!("{} invariant violations", report.violations.total());
            }
            Ok(())
        }
        other => runtime()?.block_on(run_async(other)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn run_async(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Demo(args) => demo::run(args).await,
        Command::Node { net, http } => run_node(net, http).await,
        Command::Broadcast(args) => broadcast(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Keygen { .. } | Command::Sim(_) => unreachable!("handled synchronously"),
    }
}

async fn run_node(net: NetArgs, http: http::HttpArgs) -> anyhow::Result<()> {
    let running = net.start(false).await?;
    let node = &running.node;
    let server = http
        .start(node, None, net.ice_servers()?, &running.board)
        .await?;
    say!("peer id: {}", node.peer_id());
    for a in node.addrs().await? {
        say!("listening: {a}");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if let Ok(s) = node.net().status().await {
                    term::status(&format!(
                        "peers {:>4}  dht records {:>5}  rooms {:>3}  reachability {}{}",
                        s.peers, s.dht_records, s.topics.len(), s.reachability,
                        if s.relay_serving { "  relaying" } else { "" }
                    ));
                }
            }
        }
    }
    say!("shutting down");
    if let Some(s) = server {
        s.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

fn json_event(ev: &RoomEvent) -> Option<serde_json::Value> {
    use serde_json::json;
    Some(match ev {
        RoomEvent::Joined { parent, depth } => {
            json!({"event": "joined", "parent": parent.to_string(), "depth": depth})
        }
        RoomEvent::ParentChanged { old, new } => json!({"event": "parent_changed",
            "old": old.map(|p| p.to_string()), "new": new.to_string()}),
        RoomEvent::DepthChanged { depth } => json!({"event": "depth", "depth": depth}),
        RoomEvent::Orphaned { lost } => json!({"event": "orphaned", "lost": lost.to_string()}),
        RoomEvent::ParentUnreachable { parent, timed_out } => json!({"event": "parent_unreachable",
            "parent": parent.to_string(), "timed_out": timed_out}),
        RoomEvent::Rejoined { parent, outage_ms } => json!({"event": "rejoined",
            "parent": parent.to_string(), "outage_ms": outage_ms}),
        RoomEvent::IceRestart {
            parent,
            restarted,
            error,
        } => json!({"event": "ice_restart",
            "parent": parent.to_string(), "restarted": restarted, "error": error}),
        RoomEvent::ChildAdded(c) => json!({"event": "child_added", "peer": c.to_string()}),
        RoomEvent::ChildRemoved(c) => json!({"event": "child_removed", "peer": c.to_string()}),
        RoomEvent::Media(MediaEvent::FirstFrame { kind, after }) => json!({"event": "first_frame",
            "kind": format!("{kind:?}").to_lowercase(), "after_ms": after.as_millis() as u64}),
        RoomEvent::Media(MediaEvent::ParentConnected) => json!({"event": "parent_connected"}),
        RoomEvent::Media(MediaEvent::ParentLost) => json!({"event": "parent_lost"}),
        RoomEvent::Media(MediaEvent::DecryptFailed(e)) => {
            json!({"event": "decrypt_failed", "error": e.to_string()})
        }
        RoomEvent::Media(MediaEvent::Stats(s)) => json!({"event": "stats",
            "bitrate_bps": s.bitrate_bps, "video_frames": s.video_frames,
            "audio_frames": s.audio_frames, "gaps": s.gaps, "children": s.children,
            "packets_forwarded": s.packets_forwarded}),
        RoomEvent::Media(MediaEvent::SourceEnded { kind, error }) => {
            json!({"event": "source_ended",
            "kind": format!("{kind:?}").to_lowercase(), "error": error})
        }
        RoomEvent::BroadcasterLost => json!({"event": "broadcaster_lost"}),
        // The broadcaster's end, before the files are finalized (`ended` follows): a script
        // tells a broadcast that is over from a watcher that was stopped.
        RoomEvent::BroadcastEnded => json!({"event": "broadcast_ended"}),
        RoomEvent::TicketChanged(t) => json!({"event": "ticket", "ticket": t.to_string()}),
        RoomEvent::Ended => json!({"event": "ended"}),
        RoomEvent::NameContested(c) => json!({"event": "name_contested",
            "claimants": c.claimants.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "chosen": c.chosen.map(|p| p.to_string()), "pinned": c.pinned}),
        _ => return None,
    })
}

/// The status line: parent, depth, children, bitrate, loss.
#[derive(Default)]
struct StatusLine {
    depth: Option<u16>,
    parent: Option<String>,
    children: usize,
    bitrate: u64,
    gaps: u64,
    frames: u64,
}

impl StatusLine {
    fn update(&mut self, ev: &RoomEvent) {
        match ev {
            RoomEvent::Joined { parent, depth } => {
                self.parent = Some(short(parent));
                self.depth = Some(*depth);
            }
            RoomEvent::ParentChanged { new, .. } => self.parent = Some(short(new)),
            RoomEvent::Rejoined { parent, .. } => self.parent = Some(short(parent)),
            RoomEvent::DepthChanged { depth } => self.depth = *depth,
            RoomEvent::Orphaned { .. } => self.parent = None,
            RoomEvent::Media(MediaEvent::Stats(s)) => {
                self.children = s.children as usize;
                self.bitrate = s.bitrate_bps;
                self.gaps = s.gaps;
                self.frames = s.video_frames;
            }
            _ => {}
        }
    }

    fn print(&self) {
        term::status(&format!(
            "parent {}  depth {}  children {}  {:.0} kbit/s  frames {}  gaps {}",
            self.parent.as_deref().unwrap_or("-"),
            self.depth.map(|d| d.to_string()).unwrap_or("-".into()),
            self.children,
            self.bitrate as f64 / 1000.0,
            self.frames,
            self.gaps
        ));
    }
}

fn short(p: &libp2p::PeerId) -> String {
    let s = p.to_string();
    s[s.len().saturating_sub(8)..].to_owned()
}

async fn broadcast(args: BroadcastArgs) -> anyhow::Result<()> {
    if args.whip {
        return http::broadcast_whip(args).await;
    }
    if args.tracks.std_users() > 1 {
        bail!("only one of --video, --audio and --data can read stdin (-)");
    }
    if args.tracks.video.is_none() && args.tracks.audio.is_none() && args.tracks.data.is_none() {
        bail!("nothing to broadcast: give --video, --audio or --data");
    }
    let password = args.password.read()?;
    // Open the inputs before the node starts: a missing file or a wrong format fails at once.
    let mut sources = Vec::new();
    if let Some(v) = &args.tracks.video {
        sources.push(open_source(v, Role::Video, args.looped).await?);
    }
    if let Some(a) = &args.tracks.audio {
        sources.push(open_source(a, Role::Audio, args.looped).await?);
    }
    let media_sources = sources.len();
    // Files wait for the first viewer; a live pipe cannot wait.
    let files = [&args.tracks.video, &args.tracks.audio]
        .iter()
        .any(|s| s.as_deref().is_some_and(|s| s != "-"));
    let wait_for_viewer = files && !args.start_now;
    let running = args.net.start(args.json).await?;
    let node = &running.node;
    if !args.net.bootstrap.is_empty() {
        // Learn how viewers can reach us (a direct address, or a relay slot) before the ticket
        // is printed: the ticket carries the addresses.
        let r = node.net().settle(SETTLE_TIMEOUT).await?;
        if matches!(r, Reachability::Unknown | Reachability::BehindNat) {
            say!(
                "warning: not confirmed reachable after {} s ({r}): viewers outside this \
                 network may not reach this broadcaster",
                SETTLE_TIMEOUT.as_secs()
            );
        }
    }
    let server = args
        .http
        .start(
            node,
            password.clone(),
            args.net.ice_servers()?,
            &running.board,
        )
        .await?;
    // Players on this node see what the sources send, before it is encrypted.
    let feed = server.as_ref().filter(|_| media_sources > 0).map(|_| {
        let tracks = sources
            .iter()
            .map(|s| (s.codec().kind(), s.codec()))
            .collect();
        waterfall::http::Feed::new(tracks).0
    });
    let report = match &server {
        Some(s) => Some(s.board().report(
            &args.room,
            waterfall::http::Role::Broadcaster,
            password.clone(),
        )?),
        None => None,
    };
    if let (Some(r), Some(f)) = (&report, &feed) {
        r.feed(f.clone());
    }
    let mut cfg = RoomConfig::new(&args.room)
        .fanout(args.fanout)
        .data(args.tracks.data.is_some())
        .autostart(!wait_for_viewer);
    if let Some(pw) = password {
        cfg = cfg.password(pw);
    }
    for s in sources {
        cfg = cfg.source(match &feed {
            Some(f) => f.tap(s),
            None => s,
        });
    }
    let (room, mut events) = node.broadcast(cfg).await?;
    if room.keys().is_public() {
        say!(
            "note: room {:?} has no password: anyone who knows its name can watch",
            args.room
        );
    }
    let ticket = room.ticket().to_string();
    say!("peer id: {}", node.peer_id());
    say!("ticket (give it to viewers with the password):");
    out!("{ticket}");
    if wait_for_viewer {
        say!("waiting for the first viewer before playing (--start-now plays at once)");
    }
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<String>(256);
    if args.tracks.data.as_deref() == Some("-") {
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if line_tx.send(l).await.is_err() {
                    break;
                }
            }
        });
    }
    let mut status = StatusLine::default();
    let mut children = 0usize;
    let mut ended_sources = 0;
    // When to start the files: a moment after the first viewer's media connection is up.
    let mut start_at: Option<tokio::time::Instant> = None;
    let mut started = !wait_for_viewer;
    loop {
        let start_timer = async {
            match start_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = start_timer => {
                start_at = None;
                started = true;
                room.start();
                say!("a viewer is connected: playing");
            }
            Some(l) = line_rx.recv() => {
                if let Err(e) = room.send_data(l.as_bytes()) {
                    say!("data: {e}");
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                http::report(report.as_ref(), &ev, room.status()).await;
                match &ev {
                    RoomEvent::ChildAdded(_) => children += 1,
                    RoomEvent::ChildRemoved(_) => children = children.saturating_sub(1),
                    RoomEvent::Media(MediaEvent::ChildConnected(_))
                        if !started && start_at.is_none() =>
                    {
                        start_at = Some(tokio::time::Instant::now() + START_GRACE);
                    }
                    // Our dialable addresses changed (a relay slot, a confirmed external
                    // address): the record is republished; new viewers need the new ticket.
                    RoomEvent::TicketChanged(t) if !args.json => {
                        say!("our addresses changed: new ticket (the old one may no longer reach us):");
                        out!("{t}");
                    }
                    RoomEvent::Media(MediaEvent::SourceEnded { error, kind }) => {
                        say!("{kind:?} source ended{}", error.as_ref().map(|e| format!(": {e}")).unwrap_or_default());
                        ended_sources += 1;
                    }
                    _ => {}
                }
                if args.json {
                    if let Some(j) = json_event(&ev) { out!("{j}"); }
                } else {
                    status.update(&ev);
                    status.depth = Some(0);
                    status.children = children;
                    status.print();
                }
                if media_sources > 0 && ended_sources >= media_sources && args.tracks.data.is_none() {
                    say!("all sources ended");
                    break;
                }
            }
        }
    }
    say!("leaving");
    drop(report);
    room.leave().await;
    if let Some(s) = server {
        s.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    // The ticket first: a damaged one is reported before a password is asked for.
    let target = match (&args.ticket, &args.room) {
        (Some(t), _) => WatchTarget::Ticket(parse_ticket(t)?),
        (None, Some(r)) => WatchTarget::Name(r.clone()),
        (None, None) => bail!("give a ticket or --room NAME"),
    };
    let password = args.password.read()?;
    let target_of = |s: &Option<String>| {
        s.as_ref().map(|p| {
            if p == "-" {
                SinkTarget::Stdout
            } else {
                SinkTarget::File(PathBuf::from(p))
            }
        })
    };
    let mut sinks = Sinks {
        video: target_of(&args.tracks.video),
        audio: target_of(&args.tracks.audio),
        data: target_of(&args.tracks.data),
    };
    if let Some(prefix) = &args.record {
        // Keep a recording beside whatever the viewer plays: PREFIX.ivf and PREFIX.ogg.
        let rec = |ext: &str, t: Option<SinkTarget>| {
            let file = SinkTarget::File(prefix.with_extension(ext));
            Some(match t {
                Some(t) => SinkTarget::Tee(Box::new(t), Box::new(file)),
                None => file,
            })
        };
        sinks.video = rec("ivf", sinks.video.take());
        sinks.audio = rec("ogg", sinks.audio.take());
    }
    // The recording goes to files only: what uses stdout is what the flags say.
    let stdout_users = args.tracks.std_users();
    if stdout_users > 1 || (stdout_users == 1 && args.json) {
        bail!("only one output can go to stdout");
    }
    let running = args.net.start(args.json).await?;
    let node = &running.node;
    say!("peer id: {}", node.peer_id());
    let server = args
        .http
        .start(
            node,
            password.clone(),
            args.net.ice_servers()?,
            &running.board,
        )
        .await?;
    // Players on this node share this viewer's membership: its decrypted frames feed them.
    let mut feed = None;
    if let Some(s) = &server {
        let (f, kf) = waterfall::http::Feed::new(Vec::new());
        let tap = |t: Option<SinkTarget>| {
            Some(match t {
                Some(t) => SinkTarget::Tee(Box::new(t), Box::new(f.sink_target())),
                None => f.sink_target(),
            })
        };
        sinks.video = tap(sinks.video.take());
        sinks.audio = tap(sinks.audio.take());
        feed = Some((f, kf, s));
    }
    let room_name = match &target {
        WatchTarget::Ticket(t) => t.room.clone(),
        WatchTarget::Name(n) => n.clone(),
    };
    let (room, mut events) = node
        .watch(
            target,
            WatchConfig::new()
                .password_opt(password.clone())
                .sinks(sinks),
        )
        .await?;
    let mut keyframes = None;
    let report = match feed {
        Some((f, kf, s)) => {
            let r = s
                .board()
                .report(&room_name, waterfall::http::Role::Viewer, password)?;
            r.feed(f);
            keyframes = Some(kf);
            if args.open {
                out!("{}", http::watch_url(s, &room_name));
            }
            Some(r)
        }
        None => None,
    };
    let mut status = StatusLine::default();
    let mut broadcaster_lost = false;
    let stop = async {
        match args.duration {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = &mut stop => break,
            Some(()) = async { keyframes.as_mut()?.recv().await } => room.request_keyframe(),
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                http::report(report.as_ref(), &ev, room.status()).await;
                match &ev {
                    RoomEvent::Media(MediaEvent::DecryptFailed(e)) => {
                        say!("media does not decrypt ({e}): wrong password?");
                    }
                    RoomEvent::IceRestart { parent, restarted: true, .. } => say!(
                        "network changed: media path to parent {} restarted",
                        short(parent)
                    ),
                    RoomEvent::IceRestart { parent, error: Some(e), .. } => say!(
                        "network changed: restarting the media path to parent {} failed ({e}): trying another parent",
                        short(parent)
                    ),
                    RoomEvent::NameContested(c) => say!("warning: {c}"),
                    RoomEvent::ParentUnreachable { parent, timed_out } => say!(
                        "no media path to parent {} ({}): trying another parent",
                        short(parent),
                        if *timed_out { "not connected in time" } else { "WebRTC connection failed" }
                    ),
                    _ => {}
                }
                if args.json {
                    if let Some(j) = json_event(&ev) { out!("{j}"); }
                } else {
                    status.update(&ev);
                    status.print();
                }
                if matches!(ev, RoomEvent::BroadcasterLost) {
                    broadcaster_lost = true;
                }
                if matches!(ev, RoomEvent::Ended) {
                    // We have not left, so the room ended under us: the broadcast is over.
                    if broadcaster_lost {
                        say!("the broadcaster is gone (crashed or cut off): no media and no answer from it");
                    } else {
                        say!("the broadcast ended");
                    }
                    break;
                }
            }
        }
    }
    say!("leaving (files are closed valid)");
    drop(report);
    room.leave().await;
    if let Some(s) = server {
        s.shutdown().await;
    }
    node.shutdown().await;
    if broadcaster_lost {
        return Err(BroadcasterLost.into());
    }
    Ok(())
}

/// `watch` ended because the broadcaster vanished (exit code [`EXIT_BROADCASTER_LOST`]).
#[derive(Debug, thiserror::Error)]
#[error("the broadcaster is gone")]
struct BroadcasterLost;

/// Exit code of `watch` when the broadcaster vanished without ending the broadcast.
const EXIT_BROADCASTER_LOST: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_broadcast_has_a_json_event_of_its_own() {
        let line = |ev| json_event(&ev).map(|v| v.to_string());
        assert_eq!(
            line(RoomEvent::BroadcastEnded).as_deref(),
            Some(r#"{"event":"broadcast_ended"}"#)
        );
        assert_eq!(
            line(RoomEvent::Ended).as_deref(),
            Some(r#"{"event":"ended"}"#)
        );
    }
}
