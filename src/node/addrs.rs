//! Following this node's dialable addresses, so that a broadcaster's room record and ticket
//! follow them.
//!
//! The room record is refreshed every [`super::ROOM_REFRESH`] anyway; but a node behind a NAT
//! learns how it can be reached only after it started (AutoNAT confirms an address, a relay
//! grants a slot, a relay is lost and another one takes over), and a viewer that finds a record
//! naming yesterday's relay cannot join for up to that long. So the broadcaster republishes as
//! soon as [`crate::net::Net::addrs_watch`] changes, and tells the application the new ticket
//! ([`crate::RoomEvent::TicketChanged`]). A flapping relay must not turn this into a put per
//! event: changes are coalesced to at most one per [`ADDR_REPUBLISH_MIN`], and a change that
//! ends where the last published set was is no change at all.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use tokio::sync::watch;
use tokio::time::Instant;

/// Addresses of a ticket or room record dialled at most (the rest are ignored).
pub const MAX_DIAL_ADDRS: usize = 8;
/// Dials of a ticket's or record's addresses in flight at once.
const DIAL_CONCURRENCY: usize = 4;
/// How long one such dial may take: a crafted address that never answers cannot stall a
/// viewer.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `addr`, taken from a ticket or a room record that names `peer`, is worth dialling:
/// an IP or DNS address over TCP or QUIC (or a relayed one), that names `peer` (or no peer at
/// all: `peer` is then appended, so the dial reaches that peer or fails). A stranger's
/// address (another `/p2p/` id) would make a viewer dial hosts of the ticket writer's choice.
pub(crate) fn dialable(addr: &str, peer: PeerId) -> Option<Multiaddr> {
    let addr: Multiaddr = addr.parse().ok()?;
    let mut host = false;
    let mut transport = false;
    let mut named = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(_)
            | Protocol::Ip6(_)
            | Protocol::Dns(_)
            | Protocol::Dns4(_)
            | Protocol::Dns6(_)
            | Protocol::Dnsaddr(_) => host = true,
            Protocol::Tcp(_) | Protocol::QuicV1 | Protocol::P2pCircuit => transport = true,
            // The last `/p2p/` is the peer the address reaches (a relayed address names the
            // relay first).
            Protocol::P2p(id) => named = Some(id),
            _ => {}
        }
    }
    if !(host && transport) {
        return None;
    }
    match named {
        Some(id) if id == peer => Some(addr),
        Some(_) => None,
        None => addr.with_p2p(peer).ok(),
    }
}

/// Dial the sensible ones among `addrs` (see [`dialable`]), at most [`MAX_DIAL_ADDRS`], a few
/// at a time, each bounded by a timeout; returns whether one connected.
pub(crate) async fn dial_all(net: &crate::net::Net, addrs: &[String], peer: PeerId) -> bool {
    let good: Vec<Multiaddr> = addrs
        .iter()
        .filter_map(|a| dialable(a, peer))
        .take(MAX_DIAL_ADDRS)
        .collect();
    futures::stream::iter(good)
        .map(|a| async move {
            matches!(
                tokio::time::timeout(DIAL_TIMEOUT, net.dial(a)).await,
                Ok(Ok(_))
            )
        })
        .buffer_unordered(DIAL_CONCURRENCY)
        .fold(false, |any, ok| async move { any || ok })
        .await
}

/// Shortest time between two republications caused by address changes.
pub const ADDR_REPUBLISH_MIN: Duration = Duration::from_secs(3);

/// The changes of one node's addresses, coalesced (see the module docs).
pub(crate) struct AddrChanges {
    rx: watch::Receiver<Vec<Multiaddr>>,
    /// The set last handed out (the one published).
    last: Vec<Multiaddr>,
    last_at: Option<Instant>,
    /// [`ADDR_REPUBLISH_MIN`] (shorter in tests).
    spacing: Duration,
    /// A change was seen and not handed out yet (kept here, so that a `select!` that drops
    /// [`AddrChanges::next`] while it waits loses nothing).
    pending: bool,
}

impl AddrChanges {
    /// Follows `rx`, from its current value on: only later changes count.
    pub(crate) fn new(rx: watch::Receiver<Vec<Multiaddr>>) -> Self {
        Self::with_spacing(rx, ADDR_REPUBLISH_MIN)
    }

    fn with_spacing(mut rx: watch::Receiver<Vec<Multiaddr>>, spacing: Duration) -> Self {
        let last = rx.borrow_and_update().clone();
        AddrChanges {
            rx,
            last,
            last_at: None,
            spacing,
            pending: false,
        }
    }

