//! The replay window: the digests of recent envelope signatures and signalling nonces, so a
//! replayed control message or exchange is refused; bounded, with first-in, first-out eviction.

use std::collections::{HashSet, VecDeque};

/// Remembered envelope signatures and nonces, per room.
pub const REPLAY_WINDOW_CAPACITY: usize = 4096;

/// Bounded memory of recent items (replay protection): a set with first-in, first-out eviction.
/// An envelope outlives its stay here only if more than the capacity arrive within its expiry;
/// expiry bounds replays beyond that.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    set: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new(REPLAY_WINDOW_CAPACITY)
    }
}

impl ReplayWindow {
    /// A window of `capacity` items.
    pub fn new(capacity: usize) -> Self {
        ReplayWindow {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True if `item` is new (and remembers it); false for a replay.
    pub fn insert(&mut self, item: [u8; 32]) -> bool {
        if !self.set.insert(item) {
            return false;
        }
        self.order.push_back(item);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }

    /// Items remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_is_bounded_and_detects_replays() {
        let mut s = ReplayWindow::new(64);
        assert!(s.insert([1; 32]));
        assert!(!s.insert([1; 32]));
        for i in 0..200u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 0xEE;
            assert!(s.insert(k));
        }
        assert_eq!(s.len(), 64);
        assert_eq!(s.set.len(), s.order.len());
        // The oldest fell out of the window; the newest are still there.
        assert!(s.insert([1; 32]));
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&199u32.to_le_bytes());
        k[31] = 0xEE;
        assert!(!s.insert(k));
    }
}
