//! Reachability: which addresses others can dial, relays, bootstrap retries, hole punching.
//!
//! The algorithm, in the order things happen on a node behind a NAT:
//! 1. Bootstrap peers are dialled at start; a failed dial is announced
//!    ([`NetNotice::BootstrapFailed`]) and retried with exponential backoff (5 s .. 5 min), and a
//!    lost bootstrap connection is redialled the same way: a node that starts before its
//!    bootstrap peer, or outlives a restart of it, still joins.
//! 2. identify tells us the address each peer sees us at; the swarm turns those into address
//!    candidates, and AutoNAT v2 asks a peer to dial each one back from a fresh port. A pass
//!    makes it an external address (the swarm's confirmed list, which identify and Kademlia
//!    then advertise); a failure means a NAT or firewall filters unsolicited traffic.
//! 3. While no direct address is confirmed, the node reserves a slot on up to [`MAX_RELAYS`]
//!    bootstrap peers that speak the relay hop protocol (listening on
//!    `<relay addr>/p2p-circuit`). The relay client confirms the circuit address as external
//!    once the relay accepts. Refusals and losses are announced and retried with backoff.
//! 4. Once a direct address is confirmed, relay reservations are dropped, the public DHT
//!    switches to server mode, and (in [`RelayMode::Auto`]) the relay server starts to
//!    advertise the hop protocol (identify pushes the change to connected peers).
//! 5. DCUtR (a behaviour of its own) tries to upgrade every relayed connection; its outcome
//!    is announced.
//!
//! [`Reachability`] is derived, never stored apart from the swarm's confirmed addresses:
//! public if a direct one exists, relayed if only circuit ones do, behind NAT if AutoNAT saw a
//! dial-back fail, unknown otherwise.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::{
    Multiaddr, PeerId, autonat,
    core::transport::ListenerId,
    dcutr, identify,
    kad::Mode,
    multiaddr::Protocol,
    relay,
    swarm::{
        ConnectionId, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::{Actor, BehaviourEvent, peer_id_of};
use crate::net::{NetConfig, NetNotice, Reachability, RelayMode};

/// First retry of a failed bootstrap dial or relay reservation; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Relays a node behind a NAT reserves on at once.
pub(crate) const MAX_RELAYS: usize = 2;
/// Bootstrap addresses followed (more are ignored).
const MAX_BOOTSTRAP: usize = 64;

struct Bootstrap {
    addr: Multiaddr,
    peer: Option<PeerId>,
    /// When to dial again; `None` while connected or dialling.
    next: Option<Instant>,
    attempts: u32,
}

struct Relay {
    /// The relay's own address (with `/p2p/<relay>`); we listen on it + `/p2p-circuit`.
    addr: Multiaddr,
    listener: Option<ListenerId>,
    reserved: Option<Multiaddr>,
    next: Option<Instant>,
    attempts: u32,
}

pub(crate) struct Reach {
    mode: RelayMode,
    use_relays: bool,
    /// Whether our relay server advertises the hop protocol.
    serving: bool,
    notices: broadcast::Sender<NetNotice>,
    bootstrap: Vec<Bootstrap>,
    bootstrap_dials: HashMap<ConnectionId, usize>,
    bootstrap_connected: HashSet<PeerId>,
    relays: HashMap<PeerId, Relay>,
    reachability: Reachability,
    /// AutoNAT saw a dial-back to one of our direct candidates fail.
    nat_seen: bool,
    no_relay_told: bool,
}

fn backoff(attempts: u32) -> Duration {
    (RETRY_FIRST * 2u32.saturating_pow(attempts.saturating_sub(1).min(8))).min(RETRY_MAX)
}

/// Whether `addr` is a loopback address.
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// Whether `addr` goes through a relay.
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Reach {
    pub(crate) fn new(config: &NetConfig, notices: broadcast::Sender<NetNotice>) -> Self {
        Reach {
            mode: config.relay,
            use_relays: config.use_relays,
            serving: config.relay == RelayMode::On,
            notices,
            bootstrap: config
                .bootstrap
                .iter()
                .take(MAX_BOOTSTRAP)
                .map(|a| Bootstrap {
                    addr: a.clone(),
                    peer: peer_id_of(a),
                    next: Some(Instant::now()),
                    attempts: 0,
                })
                .collect(),
            bootstrap_dials: HashMap::new(),
            bootstrap_connected: HashSet::new(),
            relays: HashMap::new(),
            reachability: Reachability::Unknown,
            nat_seen: false,
            no_relay_told: false,
        }
    }

    pub(crate) fn reachability(&self) -> Reachability {
        self.reachability
    }

    pub(crate) fn serving(&self) -> bool {
        self.serving
    }

    pub(crate) fn reserved_relays(&self) -> Vec<PeerId> {
        self.relays
            .iter()
            .filter(|(_, r)| r.reserved.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    pub(super) fn tell(&self, n: NetNotice) {
        info!("{n}");
        // No receiver is fine: nobody asked.
        let _ = self.notices.send(n);
    }

    /// The relay whose reservation `listener` holds.
    fn relay_listening_on(&mut self, listener: ListenerId) -> Option<(&PeerId, &mut Relay)> {
        self.relays
            .iter_mut()
            .find(|(_, r)| r.listener == Some(listener))
    }

    fn is_bootstrap_peer(&self, peer: &PeerId) -> bool {
        self.bootstrap.iter().any(|b| b.peer.as_ref() == Some(peer))
    }
}

impl Actor {
    /// Addresses others can dial, best first (see [`crate::net::Net::addrs`]).
    pub(super) fn advertised_addrs(&self) -> Vec<Multiaddr> {
        let external: Vec<&Multiaddr> = self.swarm.external_addresses().collect();
        let mut out: Vec<Multiaddr> = external
            .iter()
            .filter(|a| !is_relayed(a))
            .chain(external.iter().filter(|a| is_relayed(a)))
            .map(|a| (*a).clone())
            .collect();
        for a in &self.listen_addrs {
            if !out.contains(a) && !is_relayed(a) {
                out.push(a.clone());
            }
        }
        // A loopback address is useless to anyone else; keep it only when it is all we have
        // (tests and the demo run on loopback).
        if out.iter().any(|a| !is_loopback(a)) {
            out.retain(|a| !is_loopback(a));
        }
        out
    }

    /// Dial the bootstrap addresses that are due.
    pub(super) fn dial_bootstrap(&mut self) {
        let now = Instant::now();
        for i in 0..self.reach.bootstrap.len() {
            let b = &self.reach.bootstrap[i];
            if b.next.is_none_or(|t| t > now) {
                continue;
            }
            if b.peer.is_some_and(|p| self.swarm.is_connected(&p)) {
                self.reach.bootstrap[i].next = None;
                continue;
            }
            let opts = match b.peer {
                // Always: one peer may be listed once per transport (TCP and QUIC), and each
                // connection teaches AutoNAT our address on that transport.
                Some(p) => DialOpts::peer_id(p)
                    .condition(PeerCondition::Always)
                    .addresses(vec![b.addr.clone()])
                    .build(),
                None => DialOpts::unknown_peer_id().address(b.addr.clone()).build(),
            };
            let id = opts.connection_id();
            let addr = b.addr.clone();
            self.reach.bootstrap[i].next = None;
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.reach.bootstrap_dials.insert(id, i);
                }
                Err(e) => self.bootstrap_failed(i, addr, e.to_string()),
            }
        }
    }

    fn bootstrap_failed(&mut self, i: usize, addr: Multiaddr, error: String) {
        let b = &mut self.reach.bootstrap[i];
        b.attempts = b.attempts.saturating_add(1);
        b.next = Some(Instant::now() + backoff(b.attempts));
        // Announce the first failures and then sparsely: a dead bootstrap peer must be
        // visible, but not flood the output.
        if b.attempts <= 2 || b.attempts.is_power_of_two() {
            warn!(%addr, %error, "bootstrap dial failed");
            self.reach.tell(NetNotice::BootstrapFailed { addr, error });
        }
    }

    pub(super) fn reach_housekeeping(&mut self) {
        self.dial_bootstrap();
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .reach
            .relays
            .iter()
            .filter(|(_, r)| r.listener.is_none() && r.next.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if self.reach.reachability == Reachability::Public {
                self.reach.relays.remove(&peer);
            } else {
                self.reserve(peer);
            }
        }
    }

    /// Listen through `peer` (already in `relays`).
    fn reserve(&mut self, peer: PeerId) {
        let Some(r) = self.reach.relays.get_mut(&peer) else {
            return;
        };
        r.next = None;
        let addr = r.addr.clone().with(Protocol::P2pCircuit);
        match self.swarm.listen_on(addr.clone()) {
            Ok(id) => {
                debug!(%peer, %addr, "reserving a relay slot");
                r.listener = Some(id);
            }
            Err(e) => {
                r.attempts = r.attempts.saturating_add(1);
                r.next = Some(Instant::now() + backoff(r.attempts));
                self.reach.tell(NetNotice::RelayFailed {
                    relay: peer,
                    error: e.to_string(),
                });
            }
        }
    }

    pub(super) fn reach_on_identify(&mut self, peer: PeerId, info: &identify::Info) {
        let hop = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
        debug!(%peer, hop, observed = %info.observed_addr, "identified");
        if !self.reach.use_relays
            || !hop
            || self.reach.reachability == Reachability::Public
            || self.reach.relays.contains_key(&peer)
            || self.reach.relays.len() >= MAX_RELAYS
        {
            return;
        }
        let Some(addr) = self
            .reach
            .bootstrap
            .iter()
            .find(|b| b.peer == Some(peer))
            .map(|b| b.addr.clone())
        else {
            return;
        };
        let addr = if peer_id_of(&addr).is_some() {
            addr
        } else {
            addr.with(Protocol::P2p(peer))
        };
        self.reach.relays.insert(
            peer,
            Relay {
                addr,
                listener: None,
                reserved: None,
                next: None,
                attempts: 0,
            },
        );
        self.reserve(peer);
    }

    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            renewal: false,
            ..
        } = ev
            && let Some(r) = self.reach.relays.get_mut(&relay_peer_id)
        {
            r.attempts = 0;
        }
    }

    pub(super) fn on_autonat(&mut self, ev: autonat::v2::client::Event) {
        match &ev.result {
            Ok(()) => debug!(addr = %ev.tested_addr, server = %ev.server, "AutoNAT: reachable"),
            Err(e) => {
                debug!(addr = %ev.tested_addr, server = %ev.server, error = %e, "AutoNAT: not reachable");
                // Only a direct IP address that failed says something about a NAT (a
                // relayed or bare `/p2p` candidate does not).
                let ip = matches!(
                    ev.tested_addr.iter().next(),
                    Some(Protocol::Ip4(_) | Protocol::Ip6(_))
                );
                if ip && !is_relayed(&ev.tested_addr) {
                    self.reach.nat_seen = true;
                    self.update_reachability();
                }
            }
        }
    }

    pub(super) fn on_dcutr(&mut self, ev: dcutr::Event) {
        match ev.result {
            Ok(_) => self.reach.tell(NetNotice::HolePunched {
                peer: ev.remote_peer_id,
            }),
            Err(e) => self.reach.tell(NetNotice::HolePunchFailed {
                peer: ev.remote_peer_id,
                error: e.to_string(),
            }),
        }
    }

    /// Bookkeeping that looks at swarm events before the actor's own handling.
    pub(super) fn reach_on_swarm_event(&mut self, ev: &SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let dialled = self.reach.bootstrap_dials.remove(connection_id);
                if let Some(i) = dialled {
                    let b = &mut self.reach.bootstrap[i];
                    b.attempts = 0;
                    b.next = None;
                    b.peer.get_or_insert(*peer_id);
                }
                if (dialled.is_some() || self.reach.is_bootstrap_peer(peer_id))
                    && self.reach.bootstrap_connected.insert(*peer_id)
                {
                    self.reach.tell(NetNotice::BootstrapConnected {
                        peer: *peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if self.reach.bootstrap_connected.remove(peer_id) => {
                // A lost bootstrap peer is redialled (a restart of it must not strand us).
                for b in &mut self.reach.bootstrap {
                    if b.peer == Some(*peer_id) && b.next.is_none() {
                        b.attempts = b.attempts.saturating_add(1);
                        b.next = Some(Instant::now() + backoff(b.attempts));
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(i) = self.reach.bootstrap_dials.remove(connection_id) {
                    let addr = self.reach.bootstrap[i].addr.clone();
                    self.bootstrap_failed(i, addr, error.to_string());
                }
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                // A forced relay (`RelayMode::On`) is public by its operator's word: its own
                // addresses are what reservations hand out (a relay with no external address
                // can only refuse them), so they count as confirmed.
                if self.reach.mode == RelayMode::On && !is_relayed(address) && !is_loopback(address)
                {
                    self.confirm_external(address.clone());
                }
                let relay = self.reach.relay_listening_on(*listener_id);
                if let Some((peer, r)) = relay {
                    // One listener reserves over each connection to the relay (TCP, QUIC):
                    // announce the first.
                    if r.reserved.replace(address.clone()).is_none() {
                        let (peer, addr) = (*peer, address.clone());
                        self.reach
                            .tell(NetNotice::RelayReserved { relay: peer, addr });
                    }
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let public = self.reach.reachability == Reachability::Public;
                let relay = self.reach.relay_listening_on(*listener_id);
                if let Some((peer, r)) = relay {
                    let peer = *peer;
                    r.listener = None;
                    r.reserved = None;
                    if public {
                        // We closed it ourselves: no longer needed.
                        self.reach.relays.remove(&peer);
                    } else {
                        r.attempts = r.attempts.saturating_add(1);
                        r.next = Some(Instant::now() + backoff(r.attempts));
                        let error = match reason {
                            Ok(()) => "reservation ended".to_owned(),
                            Err(e) => e.to_string(),
                        };
                        self.reach
                            .tell(NetNotice::RelayFailed { relay: peer, error });
                    }
                    self.update_reachability();
                }
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                debug!(%address, "address candidate");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                self.reach
                    .tell(NetNotice::AddressConfirmed(address.clone()));
                self.update_reachability();
                self.public_addresses_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                self.reach.tell(NetNotice::AddressExpired(address.clone()));
                self.update_reachability();
                self.public_addresses_changed();
            }
            _ => {}
        }
    }

    /// Confirm an address we know to be reachable (configured, or a forced relay's own); the
    /// swarm reports no event for these, so announce it here.
    pub(super) fn confirm_external(&mut self, addr: Multiaddr) {
        if self.swarm.external_addresses().any(|a| *a == addr) {
            return;
        }
        self.swarm.add_external_address(addr.clone());
        self.reach.tell(NetNotice::AddressConfirmed(addr));
        self.update_reachability();
        self.public_addresses_changed();
    }

    /// Derive reachability from the confirmed addresses and act on a change.
    fn update_reachability(&mut self) {
        let (mut direct, mut relayed) = (false, false);
        for a in self.swarm.external_addresses() {
            if is_relayed(a) {
                relayed = true;
            } else {
                direct = true;
            }
        }
        let r = if direct {
            Reachability::Public
        } else if relayed {
            Reachability::Relayed
        } else if self.reach.nat_seen {
            Reachability::BehindNat
        } else {
            Reachability::Unknown
        };
        let serve = r == Reachability::Public;
        if self.reach.mode == RelayMode::Auto
            && self.reach.serving != serve
            && let Some(server) = self.swarm.behaviour_mut().relay_server.as_mut()
        {
            server.set_status(Some(if serve {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
            self.reach.serving = serve;
            info!(serving = serve, "relay server");
        }
        if r == self.reach.reachability {
            return;
        }
        self.reach.reachability = r;
        self.reach.tell(NetNotice::Reachability(r));
        let public = r == Reachability::Public;
        if let Some(k) = self.swarm.behaviour_mut().public_kad.as_mut() {
            // Only a node others can dial may serve the public DHT: a client-mode node is not
            // added to others' routing tables, so it does not turn into a dead entry.
            k.set_mode(Some(if public { Mode::Server } else { Mode::Client }));
        }
        if public {
            // Directly reachable: relay slots are no longer needed.
            let listeners: Vec<ListenerId> = self
                .reach
                .relays
                .values()
                .filter_map(|r| r.listener)
                .collect();
            for l in listeners {
                self.swarm.remove_listener(l);
            }
        }
        if r == Reachability::BehindNat && self.reach.relays.is_empty() && !self.reach.no_relay_told
        {
            self.reach.no_relay_told = true;
            self.reach.tell(NetNotice::NoRelay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_cap() {
        assert_eq!(backoff(1), RETRY_FIRST);
        assert_eq!(backoff(2), RETRY_FIRST * 2);
        assert_eq!(backoff(3), RETRY_FIRST * 4);
        assert_eq!(backoff(30), RETRY_MAX);
        assert!((1..40).all(|n| backoff(n) <= backoff(n + 1)));
    }

    #[test]
    fn relayed_and_loopback_addresses_are_told_apart() {
        let relayed: Multiaddr = "/ip4/203.0.113.10/tcp/4001/p2p/12D3KooWD4B1Q8JCLcpiUXYW5mkyyMQtaoiv1bT3xZEwYdz5Bx7K/p2p-circuit"
            .parse()
            .unwrap();
        let direct: Multiaddr = "/ip4/203.0.113.10/tcp/4001".parse().unwrap();
        let lo: Multiaddr = "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap();
        assert!(is_relayed(&relayed) && !is_relayed(&direct));
        assert!(is_loopback(&lo) && !is_loopback(&direct));
    }
}
