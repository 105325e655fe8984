//! Building webrtc 0.21 peer connections and exchanging SDP as plain values.
//!
//! Signalling is non-trickle: the local description is taken once ICE gathering completes, or
//! at [`MediaConfig::gathering_deadline`], whichever comes first, so a blob is self-contained
//! (it can be sealed and put into the DHT as one record) and an unreachable STUN server delays
//! a join by the deadline at most (webrtc-rs waits ~11 s for it otherwise).
//!
//! Every connection gets webrtc's default interceptors (NACK generator and responder, RTCP
//! reports, TWCC receiver) plus [`KeyframeRequestForwarder`], which marks inbound PLI/FIR for
//! the application: that is the only way a relay learns that a child wants a keyframe. NACK is
//! tuned for a relay tree and offered for audio as well (see [`NACK_INTERVAL`]), and SRTP's
//! replay window is widened so late retransmissions are not discarded
//! ([`SRTP_REPLAY_WINDOW`]).
//!
//! ICE servers are typed ([`IceServer`]): a `stun:` URL, or a `turn:` URL with its username and
//! credential. [`MediaConfig::validate`] checks them once, up front, with webrtc-rs's own URL
//! rules, so a bad server is a clear error at start instead of a failure of every connection
//! (webrtc-rs refuses a whole configuration when one `turn:` URL lacks credentials). ICE
//! prefers host, then server-reflexive, then relayed candidate pairs by priority, so TURN
//! carries media only when no direct path works.
//!
//! What a user must see about ICE (a TURN server that gave no relay candidate, gathering cut
//! by the deadline, a connection whose checks all failed, and the path a connection took)
//! goes to [`MediaConfig::notices`] as [`IceNotice`]s, when the embedder asked for them.
//!
//! About 900 lines, a third of them tests: ICE servers and their checks, the interceptors, the
//! connection's setup and the classification of its path are the setup of one connection.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionState,
    RTCSdpType, RTCSessionDescription, Registry, SettingEngineBuilder,
};

/// One STUN or TURN server for ICE.
#[derive(Clone, PartialEq, Eq)]
pub struct IceServer {
    /// `stun:host[:port]` or `turn:host[:port][?transport=udp]`.
    pub url: String,
    /// TURN username (required for `turn:`).
    pub username: Option<String>,
    /// TURN credential (required for `turn:`); never printed.
    pub credential: Option<String>,
}

impl std::fmt::Debug for IceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceServer")
            .field("url", &self.url)
            .field("username", &self.username)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A server in [`MediaConfig::ice_servers`] that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IceConfigError {
    /// The URL does not parse as a STUN or TURN URL.
    #[error("ICE server {url:?} is not a valid stun: or turn: URL: {source}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// webrtc-rs's parse error.
        #[source]
        source: webrtc::error::Error,
    },
    /// A `turn:` URL without a username or credential.
    #[error("TURN server {url} needs a username and a credential")]
    MissingCredentials {
        /// The URL.
        url: String,
    },
    /// A kind of server this WebRTC stack cannot use.
    #[error("ICE server {url}: {why}")]
    Unsupported {
        /// The URL.
        url: String,
        /// Why it cannot be used.
        why: &'static str,
    },
}

impl IceServer {
    /// A STUN server (`stun:host:port`).
    pub fn stun(url: impl Into<String>) -> Self {
        IceServer {
            url: url.into(),
            username: None,
            credential: None,
        }
    }

    /// A TURN server (`turn:host:port`) with long-term credentials.
    pub fn turn(
        url: impl Into<String>,
        username: impl Into<String>,
        credential: impl Into<String>,
    ) -> Self {
        IceServer {
            url: url.into(),
            username: Some(username.into()),
            credential: Some(credential.into()),
        }
    }

    /// Whether this is a TURN server.
    pub fn is_turn(&self) -> bool {
        let u = self.url.to_ascii_lowercase();
        u.starts_with("turn:") || u.starts_with("turns:")
    }

    fn to_rtc(&self) -> RTCIceServer {
        RTCIceServer {
            urls: vec![self.url.clone()],
            username: self.username.clone().unwrap_or_default(),
            credential: self.credential.clone().unwrap_or_default(),
        }
    }

