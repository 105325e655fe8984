//! The circuit relay server and client, guarded against crashes in libp2p-relay 0.22.
//!
//! The server gives a relayed connection (a circuit through another relay) a `dummy` handler,
//! since it serves nothing over one, but still keeps that connection in its table. When its
//! advertisement status changes — which we do whenever our reachability changes, serving only
//! while AutoNAT confirms a direct address ([`super::actor`]'s reach rules) — it sends `SetStatus`
//! to every connection in the table, and the `Either` handler of a relayed one reaches
//! `unreachable!()`: the whole node panics (rust-libp2p #5412 reports the same panic). It happened
//! here in the link lab, where viewers hold relayed connections when AutoNAT confirms them.
//!
//! [`RelayServer`] forwards everything to the server unchanged, but remembers which connections
//! are relayed (from the two `handle_established_*` calls, the same test the server makes) and
//! drops any notification the server addresses to one of them: the dummy handler has nothing to
//! configure. The set holds only open connections (removed when they close), so it is bounded by
//! the swarm's connection limit.

use std::collections::HashSet;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::relay;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};

/// [`relay::Behaviour`] that never notifies the handler of a relayed connection.
pub(crate) struct RelayServer {
    inner: relay::Behaviour,
    /// Open connections that are relayed (their handler is the server's `dummy`).
    relayed: HashSet<ConnectionId>,
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

impl RelayServer {
    pub(crate) fn new(inner: relay::Behaviour) -> Self {
        RelayServer {
            inner,
            relayed: HashSet::new(),
        }
    }

    /// See [`relay::Behaviour::set_status`].
    pub(crate) fn set_status(&mut self, status: Option<relay::Status>) {
        self.inner.set_status(status);
    }
}

impl NetworkBehaviour for RelayServer {
    type ConnectionHandler = <relay::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(local_addr) {
            self.relayed.insert(id);
        }
        self.inner
            .handle_established_inbound_connection(id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(addr) {
            self.relayed.insert(id);
        }
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = &event {
            self.relayed.remove(&c.connection_id);
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<relay::Event, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::NotifyHandler {
                    handler: NotifyHandler::One(id),
                    ..
                }) if self.relayed.contains(&id) => {
                    tracing::trace!(?id, "relay server: no status for a relayed connection");
                }
                other => return other,
            }
        }
    }
}

/// [`relay::client::Behaviour`] whose bookkeeping panics cannot take the node down.
///
/// libp2p-relay 0.22's client forgets a reservation's address when its listener closes (we close
/// relay listeners once a direct address is confirmed, see `actor/reach.rs`), but the
/// connection's handler may already have the relay's acceptance of that reservation (or of a
/// renewal) in flight; when it arrives, the client's `expect("Relay connection exist")` panics
/// and the whole process with it. Seen in the link lab (a viewer confirmed directly while its
/// relay answered). The panic is raised before the client changes any state, so the event is
/// simply one too late: [`RelayClient`] runs the client's event and swarm-event handlers under
/// `catch_unwind`, with the panic message kept off stderr, and reports a dropped event at debug
/// level. Every other call is forwarded unchanged.
pub(crate) struct RelayClient {
    inner: relay::client::Behaviour,
}

impl RelayClient {
    pub(crate) fn new(inner: relay::client::Behaviour) -> Self {
        RelayClient { inner }
    }
}

thread_local! {
    /// Set while a guarded call runs: its panic is expected and must not print.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic; the panic hook stays silent for it (other panics print as
/// before: the hook wraps whatever hook was installed first).
fn guarded(what: &str, f: impl FnOnce()) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    if r.is_err() {
        tracing::debug!("relay client: {what} for a reservation already given up was dropped");
    }
}

impl NetworkBehaviour for RelayClient {
    type ConnectionHandler = <relay::client::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = relay::client::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_inbound_connection(id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let inner = &mut self.inner;
        guarded("a swarm event", || inner.on_swarm_event(event));
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let inner = &mut self.inner;
        guarded("a relay's answer", || {
            inner.on_connection_handler_event(peer, id, event)
        });
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<relay::client::Event, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;

    /// A status change reaches the handler of a direct connection and never that of a relayed
    /// one (whose `dummy` handler would panic on it).
    #[test]
    fn a_status_change_skips_relayed_connections() {
        let me = PeerId::random();
        let mut s = RelayServer::new(relay::Behaviour::new(me, relay::Config::default()));
        s.set_status(Some(relay::Status::Disable));
        let direct: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let relayed: Multiaddr = format!(
            "/ip4/127.0.0.1/tcp/4002/p2p/{}/p2p-circuit",
            PeerId::random()
        )
        .parse()
        .unwrap();
        let (a, b) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        for (id, addr) in [(a, &direct), (b, &relayed)] {
            let peer = PeerId::random();
            s.handle_established_outbound_connection(
                id,
                peer,
                addr,
                Endpoint::Dialer,
                PortUse::New,
            )
            .unwrap();
            let endpoint = ConnectedPoint::Dialer {
                address: addr.clone(),
                role_override: Endpoint::Dialer,
                port_use: PortUse::New,
            };
            s.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: id,
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: 0,
            }));
        }
        s.set_status(Some(relay::Status::Enable));
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut notified = Vec::new();
        for _ in 0..10 {
            match s.poll(&mut cx) {
                Poll::Ready(ToSwarm::NotifyHandler {
                    handler: NotifyHandler::One(id),
                    ..
                }) => notified.push(id),
                Poll::Ready(_) => {}
                Poll::Pending => break,
            }
        }
        assert_eq!(notified, vec![a]);
    }

    /// A panic inside a guarded call is caught (and a later call still runs).
    #[test]
    fn a_panic_in_the_relay_client_is_contained() {
        let mut ran = false;
        guarded("a test event", || panic!("Relay connection exist"));
        guarded("a test event", || ran = true);
        assert!(ran);
    }
}
