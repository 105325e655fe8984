//! Building webrtc 0.21 peer connections and exchanging SDP as plain values.
//!
//! Signalling is non-trickle: the local description is taken once ICE gathering completes, or
//! at [`MediaConfig::gathering_deadline`], whichever comes first, so a blob is self-contained
//! (it can be sealed and put into the DHT as one record) and an unreachable STUN server delays
//! a join by the deadline at most (webrtc-rs waits ~11 s for it otherwise).
//!
//! Every connection gets the default interceptors (NACK generator and responder, RTCP
//! reports, TWCC receiver) plus [`KeyframeRequestForwarder`], which marks inbound PLI/FIR for
//! the application: that is the only way a relay learns that a child wants a keyframe.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
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
    register_default_interceptors,
};

/// Settings of every peer connection a node makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// STUN/TURN URLs (`stun:host:port`). Empty in tests and on a LAN.
    pub ice_servers: Vec<String>,
    /// Local address the UDP sockets bind to. `127.0.0.1` for loopback tests; `0.0.0.0` gathers
    /// every interface but skips loopback.
    pub udp_bind: IpAddr,
    /// Whether to use mDNS host candidates. Off by default: it joins a multicast group, which
    /// fails on loopback-only hosts ("No such device").
    pub mdns_candidates: bool,
    /// Longest wait for ICE gathering before the description is sent as it is.
    pub gathering_deadline: Duration,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            ice_servers: Vec::new(),
            udp_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mdns_candidates: false,
            gathering_deadline: Duration::from_secs(2),
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

/// Capacity of a connection's event channel.
pub const PEER_EVENT_QUEUE: usize = 64;

struct Handler {
    gathered: watch::Sender<bool>,
    events: mpsc::Sender<PeerEvent>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
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
}

impl Peer {
    /// Builds a connection; its events go to `events`.
    pub async fn new(
        config: &MediaConfig,
        events: mpsc::Sender<PeerEvent>,
    ) -> Result<Peer, PeerError> {
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        // Application-most, so the NACK responder and the report interceptors see all RTCP.
        let registry = registry.with(Slot::from(14_000), KeyframeRequestForwarder::default());
        let mode = if config.mdns_candidates {
            rtc::ice::mdns::MulticastDnsMode::QueryAndGather
        } else {
            rtc::ice::mdns::MulticastDnsMode::Disabled
        };
        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(mode)
            .build();
        let rtc_config = RTCConfigurationBuilder::new()
            .with_ice_servers(if config.ice_servers.is_empty() {
                vec![]
            } else {
                vec![RTCIceServer {
                    urls: config.ice_servers.clone(),
                    ..Default::default()
                }]
            })
            .build();
        let (gtx, grx) = watch::channel(false);
        let handler = Arc::new(Handler {
            gathered: gtx,
            events,
        });
        let pc = PeerConnectionBuilder::new()
            .with_configuration(rtc_config)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine)
            .with_handler(handler as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![SocketAddr::new(config.udp_bind, 0)])
            .build()
            .await?;
        Ok(Peer {
            pc: Arc::new(pc),
            gathered: grx,
            deadline: config.gathering_deadline,
        })
    }

    async fn local_blob(&self, kind: SdpKind) -> Result<SignalBlob, PeerError> {
        let mut g = self.gathered.clone();
        // Non-trickle with a deadline: gathering normally completes in milliseconds on a
        // host-only setup; the deadline covers unreachable STUN/TURN servers.
        let _ = tokio::time::timeout(self.deadline, g.wait_for(|done| *done)).await;
        let desc = self
            .pc
            .local_description()
            .await
            .ok_or(PeerError::NoLocalDescription)?;
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

    /// Applies a remote offer and returns the gathered answer.
    pub async fn accept_offer(&self, offer: &SignalBlob) -> Result<SignalBlob, PeerError> {
        check_blob(offer, SdpKind::Offer)?;
        let desc = RTCSessionDescription::offer(offer.sdp.clone())?;
        self.pc.set_remote_description(desc).await?;
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer).await?;
        self.local_blob(SdpKind::Answer).await
    }

    /// Applies the remote answer to our offer.
    pub async fn apply_answer(&self, answer: &SignalBlob) -> Result<(), PeerError> {
        check_blob(answer, SdpKind::Answer)?;
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

fn check_blob(b: &SignalBlob, kind: SdpKind) -> Result<(), PeerError> {
    if b.kind != kind {
        return Err(PeerError::BadBlob("unexpected SDP type"));
    }
    if b.sdp.len() > MAX_SDP_LEN {
        return Err(PeerError::BadBlob("SDP too large"));
    }
    Ok(())
}

/// Marks inbound keyframe requests (PLI, FIR) for delivery to the application and drops other
/// inbound RTCP at this point (the interceptors below it have already acted on it).
#[derive(Default)]
pub struct KeyframeRequestForwarder {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
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