    /// Check the server with webrtc-rs's rules, and refuse what its TURN client skips
    /// silently (TLS and TCP transports): such a server would quietly never relay.
    pub fn validate(&self) -> Result<(), IceConfigError> {
        use rtc::ice::url::{ProtoType, SchemeType};
        let url = match rtc::ice::url::Url::parse_url(&self.url) {
            Ok(u) => u,
            Err(source) => {
                return Err(IceConfigError::BadUrl {
                    url: self.url.clone(),
                    source,
                });
            }
        };
        match url.scheme {
            SchemeType::Stun => Ok(()),
            SchemeType::Turn => {
                let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
                if empty(&self.username) || empty(&self.credential) {
                    return Err(IceConfigError::MissingCredentials {
                        url: self.url.clone(),
                    });
                }
                if url.proto != ProtoType::Udp {
                    return Err(IceConfigError::Unsupported {
                        url: self.url.clone(),
                        why: "only TURN over UDP is supported (use ?transport=udp)",
                    });
                }
                Ok(())
            }
            _ => Err(IceConfigError::Unsupported {
                url: self.url.clone(),
                why: "stuns: and turns: (TLS) are not supported; use stun: or turn:",
            }),
        }
    }
}

/// How a connection's media travels, from the types of the selected candidate pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IcePath {
    /// Host to host: same network, or a public address.
    Direct,
    /// Through a NAT mapping learnt from STUN or from the checks themselves (hole punched).
    HolePunched,
    /// Through a TURN relay.
    Turn,
    /// The stack did not say.
    Unknown,
}

impl std::fmt::Display for IcePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IcePath::Direct => "direct",
            IcePath::HolePunched => "hole-punched",
            IcePath::Turn => "turn",
            IcePath::Unknown => "unknown",
        })
    }
}

/// Something about ICE that a user should see.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IceNotice {
    /// A TURN server was configured but gave no relay candidate before gathering ended: it
    /// refused the credentials, or it cannot be reached.
    TurnUnavailable {
        /// The server's URL.
        url: String,
    },
    /// Gathering was cut by [`MediaConfig::gathering_deadline`]: a STUN or TURN server is slow
    /// or unreachable; the description went out with the candidates found so far.
    GatheringIncomplete {
        /// The deadline.
        after: Duration,
    },
    /// ICE connectivity checks failed: no candidate pair works between the two peers.
    Failed {
        /// Candidate types this side offered (`host`, `srflx`, `relay`).
        local: Vec<String>,
        /// Candidate types the other side offered.
        remote: Vec<String>,
    },
    /// Connected over this path.
    Connected {
        /// The path.
        path: IcePath,
    },
}

/// Where [`IceNotice`]s go: a bounded channel; notices are dropped when it is full.
#[derive(Clone, Debug)]
pub struct IceNotices(pub mpsc::Sender<IceNotice>);

impl PartialEq for IceNotices {
    fn eq(&self, other: &Self) -> bool {
        self.0.same_channel(&other.0)
    }
}

impl Eq for IceNotices {}

impl IceNotices {
    fn send(&self, n: IceNotice) {
        if self.0.try_send(n).is_err() {
            tracing::trace!("ICE notice dropped: the receiver is full or gone");
        }
    }
}

/// Settings of every peer connection a node makes: the defaults (loopback, no ICE servers, no
/// mDNS candidates), changed through the builder methods, e.g.
/// `MediaConfig::default().udp_bind(ip).ice_servers(servers)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    ice_servers: Vec<IceServer>,
    udp_bind: IpAddr,
    mdns_candidates: bool,
    gathering_deadline: Duration,
    notices: Option<IceNotices>,
}

impl MediaConfig {
    /// STUN and TURN servers. Empty in tests and on a LAN.
    pub fn ice_servers(mut self, servers: Vec<IceServer>) -> Self {
        self.ice_servers = servers;
        self
    }

    /// Local address the UDP sockets bind to. `127.0.0.1` (the default) for loopback tests;
    /// `0.0.0.0` gathers every interface but skips loopback.
    pub fn udp_bind(mut self, addr: IpAddr) -> Self {
        self.udp_bind = addr;
        self
    }

    /// Whether to use mDNS host candidates. Off by default: it joins a multicast group, which
    /// fails on loopback-only hosts ("No such device").
    pub fn mdns_candidates(mut self, on: bool) -> Self {
        self.mdns_candidates = on;
        self
    }

