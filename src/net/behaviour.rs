//! The composed libp2p behaviour and the swarm construction.
//!
//! Parameter choices (why, not what):
//! - the waterfall Kademlia is forced into server mode: nodes on loopback or behind NAT would
//!   otherwise stay clients and every query would fail in small networks;
//! - `StoreInserts::FilterBoth`: inbound puts are handed to the actor, which validates them
//!   ([`super::records`]) before storing it in a [`GuardedStore`] (own records apart, quotas on
//!   the others'); kad's own periodic publication is off because the actor republishes its own
//!   live records itself (and only those);
//! - AutoNAT v2 replaces v1: its server dials back from a fresh port, so a hole-punched or
//!   port-reused connection cannot fake reachability; every node also serves it (bounded by the
//!   crate: one dial-back at a time per request, and a client must pay in bytes to have an
//!   address other than its observed one tested);
//! - the relay server is present only when [`RelayMode`] is not `Off`; its advertisement
//!   status (whether it speaks the hop protocol at all) is set by the actor: always in `On`
//!   mode, in `Auto` mode only while a direct address is confirmed (the crate's own automatic
//!   rule would also count relayed addresses). Circuits carry tree control and signalling, so
//!   they are far larger and longer than the crate's 128 KiB / 2 min defaults, but bounded in
//!   number, size and duration;
//! - gossipsub mesh sizes 1/3/6 with `mesh_outbound_min` 0 so a room of two peers forms a mesh;
//!   flood publishing so a message reaches every subscribed neighbour even before the mesh
//!   settles; strict signing and manual validation so nothing is forwarded before the
//!   application accepted it.

use super::{
    ip_limits::IpLimits,
    relay_guard::{RelayClient, RelayServer},
    store::GuardedStore,
};
use std::time::Duration;

use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, allow_block_list, autonat, connection_limits, dcutr,
    gossipsub, identify,
    identity::Keypair,
    kad::{self, store::MemoryStore},
    mdns, noise, ping, relay,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
    tcp, yamux,
};

use super::{
    IDENTIFY_PROTOCOL_VERSION, MAX_GOSSIP_BYTES, MAX_RECORD_BYTES, NetConfig, NetError,
    PUBLIC_KAD_PROTOCOL, REQUEST_PROTOCOL, RelayMode, WATERFALL_KAD_PROTOCOL, codec::BytesCodec,
};

/// Kademlia queries give up after this long.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Request-response gives up after this long (handles usually time out earlier).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections without traffic stay open this long (gossip and kad need standing connections).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections per peer: one per transport, a DCUtR upgrade, and AutoNAT dial-backs (each a
/// new connection, which then idles until the idle timeout). A denied dial-back would read as
/// "not reachable".
const MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// Relay server: peers holding a reservation at once.
const RELAY_MAX_RESERVATIONS: usize = 128;
/// Relay server: relayed connections at once, and per peer.
const RELAY_MAX_CIRCUITS: usize = 64;
const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;
/// Relay server: one circuit lasts at most this long and carries at most this much; the peers
/// reconnect (or have hole-punched long before).
const RELAY_CIRCUIT_DURATION: Duration = Duration::from_secs(30 * 60);
const RELAY_CIRCUIT_BYTES: u64 = 32 * 1024 * 1024;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub limits: connection_limits::Behaviour,
    pub ip_limits: IpLimits,
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub autonat: autonat::v2::client::Behaviour,
    pub autonat_server: autonat::v2::server::Behaviour,
    pub relay: RelayClient,
    pub relay_server: Toggle<RelayServer>,
    pub dcutr: dcutr::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub kad: kad::Behaviour<GuardedStore>,
    pub public_kad: Toggle<kad::Behaviour<MemoryStore>>,
    pub gossipsub: gossipsub::Behaviour,
    pub rr: request_response::Behaviour<BytesCodec>,
}

fn gossip_config(config: &NetConfig) -> Result<gossipsub::Config, NetError> {
    gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .mesh_n_low(1)
        .mesh_n(3)
        .mesh_n_high(6)
        .mesh_outbound_min(0)
        .gossip_lazy(3)
        .flood_publish(true)
        .heartbeat_interval(config.gossip_heartbeat)
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()
        .map_err(|e| NetError::Build(format!("gossipsub config: {e}")))
}

