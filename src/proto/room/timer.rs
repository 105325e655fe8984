//! The room layer's timers as data: one [`RoomTimer`] per deadline, in a table whose earliest
//! entry the room merges with the tree's own deadline (so the shell keeps one wake-up).

use std::collections::BTreeMap;

use super::super::{Millis, NodeId};

/// The room layer's deadlines, one entry each in the timer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoomTimer {
    /// An accepted child must have connected its media by now.
    ChildConnect(NodeId),
    /// The media connection to this new parent must be up by now.
    ParentConnect(NodeId),
    /// A probed neighbour must have answered by now.
    Probe(NodeId),
    /// The snapshot request in flight must have been answered by now.
    Snapshot,
    /// Check the room record again (while orphaned).
    RecordCheck,
}

/// Pending deadlines. Bounded: one per accepted child (the tree bounds those by its capacity,
/// plus one during a promotion), one per probed neighbour (parent and children), one for the parent being connected, two
/// more.
#[derive(Clone, Debug, Default)]
pub(super) struct TimerTable {
    at: BTreeMap<RoomTimer, Millis>,
}

impl TimerTable {
    pub(super) fn set(&mut self, t: RoomTimer, when: Millis) {
        self.at.insert(t, when);
    }
    /// Whether it was armed.
    pub(super) fn cancel(&mut self, t: RoomTimer) -> bool {
        self.at.remove(&t).is_some()
    }
    pub(super) fn is_armed(&self, t: RoomTimer) -> bool {
        self.at.contains_key(&t)
    }
    pub(super) fn next(&self) -> Option<Millis> {
        self.at.values().min().copied()
    }
    /// Removes and returns the timers due at `now`, earliest first (ties in timer order).
    pub(super) fn take_due(&mut self, now: Millis) -> Vec<RoomTimer> {
        if self.next().is_none_or(|t| t > now) {
            return Vec::new();
        }
        let mut due: Vec<(Millis, RoomTimer)> = self
            .at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, t)| (*t, *k))
            .collect();
        due.sort();
        for (_, k) in &due {
            self.at.remove(k);
        }
        due.into_iter().map(|(_, k)| k).collect()
    }
}