    /// Longest wait for ICE gathering before the description is sent as it is (2 s).
    pub fn gathering_deadline(mut self, deadline: Duration) -> Self {
        self.gathering_deadline = deadline;
        self
    }

    /// Where to report [`IceNotice`]s (nowhere by default).
    pub fn notices(mut self, notices: IceNotices) -> Self {
        self.notices = Some(notices);
        self
    }

    /// The address WebRTC's sockets are bound to (unspecified: every interface).
    pub fn bind_ip(&self) -> IpAddr {
        self.udp_bind
    }

    /// Check every ICE server (see [`IceServer::validate`]).
    pub fn validate(&self) -> Result<(), IceConfigError> {
        self.ice_servers.iter().try_for_each(IceServer::validate)
    }
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            ice_servers: Vec::new(),
            udp_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mdns_candidates: false,
            gathering_deadline: Duration::from_secs(2),
            notices: None,
        }
    }
}

/// Type of a session description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpKind {
    /// An offer.
    Offer,
    /// An answer.
    Answer,
}

/// A session description as plain data, for the signalling layer to carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalBlob {
    /// Offer or answer.
    #[serde(rename = "type")]
    pub kind: SdpKind,
    /// The SDP text, with all gathered candidates.
    pub sdp: String,
}

/// Largest SDP accepted from a peer.
pub const MAX_SDP_LEN: usize = 64 * 1024;

/// Errors of peer-connection handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// webrtc-rs reported an error.
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
    /// The blob is not of the expected type or is too large.
    #[error("bad signal blob: {0}")]
    BadBlob(&'static str),
    /// No local description after gathering.
    #[error("no local description")]
    NoLocalDescription,
    /// An unusable ICE server.
    #[error(transparent)]
    IceConfig(#[from] IceConfigError),
}

/// What a connection reports to its owner.
#[derive(Clone)]
pub enum PeerEvent {
    /// Connection state changed.
    State(RTCPeerConnectionState),
    /// A remote track opened.
    Track(Arc<dyn TrackRemote>),
    /// The remote opened a data channel.
    DataChannel(Arc<dyn DataChannel>),
}

impl std::fmt::Debug for PeerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEvent::State(s) => write!(f, "State({s})"),
            PeerEvent::Track(_) => f.write_str("Track"),
            PeerEvent::DataChannel(_) => f.write_str("DataChannel"),
        }
    }
}

/// How long a connection may stay silent while an ICE restart runs (a signalling round trip,
/// gathering from the new interfaces, connectivity checks) before its watchdog gives up on it.
pub const ICE_RESTART_QUIET: Duration = Duration::from_secs(4);

/// Capacity of a connection's event channel.
pub const PEER_EVENT_QUEUE: usize = 64;

struct Handler {
    gathered: watch::Sender<bool>,
    events: mpsc::Sender<PeerEvent>,
    /// Set once the connection exists: the ICE state handler reads stats and SDPs from it.
    pc: std::sync::OnceLock<std::sync::Weak<dyn PeerConnection>>,
    notices: Option<IceNotices>,
    /// Candidate types of the local and the remote description as exchanged, for a failure
    /// report (webrtc-rs's own descriptions lack the gathered candidates).
    candidates: std::sync::Mutex<(Vec<String>, Vec<String>)>,
}

impl Handler {
    /// Report the path of a connected pair, or the candidates of a failed one.
    async fn report_ice(&self, state: RTCPeerConnectionState) {
        let Some(notices) = &self.notices else { return };
        let Some(pc) = self.pc.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        match state {
            RTCPeerConnectionState::Connected => {
                // Not on the driver task that runs this callback: reading the transport needs
                // it, and the pair may be readable only a moment later.
                let notices = notices.clone();
                tokio::spawn(async move {
                    let mut path = IcePath::Unknown;
                    for _ in 0..PATH_TRIES {
                        path = selected_path(pc.as_ref()).await;
                        if path != IcePath::Unknown {
                            break;
                        }
                        tokio::time::sleep(PATH_RETRY).await;
                    }
                    notices.send(IceNotice::Connected { path });
                });
            }
            RTCPeerConnectionState::Failed => {
                let (local, remote) = self
                    .candidates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                notices.send(IceNotice::Failed { local, remote });
            }
            _ => {}
        }
    }
}

/// Reads of the selected pair after "connected" before the path is reported unknown.
const PATH_TRIES: usize = 10;
const PATH_RETRY: Duration = Duration::from_millis(100);

