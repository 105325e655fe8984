//! The node's HTTP door: WHIP ingest, WHEP playback, a page, `/api/status` and `/metrics`.
//!
//! Browsers, OBS (>= 30) and GStreamer publish with WHIP (RFC 9725) and players pull with
//! WHEP; both are one HTTP exchange of a complete SDP offer and answer. This module makes every
//! node such a door to its relay tree, following the conventions of Broadcast Box, MediaMTX
//! and Janus's WHIP/WHEP servers:
//!
//! | request | answer |
//! |---|---|
//! | `POST /whip/ROOM` (`application/sdp`) | `201`, the SDP answer, `Location: /whip/ROOM/ID`; the node broadcasts ROOM with what the publisher sends (`whip.rs`) |
//! | `POST /whep/ROOM` (`application/sdp`) | `201`, the SDP answer, `Location: /whep/ROOM/ID`; the node watches ROOM (or reuses its membership) and plays it to the player (`whep.rs`) |
//! | `DELETE` on a `Location` | `200`: the session ends (a WHIP publisher's end ends the broadcast) |
//! | `PATCH` on a `Location` | `405`: trickle ICE is not supported; offers must be complete (every browser's offer is, once gathering completes; OBS sends complete offers) |
//! | `OPTIONS /whip/ROOM`, `/whep/ROOM` | `204` with the ICE servers as `Link: <url>; rel="ice-server"` headers |
//! | `GET /` | the page ([`PAGE`], compiled into the binary: no build step, no CDN) |
//! | `GET /api/status` | JSON: this node, its network, each room's parent, depth, children, figures |
//! | `GET /metrics` | the same figures in the Prometheus text format |
//!
//! Errors follow the drafts: `415` for a body that is not `application/sdp`, `400` for an SDP
//! that does not parse or offers nothing usable, `404` for a room nobody broadcasts under that
//! name and password, `409` for a room this node is already in as something else, `401` (with
//! `WWW-Authenticate: Bearer`) for a missing or wrong token, `503` when the session limit is
//! reached, `504` when the room gave no media in time.
//!
//! Security: the server binds `127.0.0.1` by default. Binding any other address requires a
//! bearer token ([`HttpConfig::token`]), which every request but the page then needs. The
//! room's password comes from the node's configuration (the password the CLI was given for its
//! room, or [`HttpConfig::password`]) or from the `Waterfall-Room-Password` request header,
//! never from the URL (URLs end up in logs and histories). Media stays end-to-end encrypted in
//! the tree: the gateway decrypts only for its local players, like any viewer does for its
//! files, and encrypts a WHIP publisher's frames before they leave the node.

pub mod board;
pub mod feed;
mod whep;
mod whip;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{broadcast, oneshot};

pub use board::{Board, BoardError, Role, RoomReport};
pub use feed::Feed;

use crate::media::peer::IceServer;
use crate::node::Node;
use crate::wire::Ticket;

/// The page served at `/`: plain HTML, CSS and JavaScript in one file, compiled into the
/// binary.
pub const PAGE: &str = include_str!("page.html");
/// WHIP publishers and WHEP players per node at most.
pub const MAX_SESSIONS: usize = 32;
/// Largest request body (an SDP offer with every codec and candidate is a few kB).
pub const MAX_BODY: usize = crate::media::peer::MAX_SDP_LEN;
/// The request header that may carry a room's password.
pub const PASSWORD_HEADER: &str = "waterfall-room-password";
/// Gateway events queued for the program that started the server.
const EVENT_QUEUE: usize = 16;

