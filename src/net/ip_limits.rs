//! Inbound connections per remote IP address, pending and established together.
//!
//! libp2p's `connection-limits` bounds connections in total, pending and per peer, but not per
//! address: one host opening raw TCP connections that never finish the handshake fills the
//! pending slots (1,024) and every honest dial is refused; with fresh peer ids per connection
//! it fills the established ones too. This behaviour refuses an inbound connection once its
//! remote IP holds [`super::NetConfig::max_connections_per_ip`] connections, before the
//! handshake costs anything. Relayed connections (`/p2p-circuit`) are not counted by the relay's
//! IP (every relayed peer would share it); the relay bounds its circuits itself.
//!
//! Every denial by any behaviour is followed by `ListenFailure`, every closed connection by
//! `ConnectionClosed`, so the counts stay exact.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    multiaddr::Protocol,
    swarm::{
        ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure,
        NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
    },
};

/// The reason a connection was denied.
#[derive(Debug, thiserror::Error)]
#[error("too many connections from {ip} (limit {limit})")]
pub struct IpLimitExceeded {
    pub ip: IpAddr,
    pub limit: u32,
}

pub(crate) struct IpLimits {
    limit: u32,
    by_conn: HashMap<ConnectionId, IpAddr>,
    by_ip: HashMap<IpAddr, u32>,
}

impl IpLimits {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit,
            by_conn: HashMap::new(),
            by_ip: HashMap::new(),
        }
    }

    fn release(&mut self, id: ConnectionId) {
        if let Some(ip) = self.by_conn.remove(&id)
            && let Some(n) = self.by_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// The remote IP of a direct connection (`None` for relayed or non-IP addresses).
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl NetworkBehaviour for IpLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let n = self.by_ip.entry(ip).or_default();
        if *n >= self.limit {
            return Err(ConnectionDenied::new(IpLimitExceeded {
                ip,
                limit: self.limit,
            }));
        }
        *n += 1;
        self.by_conn.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.release(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_per_ip_and_releases_on_failure_and_close() {
        let mut l = IpLimits::new(2);
        let local = addr("/ip4/127.0.0.1/tcp/1");
        let a = addr("/ip4/10.0.0.1/tcp/5000");
        let b = addr("/ip4/10.0.0.2/tcp/5000");
        let ids: Vec<ConnectionId> = (0..4).map(ConnectionId::new_unchecked).collect();
        assert!(
            l.handle_pending_inbound_connection(ids[0], &local, &a)
                .is_ok()
        );
        assert!(
            l.handle_pending_inbound_connection(ids[1], &local, &a)
                .is_ok()
        );
        assert!(
            l.handle_pending_inbound_connection(ids[2], &local, &a)
                .is_err()
        );
        assert!(
            l.handle_pending_inbound_connection(ids[3], &local, &b)
                .is_ok()
        );
        l.release(ids[0]);
        assert!(
            l.handle_pending_inbound_connection(ids[2], &local, &a)
                .is_ok()
        );
        // Relayed connections are not counted against the relay's address.
        let relayed = addr(
            "/ip4/10.0.0.1/tcp/5000/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        for i in 0..5 {
            assert!(
                l.handle_pending_inbound_connection(
                    ConnectionId::new_unchecked(100 + i),
                    &local,
                    &relayed
                )
                .is_ok()
            );
        }
        l.release(ids[1]);
        l.release(ids[2]);
        l.release(ids[3]);
        assert!(l.by_ip.is_empty() && l.by_conn.is_empty());
    }
}