/// The path of the selected candidate pair, read from the ICE transport (reached through a
/// sender or a receiver: a viewer has only receivers, the root only senders).
async fn selected_path(pc: &dyn PeerConnection) -> IcePath {
    use webrtc::peer_connection::RTCIceCandidateType as T;
    let mut dtls = None;
    for s in pc.get_senders().await {
        if let Ok(Some(t)) = s.transport().await {
            dtls = Some(t);
            break;
        }
    }
    if dtls.is_none()
        && let Some(sctp) = pc.sctp().await
    {
        dtls = Some(sctp.transport());
    }
    if dtls.is_none() {
        for r in pc.get_receivers().await {
            if let Ok(Some(t)) = r.transport().await {
                dtls = Some(t);
                break;
            }
        }
    }
    let Some(dtls) = dtls else {
        return IcePath::Unknown;
    };
    let Ok(Some(pair)) = dtls.ice_transport().get_selected_candidate_pair().await else {
        return IcePath::Unknown;
    };
    match (pair.local().typ, pair.remote().typ) {
        (T::Relay, _) | (_, T::Relay) => IcePath::Turn,
        (T::Host, T::Host) => IcePath::Direct,
        (T::Unspecified, _) | (_, T::Unspecified) => IcePath::Unknown,
        _ => IcePath::HolePunched,
    }
}

/// Candidate types an SDP offers, each once, in order of appearance.
pub fn candidate_types(sdp: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in sdp.lines() {
        let Some(rest) = line.trim().strip_prefix("a=candidate:") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        while let Some(w) = it.next() {
            if w == "typ" {
                if let Some(t) = it.next()
                    && !out.iter().any(|o| o == t)
                {
                    out.push(t.to_owned());
                }
                break;
            }
        }
    }
    out
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.report_ice(state).await;
        // Awaited: state changes must not be lost; the owner drains this queue promptly.
        let _ = self.events.send(PeerEvent::State(state)).await;
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.events.send(PeerEvent::Track(track)).await;
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let _ = self.events.send(PeerEvent::DataChannel(dc)).await;
    }
}

/// One peer connection with its gathering state.
pub struct Peer {
    /// The connection.
    pub pc: Arc<dyn PeerConnection>,
    gathered: watch::Receiver<bool>,
    deadline: Duration,
    turn_urls: Vec<String>,
    notices: Option<IceNotices>,
    handler: Arc<Handler>,
    /// Milliseconds after [`heard_epoch`] plus one of the last inbound packet, 0 for none.
    heard: Arc<AtomicU64>,
    /// Milliseconds after [`heard_epoch`] until which silence is expected (an ICE restart is
    /// under way), 0 for none: see [`Peer::quiet_until`].
    quiet: AtomicU64,
}