/// Settings of the HTTP server.
#[derive(Clone, Default)]
pub struct HttpConfig {
    /// Where to listen (default `127.0.0.1:0`, a free port).
    pub addr: Option<SocketAddr>,
    /// Bearer token every request but the page must carry; required to bind anything but a
    /// loopback address.
    pub token: Option<String>,
    /// Room password for WHIP/WHEP requests that carry none and for rooms no owner gave one
    /// (none: such rooms are public).
    pub password: Option<String>,
    /// ICE servers offered to WHIP/WHEP clients in `Link` headers.
    pub ice_servers: Vec<IceServer>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ice_servers", &self.ice_servers)
            .finish()
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// A non-loopback address without a token.
    #[error(
        "binding {0} (beyond this machine) needs a bearer token (--http-token-file), so that \
         strangers cannot publish into or read rooms through this node"
    )]
    TokenRequired(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the gateway tells the program that started it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum GatewayEvent {
    /// A WHIP publisher's broadcast started: viewers can use this ticket.
    Publishing {
        /// The room.
        room: String,
        /// Its ticket.
        ticket: Ticket,
    },
    /// A WHIP publisher's broadcast ended (the publisher left, or its connection failed).
    PublishEnded {
        /// The room.
        room: String,
        /// Why, in a few words.
        why: String,
    },
}

/// One WHIP or WHEP session, by the id in its `Location`.
enum Session {
    Whip(whip::Ingest),
    Whep(whep::Player),
}

pub(crate) struct Shared {
    node: Node,
    config: HttpConfig,
    board: Board,
    sessions: Mutex<HashMap<String, (String, Session)>>,
    /// Rooms the gateway joined itself for WHEP players (serialized per gateway: a join takes
    /// seconds and two players of one room must not both join it).
    memberships: tokio::sync::Mutex<HashMap<String, Arc<whep::Membership>>>,
    events: broadcast::Sender<GatewayEvent>,
}

impl Shared {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Session)>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The password for `room`: the request's, else the room owner's, else the configured one.
    fn password_for(&self, room: &str, headers: &HeaderMap) -> Option<String> {
        if let Some(p) = headers.get(PASSWORD_HEADER).and_then(|v| v.to_str().ok()) {
            return (!p.is_empty()).then(|| p.to_owned());
        }
        if let Some((_, pw)) = self.board.feed(room) {
            return pw;
        }
        self.config.password.clone()
    }

    fn add_session(&self, id: String, room: String, s: Session) {
        self.sessions().insert(id, (room, s));
    }

    /// Ends and forgets a session; false when there was none.
    fn end_session(&self, id: &str) -> bool {
        let s = self.sessions().remove(id);
        match s {
            Some((_, Session::Whip(i))) => {
                i.stop();
                true
            }
            Some((_, Session::Whep(p))) => {
                p.stop();
                true
            }
            None => false,
        }
    }
}

/// The running HTTP server. Dropping it stops the server (sessions end with their rooms).
pub struct HttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// Binds and serves. A non-loopback address needs [`HttpConfig::token`].
    pub async fn start(node: Node, config: HttpConfig) -> Result<HttpServer, HttpError> {
        let addr = config
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        if !addr.ip().is_loopback() && config.token.as_deref().is_none_or(str::is_empty) {
            return Err(HttpError::TokenRequired(addr));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            node,
            config,
            board: Board::default(),
            sessions: Mutex::new(HashMap::new()),
            memberships: tokio::sync::Mutex::new(HashMap::new()),
            events,
        });
        let app = router(Arc::clone(&shared));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!("HTTP server stopped: {e}");
            }
        });
        Ok(HttpServer {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The board: rooms report their figures here ([`Board::report`]).
    pub fn board(&self) -> &Board {
        &self.shared.board
    }

    /// What the gateway tells (WHIP broadcasts starting and ending).
    pub fn events(&self) -> broadcast::Receiver<GatewayEvent> {
        self.shared.events.subscribe()
    }

    /// Stops serving and ends every session.
    pub async fn shutdown(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let ids: Vec<String> = self.shared.sessions().keys().cloned().collect();
        for id in ids {
            self.shared.end_session(&id);
        }
        let ms: Vec<_> = self.shared.memberships.lock().await.drain().collect();
        for (_, m) in ms {
            m.stop();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Collected first: ending a session may touch the table again.
        let all: Vec<_> = self.shared.sessions().drain().collect();
        for (_, (_, s)) in all {
            match s {
                Session::Whip(i) => i.stop(),
                Session::Whep(p) => p.stop(),
            }
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/whip/{room}",
            axum::routing::post(whip::post).options(options),
        )
        .route(
            "/whep/{room}",
            axum::routing::post(whep::post).options(options),
        )
        .route(
            "/whip/{room}/{id}",
            axum::routing::delete(delete_session).patch(no_trickle),
        )
        .route(
            "/whep/{room}/{id}",
            axum::routing::delete(delete_session).patch(no_trickle),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            auth,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// Every request but the page needs the bearer token when one is set.
async fn auth(
    State(s): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = s.config.token.as_deref().filter(|t| !t.is_empty())
        && req.uri().path() != "/"
    {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    let net = s.node.net().status().await.ok();
    let body = s.board.status_json(s.node.peer_id(), net.as_ref());
    axum::Json(body).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let net = s.node.net().status().await.ok();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.board.metrics_text(net.as_ref()),
    )
        .into_response()
}

async fn options(State(s): State<Arc<Shared>>) -> Response {
    let mut h = link_headers(&s.config);
    h.insert("accept-post", HeaderValue::from_static("application/sdp"));
    (StatusCode::NO_CONTENT, h).into_response()
}

async fn no_trickle() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "DELETE")],
        "trickle ICE is not supported: send a complete offer\n",
    )
        .into_response()
}

async fn delete_session(
    State(s): State<Arc<Shared>>,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    let same_room = s.sessions().get(&id).is_some_and(|(r, _)| *r == room);
    if same_room && s.end_session(&id) {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::NOT_FOUND, "no such session\n").into_response()
    }
}