fn waterfall_kad(keypair: &Keypair) -> kad::Behaviour<GuardedStore> {
    let peer_id = keypair.public().to_peer_id();
    let mut cfg = kad::Config::new(StreamProtocol::new(WATERFALL_KAD_PROTOCOL));
    cfg.set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_publication_interval(None)
        .set_query_timeout(KAD_QUERY_TIMEOUT)
        .set_record_ttl(Some(super::MAX_RECORD_LIFETIME))
        .set_max_packet_size(4 * MAX_RECORD_BYTES);
    let store = GuardedStore::new(peer_id);
    let mut kad = kad::Behaviour::with_config(peer_id, store, cfg);
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

fn public_kad(keypair: &Keypair) -> kad::Behaviour<MemoryStore> {
    let peer_id = keypair.public().to_peer_id();
    let mut cfg = kad::Config::new(StreamProtocol::new(PUBLIC_KAD_PROTOCOL));
    cfg.set_query_timeout(KAD_QUERY_TIMEOUT);
    // Value records of others are never accepted from the public DHT: we only provide.
    cfg.set_record_filtering(kad::StoreInserts::FilterBoth);
    let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), cfg);
    // Client until AutoNAT confirms a direct address (the actor switches it): kad's own rule
    // would also count relayed addresses, and a relayed server is a poor routing-table entry.
    kad.set_mode(Some(kad::Mode::Client));
    kad
}

/// The relay server, with our limits (the crate's rate limiters per peer and IP stay) and the
/// advertisement status of `mode`.
fn relay_server(peer_id: libp2p::PeerId, mode: RelayMode) -> RelayServer {
    let cfg = relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_CIRCUIT_DURATION,
        max_circuit_bytes: RELAY_CIRCUIT_BYTES,
        ..relay::Config::default()
    };
    let mut relay = relay::Behaviour::new(peer_id, cfg);
    relay.set_status(Some(if mode == RelayMode::On {
        relay::Status::Enable
    } else {
        relay::Status::Disable
    }));
    RelayServer::new(relay)
}

pub(crate) fn build_swarm(config: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let gossip_cfg = gossip_config(config)?;
    let relay_mode = config.relay;
    let autonat_cfg =
        autonat::v2::client::Config::default().with_probe_interval(config.autonat_interval);
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
        .with_max_pending_incoming(Some(config.max_connections))
        .with_max_pending_outgoing(Some(config.max_connections));
    let per_ip = config.max_connections_per_ip;
    let mdns_on = config.mdns;
    let public_on = config.public;
    let (max_req, max_resp) = (config.max_request_bytes, config.max_response_bytes);
    let make = move |key: &Keypair,
                     relay: relay::client::Behaviour|
          -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
        let peer_id = key.public().to_peer_id();
        let mdns = if mdns_on {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_cfg,
        )?;
        let codec = BytesCodec {
            max_request: max_req,
            max_response: max_resp,
        };
        let rr = request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(REQUEST_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
        );
        Ok(Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            ip_limits: IpLimits::new(per_ip),
            blocked: allow_block_list::Behaviour::default(),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.into(), key.public())
                    .with_agent_version(format!("waterfall/{}", env!("CARGO_PKG_VERSION")))
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::default(),
            autonat: autonat::v2::client::Behaviour::new(
                rand::make_rng::<rand::rngs::StdRng>(),
                autonat_cfg,
            ),
            autonat_server: autonat::v2::server::Behaviour::default(),
            relay: RelayClient::new(relay),
            relay_server: Toggle::from(
                (relay_mode != RelayMode::Off).then(|| relay_server(peer_id, relay_mode)),
            ),
            dcutr: dcutr::Behaviour::new(peer_id),
            mdns: Toggle::from(mdns),
            kad: waterfall_kad(key),
            public_kad: Toggle::from(public_on.then(|| public_kad(key))),
            gossipsub,
            rr,
        })
    };
    let base = SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Build(format!("tcp: {e}")))?
        .with_quic();
    // DNS names (the public bootstrap list is `/dnsaddr/...`) only with the public DHT: the
    // system resolver is read at start, and nothing else needs it.
    let swarm = if public_on {
        base.with_dns()
            .map_err(|e| NetError::Build(format!("dns: {e}")))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| NetError::Build(format!("relay client: {e}")))?
            .with_behaviour(make)
            .map_err(|e| NetError::Build(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
            .build()
    } else {
        base.with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| NetError::Build(format!("relay client: {e}")))?
            .with_behaviour(make)
            .map_err(|e| NetError::Build(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
            .build()
    };
    Ok(swarm)
}