/// The origin of the `heard` timestamps (an `Instant` does not fit an atomic).
fn heard_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Peer {
    /// Builds a connection; its events go to `events`.
    pub async fn new(
        config: &MediaConfig,
        events: mpsc::Sender<PeerEvent>,
    ) -> Result<Peer, PeerError> {
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry = media_interceptors(Registry::new(), &mut media_engine)?;
        // Application-most, so the NACK responder and the report interceptors see all RTCP.
        let heard = Arc::new(AtomicU64::new(0));
        let registry = registry.with(
            Slot::from(14_000),
            KeyframeRequestForwarder {
                heard: Some(Arc::clone(&heard)),
                ..Default::default()
            },
        );
        let mode = if config.mdns_candidates {
            rtc::ice::mdns::MulticastDnsMode::QueryAndGather
        } else {
            rtc::ice::mdns::MulticastDnsMode::Disabled
        };
        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(mode)
            .with_srtp_replay_protection_window(SRTP_REPLAY_WINDOW)
            // An ICE restart follows a network change: the sockets are bound again and the
            // candidates gathered afresh, from the interfaces there are now.
            .with_discard_local_candidates_during_ice_restart(true)
            .build();
        config.validate()?;
        let rtc_config = RTCConfigurationBuilder::new()
            .with_ice_servers(config.ice_servers.iter().map(IceServer::to_rtc).collect())
            .build();
        let (gtx, grx) = watch::channel(false);
        let handler = Arc::new(Handler {
            gathered: gtx,
            events,
            pc: std::sync::OnceLock::new(),
            notices: config.notices.clone(),
            candidates: std::sync::Mutex::new((Vec::new(), Vec::new())),
        });
        let pc = PeerConnectionBuilder::new()
            .with_configuration(rtc_config)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine)
            .with_handler(handler.clone() as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![SocketAddr::new(config.udp_bind, 0)])
            .build()
            .await?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let _ = handler.pc.set(Arc::downgrade(&pc));
        Ok(Peer {
            pc,
            gathered: grx,
            deadline: config.gathering_deadline,
            turn_urls: config
                .ice_servers
                .iter()
                .filter(|s| s.is_turn())
                .map(|s| s.url.clone())
                .collect(),
            notices: config.notices.clone(),
            handler,
            heard,
            quiet: AtomicU64::new(0),
        })
    }

    /// Silence from the other side is expected for `d` from now (an ICE restart is under way):
    /// a watchdog counts silence from then at the earliest.
    pub fn expect_quiet(&self, d: Duration) {
        let until = (Instant::now() + d).duration_since(heard_epoch());
        self.quiet
            .store(until.as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Until when silence is expected (see [`expect_quiet`](Self::expect_quiet)).
    pub fn quiet_until(&self) -> Option<Instant> {
        match self.quiet.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(heard_epoch() + Duration::from_millis(ms - 1)),
        }
    }

    /// The DTLS fingerprints of the other side's current description: a new offer with the
    /// same ones comes from the same connection (an ICE restart), not from a new one.
    pub async fn remote_fingerprints(&self) -> Vec<String> {
        match self.pc.current_remote_description().await {
            Some(d) => fingerprints(&d.sdp),
            None => Vec::new(),
        }
    }

    /// When the last RTP or RTCP packet arrived from the other side (`None`: none yet). A live
    /// sender reports every [`SENDER_REPORT_INTERVAL`] even without media, so a long silence
    /// means the other side is frozen, dead or cut off.
    pub fn heard_at(&self) -> Option<Instant> {
        match self.heard.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(heard_epoch() + Duration::from_millis(ms - 1)),
        }
    }

    fn note_candidates(&self, sdp: &str, local: bool) {
        let types = candidate_types(sdp);
        let mut c = self
            .handler
            .candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if local { c.0 = types } else { c.1 = types }
    }

    async fn local_blob(&self, kind: SdpKind) -> Result<SignalBlob, PeerError> {
        let mut g = self.gathered.clone();
        // Non-trickle with a deadline: gathering normally completes in milliseconds on a
        // host-only setup; the deadline covers unreachable STUN/TURN servers.
        let complete = tokio::time::timeout(self.deadline, g.wait_for(|done| *done))
            .await
            .is_ok();
        let desc = self
            .pc
            .local_description()
            .await
            .ok_or(PeerError::NoLocalDescription)?;
        self.note_candidates(&desc.sdp, true);
        if let Some(n) = &self.notices {
            if !complete {
                n.send(IceNotice::GatheringIncomplete {
                    after: self.deadline,
                });
            }
            // One relay candidate per TURN server at most; none means none of them relays.
            if !self.turn_urls.is_empty()
                && !candidate_types(&desc.sdp).iter().any(|t| t == "relay")
            {
                for url in &self.turn_urls {
                    n.send(IceNotice::TurnUnavailable { url: url.clone() });
                }
            }
        }
        Ok(SignalBlob {
            kind,
            sdp: desc.sdp,
        })
    }

    /// Creates an offer and returns it once gathered.
    pub async fn create_offer(&self) -> Result<SignalBlob, PeerError> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer).await?;
        self.local_blob(SdpKind::Offer).await
    }

    /// Restarts ICE (new credentials, sockets bound again, candidates gathered afresh) and
    /// returns the offer that carries the restart; the other side answers it with
    /// [`accept_restart`](Self::accept_restart). DTLS and the media streams are kept.
    pub async fn restart_offer(&self) -> Result<SignalBlob, PeerError> {
        self.handler.gathered.send_replace(false);
        self.pc.restart_ice().await?;
        self.create_offer().await
    }

    /// Answers an offer that restarts ICE on this (established) connection.
    pub async fn accept_restart(&self, offer: &SignalBlob) -> Result<SignalBlob, PeerError> {
        if fingerprints(&offer.sdp) != self.remote_fingerprints().await {
            return Err(PeerError::BadBlob("not an offer of this connection"));
        }
        self.handler.gathered.send_replace(false);
        self.accept_offer(offer).await
    }

    /// Applies a remote offer and returns the gathered answer.
    pub async fn accept_offer(&self, offer: &SignalBlob) -> Result<SignalBlob, PeerError> {
        check_blob(offer, SdpKind::Offer)?;
        self.note_candidates(&offer.sdp, false);
        let desc = RTCSessionDescription::offer(offer.sdp.clone())?;
        self.pc.set_remote_description(desc).await?;
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer).await?;
        self.local_blob(SdpKind::Answer).await
    }

    /// Applies the remote answer to our offer.
    pub async fn apply_answer(&self, answer: &SignalBlob) -> Result<(), PeerError> {
        check_blob(answer, SdpKind::Answer)?;
        self.note_candidates(&answer.sdp, false);
        let desc = RTCSessionDescription::answer(answer.sdp.clone())?;
        debug_assert_eq!(desc.sdp_type, RTCSdpType::Answer);
        self.pc.set_remote_description(desc).await?;
        Ok(())
    }

    /// Closes the connection (idempotent).
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// The `a=fingerprint` values of an SDP, sorted (session or media level alike).
fn fingerprints(sdp: &str) -> Vec<String> {
    let mut f: Vec<String> = sdp
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=fingerprint:"))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    f.sort();
    f.dedup();
    f
}