/// `Link` headers naming the ICE servers (RFC 9725 §4.4), TURN with its credentials.
fn link_headers(config: &HttpConfig) -> HeaderMap {
    let mut h = HeaderMap::new();
    for s in &config.ice_servers {
        let mut v = format!("<{}>; rel=\"ice-server\"", s.url);
        if let (Some(u), Some(c)) = (&s.username, &s.credential) {
            v.push_str(&format!(
                "; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                u.replace('"', ""),
                c.replace('"', "")
            ));
        }
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.append(header::LINK, v);
        }
    }
    h
}

/// The request must carry an SDP offer: `Content-Type: application/sdp`, a body that parses.
fn sdp_body(headers: &HeaderMap, body: &Bytes) -> Result<String, Box<Response>> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/sdp") {
        return Err(Box::new(
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                [(header::ACCEPT, "application/sdp")],
                "the offer must be sent as application/sdp\n",
            )
                .into_response(),
        ));
    }
    let sdp = std::str::from_utf8(body)
        .map_err(|_| Box::new(bad_request("the offer is not UTF-8")))?
        .to_owned();
    if !sdp.trim_start().starts_with("v=0")
        || webrtc::peer_connection::RTCSessionDescription::offer(sdp.clone()).is_err()
    {
        return Err(Box::new(bad_request("the offer is not a valid SDP")));
    }
    Ok(sdp)
}

fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
}

/// A session's id: random, unguessable (it is the capability to end the session).
fn session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A room name as one URL path segment.
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `201 Created` answer of a WHIP or WHEP offer.
fn created(config: &HttpConfig, kind: &str, room: &str, id: &str, answer: String) -> Response {
    let mut h = link_headers(config);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/{kind}/{}/{id}", encode_segment(room))) {
        h.insert(header::LOCATION, v);
    }
    (StatusCode::CREATED, h, answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_carry_turn_credentials() {
        let cfg = HttpConfig {
            ice_servers: vec![
                IceServer::stun("stun:127.0.0.1:3478"),
                IceServer::turn("turn:127.0.0.1:3478", "u", "p"),
            ],
            ..Default::default()
        };
        let h = link_headers(&cfg);
        let v: Vec<_> = h.get_all(header::LINK).iter().collect();
        assert_eq!(v[0], "<stun:127.0.0.1:3478>; rel=\"ice-server\"");
        assert!(
            v[1].to_str()
                .unwrap()
                .contains("username=\"u\"; credential=\"p\"")
        );
    }

    #[test]
    fn room_names_are_one_path_segment() {
        assert_eq!(encode_segment("stand up/1"), "stand%20up%2F1");
        assert_eq!(encode_segment("ok-room_1"), "ok-room_1");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn the_page_is_whole() {
        assert!(PAGE.starts_with("<!doctype html>"));
        for must in [
            "\"whep\"",
            "\"whip\"",
            "/api/status",
            "<svg",
            "getUserMedia",
            "Waterfall-Room-Password",
        ] {
            assert!(PAGE.contains(must), "page lacks {must}");
        }
        assert!(
            !PAGE.contains("https://"),
            "the page loads nothing from outside"
        );
    }
}
