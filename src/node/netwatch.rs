//! Network changes: this host's interface addresses, watched so that media connections follow
//! a change (a laptop moving from one network to another, a DHCP lease renewed with a new
//! address, a VPN coming up) with an ICE restart instead of a repair.
//!
//! The watcher is `if-watch` (netlink on Linux, the platform's notifications elsewhere; the crate
//! libp2p's TCP and QUIC transports use to follow listen addresses). It reports every address
//! present at start, then every address added or removed. Loopback and link-local addresses do
//! not count (WebRTC's candidates never use them across hosts), nor does what arrives during the
//! first [`SETTLE`] (the initial list). Changes closer together than [`COALESCE`] count once: a
//! move is usually an address removed and another added a moment later, and one restart must
//! cover both. Each change increments a counter in a `watch` channel; room tasks wait on it
//! (a slow reader sees the latest count, never a queue of stale changes).
//!
//! Only a node whose WebRTC sockets are bound to every interface watches: one bound to a
//! single address (the library's loopback default) has no other path to move to.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

/// Events in the first moments come from the initial list of addresses, not from a change.
const SETTLE: Duration = Duration::from_millis(500);
/// Changes this close together are one change.
const COALESCE: Duration = Duration::from_millis(300);

/// A running watch of this host's addresses; stops when dropped.
pub(crate) struct Interfaces {
    changes: watch::Receiver<u64>,
    /// Held where nothing watches, so that receivers wait instead of seeing a closed channel.
    _idle: Option<watch::Sender<u64>>,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for Interfaces {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Interfaces {
    /// Watches the host's addresses when `bind` is unspecified (every interface); otherwise
    /// (or where the platform's watcher cannot start, which is logged) reports no change ever.
    pub(crate) fn watch(bind: IpAddr) -> Interfaces {
        let (tx, changes) = watch::channel(0u64);
        if !bind.is_unspecified() {
            return Interfaces {
                changes,
                _idle: Some(tx),
                task: None,
            };
        }
        let watcher = match if_watch::tokio::IfWatcher::new() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    "cannot watch network interfaces ({e}): after a network change, media \
                     connections are repaired, not restarted"
                );
                return Interfaces {
                    changes,
                    _idle: Some(tx),
                    task: None,
                };
            }
        };
        let task = tokio::spawn(run(watcher, tx)).abort_handle();
        Interfaces {
            changes,
            _idle: None,
            task: Some(task),
        }
    }

    /// A receiver of the change counter.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// Whether an address can carry media to another host.
fn counts(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

async fn run(mut watcher: if_watch::tokio::IfWatcher, tx: watch::Sender<u64>) {
    let start = tokio::time::Instant::now();
    let mut addrs = BTreeSet::new();
    let mut pending: Option<tokio::time::Instant> = None;
    loop {
        let flush = async {
            match pending {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = watcher.next() => {
                let changed = match ev {
                    Some(Ok(if_watch::IfEvent::Up(net))) => {
                        counts(net.addr()) && addrs.insert(net.addr())
                    }
                    Some(Ok(if_watch::IfEvent::Down(net))) => addrs.remove(&net.addr()),
                    Some(Err(e)) => {
                        tracing::debug!("network interface watch: {e}");
                        false
                    }
                    None => return,
                };
                if changed && start.elapsed() >= SETTLE && pending.is_none() {
                    pending = Some(tokio::time::Instant::now() + COALESCE);
                }
            }
            _ = flush => {
                pending = None;
                tracing::info!(addresses = ?addrs, "network changed: restarting ICE on media connections");
                tx.send_modify(|n| *n += 1);
                if tx.is_closed() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_that_reach_other_hosts_count() {
        assert!(counts("10.77.0.11".parse().unwrap()));
        assert!(counts("2001:db8::1".parse().unwrap()));
        assert!(!counts("127.0.0.1".parse().unwrap()));
        assert!(!counts("169.254.3.4".parse().unwrap()));
        assert!(!counts("::1".parse().unwrap()));
        assert!(!counts("fe80::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_node_bound_to_one_address_never_reports_a_change() {
        let w = Interfaces::watch("127.0.0.1".parse().unwrap());
        assert!(w.task.is_none());
        assert_eq!(*w.changes().borrow(), 0);
    }
}