fn check_blob(b: &SignalBlob, kind: SdpKind) -> Result<(), PeerError> {
    if b.kind != kind {
        return Err(PeerError::BadBlob("unexpected SDP type"));
    }
    if b.sdp.len() > MAX_SDP_LEN {
        return Err(PeerError::BadBlob("SDP too large"));
    }
    Ok(())
}

/// NACK rounds per second: a missing packet is asked for again every interval until it arrives
/// or [`NACK_MAX_PER_PACKET`] asks were made. webrtc's default (100 ms, unlimited) repairs one
/// hop; down a relay tree a packet lost near the root is repaired hop by hop, and every round
/// a retransmission is itself lost costs an interval, so the interval is halved.
pub const NACK_INTERVAL: Duration = Duration::from_millis(50);
/// Asks per missing packet (with [`NACK_INTERVAL`], 1.5 s of asking): bounded, so a packet the
/// parent no longer holds is not asked for forever.
pub const NACK_MAX_PER_PACKET: u16 = 30;
/// Packets each side keeps for retransmission, per stream (a power of two): about 20 s of the
/// busiest stream at 800 kbit/s, far beyond the longest NACK chain.
const NACK_HISTORY: u16 = 2048;
/// Packets the receive log tracks for NACKs (a power of two; the generator's window).
const NACK_RECEIVE_LOG: u16 = 1024;
/// SRTP's replay window in packets. A retransmission keeps the original sequence number, and
/// one repaired two or three hops up arrives well after later packets: with SRTP's default
/// window (64 packets, ~1 s of video) it would be discarded as too old.
pub const SRTP_REPLAY_WINDOW: usize = 2048;

/// How often a sender reports (RTCP SR) on each stream it sends. A parent that is alive sends
/// these even when it has no media to forward (its own parent is gone, its source paused), so a
/// child can tell a parent that is silent because it starves from one that is frozen or dead
/// (see [`Peer::heard_at`]); webrtc's default is 1 s.
pub const SENDER_REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// The interceptors of every connection: webrtc's defaults (RTCP reports, the TWCC receiver,
/// the simulcast header extensions) with NACK generation and response tuned for a relay tree
/// ([`NACK_INTERVAL`], [`NACK_MAX_PER_PACKET`], [`NACK_HISTORY`]) and offered for audio too: an
/// Opus packet lost on one hop is as repairable as a video one, and a relay forwards whatever
/// it receives, retransmissions included, so a repair made near the root reaches every child.
fn media_interceptors(
    registry: Registry,
    media_engine: &mut MediaEngine,
) -> Result<Registry, PeerError> {
    use rtc::interceptor::{
        NackGeneratorBuilder, NackResponderBuilder, ReceiverReportBuilder, SenderReportBuilder,
    };
    use rtc::peer_connection::configuration::interceptor_registry as reg;
    use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RtpCodecKind};
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: String::new(),
            },
            kind,
        );
    }
    media_engine.register_feedback(
        RTCPFeedback {
            typ: "nack".to_owned(),
            parameter: "pli".to_owned(),
        },
        RtpCodecKind::Video,
    );
    let registry = registry
        .with(
            Slot::NackResponder,
            NackResponderBuilder::new().with_size(NACK_HISTORY).build(),
        )
        .with(
            Slot::NackGenerator,
            NackGeneratorBuilder::new()
                .with_size(NACK_RECEIVE_LOG)
                .with_interval(NACK_INTERVAL)
                .with_max_nacks_per_packet(NACK_MAX_PER_PACKET)
                .build(),
        );
    reg::configure_simulcast_extension_headers(media_engine)?;
    let registry = reg::configure_twcc_receiver_only(registry, media_engine)?;
    Ok(registry
        .with(Slot::ReceiverReport, ReceiverReportBuilder::new().build())
        .with(
            Slot::SenderReport,
            SenderReportBuilder::new()
                .with_interval(SENDER_REPORT_INTERVAL)
                .build(),
        ))
}