    /// The next changed set of addresses, at most one per [`ADDR_REPUBLISH_MIN`]. Never
    /// returns once the network actor is gone. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Vec<Multiaddr> {
        loop {
            if !self.pending {
                if self.rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                self.pending = true;
            }
            if let Some(t) = self.last_at {
                tokio::time::sleep_until(t + self.spacing).await;
            }
            self.pending = false;
            let now = self.rx.borrow_and_update().clone();
            if now == self.last {
                continue;
            }
            self.last = now.clone();
            self.last_at = Some(Instant::now());
            return now;
        }
    }
}

/// [`AddrChanges::next`] of a room that follows its addresses; never returns for one that
/// does not (a viewer).
pub(crate) async fn next_change(changes: &mut Option<AddrChanges>) -> Vec<Multiaddr> {
    match changes {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_of_the_named_peer_over_real_transports_are_dialled() {
        let peer = crate::crypto::Identity::generate().peer_id();
        let other = crate::crypto::Identity::generate().peer_id();
        let with = |a: &str| format!("{a}/p2p/{peer}");
        assert!(dialable(&with("/ip4/127.0.0.1/tcp/4001"), peer).is_some());
        assert!(dialable(&with("/ip6/::1/udp/4001/quic-v1"), peer).is_some());
        // No peer id: ours is appended.
        assert_eq!(
            dialable("/ip4/10.0.0.1/tcp/1", peer).unwrap(),
            with("/ip4/10.0.0.1/tcp/1").parse::<Multiaddr>().unwrap()
        );
        // A relayed address names the relay, then the peer.
        let relayed = format!("/ip4/10.0.0.1/tcp/1/p2p/{other}/p2p-circuit/p2p/{peer}");
        assert!(dialable(&relayed, peer).is_some());
        // Someone else's address, no transport, garbage.
        assert!(dialable(&format!("/ip4/10.0.0.1/tcp/1/p2p/{other}"), peer).is_none());
        assert!(dialable("/ip4/10.0.0.1", peer).is_none());
        assert!(dialable("/ip4/10.0.0.1/udp/1", peer).is_none());
        assert!(dialable("not an address", peer).is_none());
    }

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const SPACING: Duration = Duration::from_millis(300);
    /// Long enough to tell "nothing comes" on a busy machine, short against the spacing's use.
    const QUIET: Duration = Duration::from_millis(700);

    #[tokio::test]
    async fn changes_are_coalesced_and_spaced() {
        let (tx, rx) = watch::channel(vec![a("/ip4/127.0.0.1/tcp/1")]);
        let mut c = AddrChanges::with_spacing(rx, SPACING);
        // The value at the start is not a change.
        assert!(tokio::time::timeout(QUIET, c.next()).await.is_err());
        tx.send_replace(vec![a("/ip4/203.0.113.5/tcp/1")]);
        let t0 = Instant::now();
        assert_eq!(c.next().await, vec![a("/ip4/203.0.113.5/tcp/1")]);
        assert!(
            t0.elapsed() < SPACING,
            "the first change is handed out at once"
        );
        // Three changes in a burst: one result, the last, not before the spacing.
        tx.send_replace(vec![a("/ip4/203.0.113.6/tcp/1")]);
        tx.send_replace(vec![a("/ip4/203.0.113.7/tcp/1")]);
        tx.send_replace(vec![a("/ip4/203.0.113.8/tcp/1")]);
        assert_eq!(c.next().await, vec![a("/ip4/203.0.113.8/tcp/1")]);
        assert!(t0.elapsed() >= SPACING);
        // Dropped while waiting out the spacing (as a `select!` does): the change survives.
        tx.send_replace(vec![a("/ip4/203.0.113.9/tcp/1")]);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), c.next())
                .await
                .is_err()
        );
        assert_eq!(c.next().await, vec![a("/ip4/203.0.113.9/tcp/1")]);
        // A change and its reversal: nothing to hand out.
        tx.send_replace(vec![a("/ip4/203.0.113.10/tcp/1")]);
        tx.send_replace(vec![a("/ip4/203.0.113.9/tcp/1")]);
        assert!(tokio::time::timeout(QUIET, c.next()).await.is_err());
        // The actor gone: never returns.
        drop(tx);
        assert!(tokio::time::timeout(QUIET, c.next()).await.is_err());
    }
}
