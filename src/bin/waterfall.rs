//! The `waterfall` command line: thin over the library.
//!
//! Human output goes to stderr, machine output (`--json`) to stdout. Ctrl-C shuts down
//! gracefully: rooms are left (children and parent told) and files are closed valid.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use waterfall::crypto::{Identity, KdfParams};
use waterfall::media::MediaConfig;
use waterfall::node::{Node, NodeBuilder};

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
    Demo(waterfall::demo::DemoArgs),
    /// Run a long-lived node: serves the DHT and relays for rooms it is in.
    Node {
        #[command(flatten)]
        net: NetArgs,
    },
    /// Broadcast media into a room; prints a ticket for viewers.
    Broadcast(BroadcastArgs),
    /// Watch a room: write what arrives to files or stdout.
    Watch(WatchArgs),
    /// Run the deterministic tree simulator.
    Sim(waterfall::proto::sim::SimArgs),
    /// Print this node's peer id, creating its identity key on first run.
    Keygen {
        /// Data directory holding identity.key (mode 0600).
        #[arg(long, env = "WATERFALL_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// Network options shared by every command that runs a node.
#[derive(Args, Debug, Clone)]
struct NetArgs {
    /// Listen address (repeatable). Default: loopback TCP and QUIC on random ports.
    #[arg(long)]
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
    /// STUN/TURN server for WebRTC (repeatable), e.g. stun:stun.example.org:3478.
    #[arg(long)]
    stun: Vec<String>,
    /// Address WebRTC binds its UDP sockets to (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    udp_bind: std::net::IpAddr,
    /// Children this node relays to at most.
    #[arg(long)]
    max_children: Option<u16>,
    /// Data directory (identity key).
    #[arg(long, env = "WATERFALL_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Room password options: from a file, the environment, or a prompt — never only argv.
#[derive(Args, Debug, Clone)]
struct PasswordArgs {
    /// Read the room password from this file (first line).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// A public room: no password (anyone who knows the name can watch).
    #[arg(long, conflicts_with = "password_file")]
    no_password: bool,
}

#[derive(Args, Debug)]
struct BroadcastArgs {
    /// Room name.
    #[arg(long)]
    room: String,
    #[command(flatten)]
    password: PasswordArgs,
    /// Video: an IVF (VP8/VP9/AV1) or H.264 Annex-B file, or - for IVF on stdin.
    #[arg(long)]
    video: Option<String>,
    /// Audio: an Ogg Opus file, or - for stdin.
    #[arg(long)]
    audio: Option<String>,
    /// Send stdin lines as data-channel messages (`--data -`).
    #[arg(long)]
    data: Option<String>,
    /// Loop file sources.
    #[arg(long = "loop")]
    looped: bool,
    /// Children per relay the room aims for.
    #[arg(long, default_value_t = 4)]
    fanout: u16,
    /// Events as JSON lines on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// A ticket printed by `broadcast` (or use --room).
    ticket: Option<String>,
    /// Room name, to find the room in the DHT without a ticket.
    #[arg(long, conflicts_with = "ticket")]
    room: Option<String>,
    #[command(flatten)]
    password: PasswordArgs,
    /// Write video here (IVF), - for stdout.
    #[arg(long)]
    video: Option<String>,
    /// Write audio here (Ogg Opus), - for stdout.
    #[arg(long)]
    audio: Option<String>,
    /// Write data-channel messages here as lines, - for stdout.
    #[arg(long)]
    data: Option<String>,
    /// Also keep a recording of the video in this file while watching.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// Events as JSON lines on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
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

/// Public STUN servers, used only with --public.
const PUBLIC_STUN: &[&str] = &["stun:stun.l.google.com:19302", "stun:stun.cloudflare.com:3478"];

impl NetArgs {
    fn builder(&self, mdns_default: bool) -> anyhow::Result<NodeBuilder> {
        let dir = self.data_dir.clone().unwrap_or_else(default_data_dir);
        let identity = Identity::load_or_create(&dir)
            .with_context(|| format!("loading identity from {}", dir.display()))?;
        let mut ice = self.stun.clone();
        if self.public && ice.is_empty() {
            ice = PUBLIC_STUN.iter().map(|s| s.to_string()).collect();
        }
        let media = MediaConfig {
            ice_servers: ice,
            udp_bind: self.udp_bind,
            ..MediaConfig::default()
        };
        let mut b = Node::builder()
            .identity(identity)
            .bootstrap(self.bootstrap.clone())
            .mdns(mdns_default && !self.no_mdns)
            .public(self.public)
            .kdf(KdfParams::STRONG)
            .media(media);
        if !self.listen.is_empty() {
            b = b.listen(self.listen.clone());
        }
        if let Some(n) = self.max_children {
            b = b.max_children(n);
        }
        Ok(b)
    }
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
                bail!("password file {} is empty (use --no-password for a public room)", f.display());
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

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Keygen { data_dir } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let id = Identity::load_or_create(&dir)
                .with_context(|| format!("loading identity from {}", dir.display()))?;
            eprintln!("identity: {}", dir.join("identity.key").display());
            println!("{}", id.peer_id());
            Ok(())
        }
        Command::Sim(args) => {
            let report = waterfall::proto::sim::run(&args.config());
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprintln!("{report}");
            }
            if report.invariant_violations() > 0 {
                bail!("{} invariant violations", report.invariant_violations());
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
        Command::Demo(args) => waterfall::demo::run(args).await,
        Command::Node { net } => run_node(net).await,
        Command::Broadcast(args) => waterfall::cli::broadcast(args.into_params()?).await,
        Command::Watch(args) => waterfall::cli::watch(args.into_params()?).await,
        Command::Keygen { .. } | Command::Sim(_) => unreachable!("handled synchronously"),
    }
}

async fn run_node(net: NetArgs) -> anyhow::Result<()> {
    let node = net.builder(true)?.spawn().await?;
    eprintln!("peer id: {}", node.peer_id());
    for a in node.addrs().await? {
        eprintln!("listening: {a}");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                if let Ok(s) = node.net().status().await {
                    eprint!("\rpeers {:>4}  dht records {:>5}  rooms {:>3}   ", s.peers, s.dht_records, s.topics.len());
                }
            }
        }
    }
    eprintln!("\nshutting down");
    node.shutdown().await;
    Ok(())
}
