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

use libp2p::Multiaddr;
use tokio::sync::watch;
use tokio::time::Instant;

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