/// Marks inbound keyframe requests (PLI, FIR) for delivery to the application and drops other
/// inbound RTCP at this point (the interceptors below it have already acted on it). It also
/// notes when anything last arrived ([`Peer::heard_at`]).
#[derive(Default)]
pub struct KeyframeRequestForwarder {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    heard: Option<Arc<AtomicU64>>,
}

/// Bound on the forwarder's queues (each is drained by the chain right after it is filled).
const FORWARDER_QUEUE: usize = 1024;

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestForwarder {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Some(h) = &self.heard {
            let ms = msg.now.saturating_duration_since(heard_epoch()).as_millis() as u64;
            h.store(ms + 1, Ordering::Relaxed);
        }
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let wanted: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| {
                    let a = p.as_any();
                    a.is::<PictureLossIndication>() || a.is::<FullIntraRequest>()
                })
                .cloned()
                .collect();
            if wanted.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(wanted);
            msg.message.add(Attribute::DeliverToApplication);
        }
        if self.read.len() < FORWARDER_QUEUE {
            self.read.push_back(msg);
        }
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if self.write.len() < FORWARDER_QUEUE {
            self.write.push_back(msg);
        }
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for KeyframeRequestForwarder {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_servers_are_checked_up_front() {
        assert!(IceServer::stun("stun:203.0.113.10:3478").validate().is_ok());
        assert!(
            IceServer::turn("turn:203.0.113.10:3478?transport=udp", "u", "p")
                .validate()
                .is_ok()
        );
        assert!(matches!(
            IceServer::stun("turn:203.0.113.10:3478").validate(),
            Err(IceConfigError::MissingCredentials { .. })
        ));
        assert!(matches!(
            IceServer::turn("turn:203.0.113.10:3478", "u", "").validate(),
            Err(IceConfigError::MissingCredentials { .. })
        ));
        assert!(matches!(
            IceServer::turn("turns:203.0.113.10:5349", "u", "p").validate(),
            Err(IceConfigError::Unsupported { .. })
        ));
        assert!(matches!(
            IceServer::turn("turn:203.0.113.10:3478?transport=tcp", "u", "p").validate(),
            Err(IceConfigError::Unsupported { .. })
        ));
        assert!(matches!(
            IceServer::stun("http://example.org").validate(),
            Err(IceConfigError::BadUrl { .. })
        ));
        // The credential never shows in logs.
        let dbg = format!("{:?}", IceServer::turn("turn:h:1", "u", "s3cret"));
        assert!(!dbg.contains("s3cret"), "{dbg}");
        let cfg = MediaConfig::default().ice_servers(vec![
            IceServer::stun("stun:h:1"),
            IceServer::stun("turn:h:1"),
        ]);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn candidate_types_come_from_the_sdp() {
        let sdp = "v=0\r\na=candidate:1 1 udp 2130706431 192.168.1.2 5000 typ host\r\n\
                   a=candidate:2 1 udp 1694498815 203.0.113.101 5000 typ srflx raddr 0.0.0.0 rport 5000\r\n\
                   a=candidate:3 1 udp 2130706431 10.0.0.2 5001 typ host\r\n\
                   a=candidate:4 1 udp 16777215 203.0.113.10 49152 typ relay raddr 1.2.3.4 rport 1\r\n";
        assert_eq!(candidate_types(sdp), ["host", "srflx", "relay"]);
        assert!(candidate_types("v=0\r\n").is_empty());
    }
}
