//! The command line's side of the node's HTTP door ([`waterfall::http`]): its flags, starting
//! it beside the node, reporting the command's room to it, and `broadcast --whip`.
//!
//! Every command that runs a node (`node`, `broadcast`, `watch`) serves the page, WHIP, WHEP,
//! `/api/status` and `/metrics` on 127.0.0.1 (a free port unless `--http` names one) and prints
//! the page's address on stderr; `--no-http` turns it off. The room a command is in goes on the
//! server's board with the command's password, so the page shows it and players of that room
//! share the command's own membership.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, bail};
use clap::Args;
use waterfall::http::{Board, GatewayEvent, HttpConfig, HttpServer};
use waterfall::media::peer::IceServer;
use waterfall::{Node, RoomEvent, RoomStatus};

use crate::term::{out, say};

/// Options of the HTTP server.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Serve the page, WHIP (/whip/ROOM), WHEP (/whep/ROOM), /api/status and /metrics on this
    /// address (default 127.0.0.1 on a free port). An address beyond loopback needs
    /// --http-token-file.
    #[arg(long, value_name = "ADDR:PORT")]
    pub http: Option<SocketAddr>,
    /// Do not serve HTTP.
    #[arg(long, conflicts_with = "http")]
    pub no_http: bool,
    /// Bearer token every HTTP request but the page must carry (first line of this file).
    #[arg(long)]
    pub http_token_file: Option<PathBuf>,
}

/// Where the node's ICE notices count paths once the server runs.
pub type BoardSlot = Arc<OnceLock<Board>>;

impl HttpArgs {
    /// Start the server beside `node` (unless `--no-http`), print its address, and let the
    /// node's ICE notices count paths on its board. `password` is the password of the
    /// command's room: WHIP/WHEP requests that carry none use it.
    pub async fn start(
        &self,
        node: &Node,
        password: Option<String>,
        ice: Vec<IceServer>,
        slot: &BoardSlot,
    ) -> anyhow::Result<Option<HttpServer>> {
        if self.no_http {
            return Ok(None);
        }
        let token = match &self.http_token_file {
            Some(f) => {
                let t = std::fs::read_to_string(f)
                    .with_context(|| format!("reading HTTP token file {}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                if t.is_empty() {
                    bail!("HTTP token file {} is empty", f.display());
                }
                Some(t)
            }
            None => None,
        };
        let cfg = HttpConfig {
            addr: self.http,
            token,
            password,
            ice_servers: ice,
        };
        let server = HttpServer::start(node.clone(), cfg).await?;
        let _ = slot.set(server.board().clone());
        say!(
            "page: {} (WHIP: POST /whip/ROOM, WHEP: POST /whep/ROOM; /api/status, /metrics)",
            server.url()
        );
        Ok(Some(server))
    }
}

/// The page's address that plays `room` at once (`watch --open`).
pub fn watch_url(server: &HttpServer, room: &str) -> String {
    let mut q = String::new();
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{}?room={q}&watch", server.url())
}

/// Pass a room event (and, once a second with the stats, the room's status) to the board.
pub async fn report<F, E>(report: Option<&waterfall::http::RoomReport>, ev: &RoomEvent, status: F)
where
    F: std::future::Future<Output = Result<RoomStatus, E>>,
{
    let Some(r) = report else { return };
    r.event(ev);
    if matches!(ev, RoomEvent::Media(waterfall::MediaEvent::Stats(_)))
        && let Ok(s) = status.await
    {
        r.status(&s);
    }
}

/// `broadcast --whip`: the node waits for a WHIP publisher on its HTTP server and broadcasts
/// what it sends; the ticket is printed when the publisher's media arrives. Ends when the
/// publisher leaves (or on Ctrl-C).
pub async fn broadcast_whip(args: crate::BroadcastArgs) -> anyhow::Result<()> {
    if args.tracks.video.is_some() || args.tracks.audio.is_some() || args.tracks.data.is_some() {
        bail!("--whip takes the media from a WHIP publisher: give no --video, --audio or --data");
    }
    if args.http.no_http {
        bail!("--whip needs the HTTP server: drop --no-http");
    }
    let password = args.password.read()?;
    let running = args.net.start(args.json).await?;
    let node = &running.node;
    let Some(server) = args
        .http
        .start(node, password, args.net.ice_servers()?, &running.board)
        .await?
    else {
        bail!("--whip needs the HTTP server");
    };
    let mut events = server.events();
    say!("peer id: {}", node.peer_id());
    say!(
        "waiting for a WHIP publisher: POST {}whip/{} (OBS: Settings > Stream > WHIP)",
        server.url(),
        args.room
    );
    let mut published = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            ev = events.recv() => match ev {
                Ok(GatewayEvent::Publishing { room, ticket }) if room == args.room => {
                    published = true;
                    say!("the publisher is live; ticket (give it to viewers with the password):");
                    out!("{ticket}");
                }
                Ok(GatewayEvent::PublishEnded { room, why }) if room == args.room => {
                    say!("the WHIP session ended: {why}");
                    if published {
                        break;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
        }
    }
    say!("leaving");
    server.shutdown().await;
    node.shutdown().await;
    Ok(())
}
